"""The pretraining loop: data -> jitted step -> metrics, checkpoints, eval; resumes a run directory exactly.

Run directory (`workdir`):
  config.json        the resolved ExperimentConfig of the latest launch (a resume logs what changed since the last)
  tokenizer.json     trained on the corpus at first use, or a copy of DataConfig.tokenizer's
  tokens-*.npz       cached token ids of the corpus
  checkpoints/<step> Orbax: train state + data iterator position + model config (see checkpointing.py)
  metrics.jsonl      one line per step ({"step", "loss", ...}) and per eval ({"step", "eval_loss", ...})
  tb/                TensorBoard event files (tensorboardX)

Resuming: a launch in a directory with checkpoints restores the latest complete one (state, data position) and
drops the metrics lines past it, so the file always reads as one uninterrupted run. Steps are a pure function of
(state, batch) and the data order a pure function of its iterator state, so a resumed run repeats the straight run's
losses and parameters bit for bit on the same machine and software.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from zaya_jax.checkpoint.hf import SAVED_MODEL_FILES, CheckpointError
from zaya_jax.figures import model_figures
from zaya_jax.sharding import ShardingPlan
from zaya_jax.train import sharded
from zaya_jax.train import step as train_step_lib
from zaya_jax.train.checkpointing import RunCheckpointer, check_latest_model, has_checkpoint, on_one_device
from zaya_jax.train.data import DATA_ORDER, make_data
from zaya_jax.train.experiment import (
  ExperimentConfig,
  changed_settings,
  from_dict,
  jsonable,
  save_json,
  setting_at,
  to_dict,
)
from zaya_jax.train.optim import OptimizerConfig, learning_rate_schedule


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss); the message says what was kept."""


@dataclasses.dataclass
class RunResult:
  final_step: int
  resumed_from: int | None
  preempted: bool
  last_loss: float | None
  eval_loss: float | None
  sample: str | None
  trainer: train_step_lib.Trainer | None = None  # with `state`: the trained model is trainer.model_of(state)
  state: train_step_lib.TrainState | None = None


# Peak dense bf16 FLOP/s per accelerator, for the MFU estimate (vendor figures, no sparsity).
_PEAK_FLOPS = {"MI300X": 1307.4e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_flops_per_device(workdir: str | None = None) -> tuple[float, str]:
  """(FLOP/s, where the figure comes from): vendor peaks for known GPUs, a measured large matmul otherwise (CPU).

  A measured peak is kept in the run directory (`mfu_peak.json`) and read back by later launches on the same kind
  of device, so that the MFU of one run compares across its resumes (a new measurement moves by up to ~2x on a busy
  host)."""
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"{name} bf16 peak"
  kept = None if workdir is None else os.path.join(workdir, "mfu_peak.json")
  if kept is not None and os.path.exists(kept):
    with open(kept) as f:
      saved = json.load(f)
    if saved.get("device_kind") == kind:
      return float(saved["flops"]), "fp32 matmul measured at the run's first launch"
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = math.inf  # the best of several: a busy moment (grain's threads starting) must not lower the peak
  for _ in range(7):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  if kept is not None and jax.process_index() == 0:
    with open(f"{kept}.tmp", "w") as f:
      json.dump({"flops": 2 * n**3 / best, "device_kind": kind}, f)
    os.replace(f"{kept}.tmp", kept)
  return 2 * n**3 / best, "measured fp32 matmul"


def train_flops_per_token(cfg: ExperimentConfig) -> float:
  """6 x active parameters (with the LM head) + causal attention scores and mixing, forward and backward.

  A causal layer's query sees seq_len / 2 keys on average (6·H·d·seq_len per token); a sliding-window layer about
  `window` keys, so its span counts as min(seq_len, 2·window)."""
  model = cfg.model
  figures = model_figures(model)
  att = model.attention
  head = model.vocab_size * model.hidden_size
  T, window = cfg.data.seq_len, att.sliding_window
  spans = [min(T, 2 * window) if window and model.layer_type(i) == "hybrid_sliding" else T
           for i in range(model.num_layers)]
  attention = 6 * att.num_heads * att.head_dim * sum(spans)
  return 6 * (figures.active_params + head) + attention


class _Metrics:
  """metrics.jsonl (appended and flushed per line) and TensorBoard scalars."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.eval_steps: set[int] = set()  # steps whose eval row is already in the file
    if resume_step is not None and os.path.exists(self.path):
      self.eval_steps = {r["step"] for r in _truncate_jsonl(self.path, resume_step) if "eval_loss" in r}
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)  # a fresh run in a directory without checkpoints
    self.file = open(self.path, "a")  # closed by close()
    self.tb_dir = os.path.join(workdir, "tb")
    self.tb_files = 0
    # purge_step drops events a previous attempt logged past the checkpoint we resume from (all of them for a fresh
    # run in a used directory, as metrics.jsonl goes).
    self.tb = self._tensorboard_writer(purge_step=0 if resume_step is None else resume_step + 1)

  def _tensorboard_writer(self, purge_step: int | None = None):
    from tensorboardX import SummaryWriter

    # Numbered: files opened within one second sort (and so read back) in the order they were written.
    self.tb_files += 1
    return SummaryWriter(self.tb_dir, purge_step=purge_step, filename_suffix=f".{self.tb_files:05d}")

  def write(self, row: dict[str, Any]) -> None:
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self.tb.add_scalar(key, value, row["step"])
      elif isinstance(value, list) and value and isinstance(value[0], (int, float)):  # per-layer values
        for layer, v in enumerate(value):
          self.tb.add_scalar(f"{key}/layer{layer}", v, row["step"])
      elif isinstance(value, list) and value and isinstance(value[0], list):  # expert_load: per layer, per expert
        for layer, per_expert in enumerate(value):
          for expert, v in enumerate(per_expert):
            self.tb.add_scalar(f"{key}/layer{layer}/expert{expert}", v, row["step"])

  def flush(self) -> None:
    """Puts the TensorBoard events logged so far on disk, for the loop to call at each save: a resume logs again only
    the steps after its checkpoint, so a kill -9 must not lose the ones before. tensorboardX writes from a thread that
    flushes every 120 s, and its flush() skips what is still queued for that thread; close() drains the queue. So
    the writer is closed and a new one (a new event file) opened."""
    self.tb.close()
    self.tb = self._tensorboard_writer()

  def close(self) -> None:
    self.file.close()
    self.tb.close()


class _NoMetrics:
  eval_steps: frozenset[int] = frozenset()

  def write(self, row: dict[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _eval_row_missing(metrics_out, step: int) -> bool:
  """Whether metrics.jsonl lacks the eval row of `step`. Process 0 writes (and reads) the file; its answer is
  broadcast, so that every process runs the same sharded eval, or none does."""
  missing = step not in metrics_out.eval_steps
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def _truncate_jsonl(path: str, last_step: int) -> list[dict]:
  """Keeps the rows up to `last_step` (returned parsed); a line that does not parse (cut by a crash mid-write) is
  dropped, loudly."""
  kept = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d: dropped a line that is not valid JSON (cut by a crash?): %.80r", path, number, line)
        continue
      if row.get("step", 0) <= last_step:
        kept.append(row)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in kept)  # as _Metrics.write wrote them
  os.replace(tmp, path)
  return kept


def _host_metrics(metrics: dict) -> dict[str, Any]:
  out = {}
  for key, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    if key == "expert_load":
      out[key] = value.round(5).tolist()
    elif value.ndim == 0:
      out[key] = bool(value) if value.dtype == bool else float(value)
    else:
      out[key] = value.astype(float).tolist()
  return out


def evaluate(trainer, state, data, max_batches: int, to_device=None) -> tuple[float, float]:
  """(mean cross entropy per scored held-out token, scored tokens) over up to `max_batches` eval batches."""
  to_device = to_device or (lambda batch: {k: jnp.asarray(v) for k, v in batch.items()})
  if data.eval is None:
    return math.nan, 0.0
  total, count = 0.0, 0.0
  for batch in itertools.islice(data.eval, max_batches):  # reads no batch past the last one used
    ce, n = train_step_lib.jit_eval_loss(trainer, state, to_device(batch))
    total, count = total + float(ce), count + float(n)
  return total / max(count, 1.0), count


def sample_text(trainer, state, tokenizer, prompt: str, num_tokens: int, temperature: float, seed: int = 0) -> str:
  """The prompt and its continuation by the current model (nucleus sampling at p = 0.95, or greedy at 0)."""
  from zaya_jax.infer.generate import generate
  from zaya_jax.infer.sampling import SamplingConfig

  ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  model = trainer.merge(state.params, state.biases)
  sampling = SamplingConfig(temperature=temperature, top_p=0.95 if temperature > 0 else 1.0)
  out = generate(model, np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32), key=jax.random.key(seed),
                 max_new_tokens=num_tokens, sampling=sampling, stop_token_ids=(tokenizer.eos_id,))
  n = int(out.lengths_B[0])
  return prompt + tokenizer.decode(np.asarray(out.tokens_BN[0, :n]).tolist(), skip_special_tokens=True)


def check_workdir(workdir: str) -> None:
  """Refuses a path a run directory must not be: a file, or a Hugging Face model folder (its config.json would be
  replaced by the run's, leaving the weights unreadable)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise TrainingError(f"workdir {workdir} is a file, not a directory")
  hf_files = [name for name in SAVED_MODEL_FILES if os.path.exists(os.path.join(workdir, name))]
  config = os.path.join(workdir, "config.json")
  if not hf_files and os.path.isfile(config):
    try:
      with open(config) as f:
        hf_files = ["config.json"] if "model_type" in json.load(f) else []
    except (OSError, ValueError, TypeError):  # not JSON (or not an object): make_data and the restore say what
      pass
  if hf_files:
    raise TrainingError(f"workdir {workdir} holds a Hugging Face model ({', '.join(hf_files)}), not a training run: "
                        "a run there would replace its config.json. Pick another workdir (to train from the model: "
                        f"--init_from={workdir})")


def _last_launch(config_path: str) -> dict | None:
  """The config.json the previous launch in this workdir left, as JSON; None for a new workdir."""
  if not os.path.exists(config_path):
    return None
  with open(config_path) as f:
    return json.load(f)


def _with_changes(error: CheckpointError, changed: list[str]) -> CheckpointError:
  """A checkpoint's refusal, with the settings that changed since the last launch (the likely cause) added."""
  if not changed:
    return error
  return CheckpointError(f"{error}\nsettings changed since the last launch in this workdir: " + "; ".join(changed))


def _changed_since(old: dict | None, cfg: ExperimentConfig) -> list[str]:
  """'name: old -> new' for each setting that differs from the previous launch's config, if any."""
  if old is None:
    return []
  new = jsonable(to_dict(cfg))
  return [f"{name}: {setting_at(old, name)!r} -> {setting_at(new, name)!r}" for name in changed_settings(old, new)]


def _check_init_from(cfg: ExperimentConfig, previous: dict | None, workdir: str) -> None:
  """Before the data is built: a run keeps the start it was launched with; a Hugging Face start's architecture is the
  run's, and its tokenizer is the data's."""
  from zaya_jax.checkpoint.hf import check_same_architecture, read_hf_config

  path = cfg.loop.init_from
  if previous is not None and previous.get("loop", {}).get("init_from") != path:
    # A resume would silently ignore a new start (and record it as if it had been used).
    before = previous.get("loop", {}).get("init_from")
    began = f"from {before}" if before else "from a random initialisation"
    raise ValueError(f"{workdir} holds a run that began {began}; loop.init_from = {path!r} cannot change it: use a "
                     "new --workdir" + (f", or resume with --init_from={before}" if before else ""))
  if path is None:
    return
  if cfg.data.tokenizer is None and not cfg.data.reads_token_records:
    raise ValueError(f"loop.init_from = {path} but data.tokenizer is unset: a tokenizer trained on this corpus would "
                     "not match the checkpoint's embeddings. Give the checkpoint's tokenizer.json (--tokenizer=...); "
                     "launch/train.py --init_from takes the folder's own when it has one")
  # Every launch: a resume reads the folder's config and tokenizer too (not its weights), so it must stay readable.
  check_same_architecture(cfg.model, read_hf_config(path), what=f"loop.init_from = {path}")


def _previous_optimizer(previous: dict, cfg: ExperimentConfig) -> OptimizerConfig:
  """The last launch's optimizer settings (what the rate was before this launch), else this launch's."""
  try:
    return from_dict(OptimizerConfig, previous["optimizer"])
  except (KeyError, TypeError, ValueError):  # a config.json from an older zaya_jax
    return cfg.optimizer


class _RunClock:
  """The ETA of the rest of a run. A step's share is the median iteration (batch, step, metrics row) of the last 20,
  the compiling first one left out; evals and checkpoint saves, which come every so many steps, add their measured
  mean times (the first, compiling or warming up, left out once others came) as many times as they are still to come,
  the final save and eval included."""

  def __init__(self, loop):
    self.loop = loop
    self.iterations: list[float] = []
    self.saves: list[float] = []
    self.evals: list[float] = []

  def eta_seconds(self, done: int, evaluates: bool) -> float:
    loop, left = self.loop, range(done + 1, self.loop.steps + 1)
    saves = sum(1 for s in left if s % loop.checkpoint_every == 0 or s == loop.steps)
    evals = (sum(1 for s in left if loop.eval_every and s % loop.eval_every == 0 and s != loop.steps)
             + (done < loop.steps)) if evaluates else 0
    mean = lambda ts: float(np.mean(ts[1:] or ts)) if ts else 0.0  # not measured yet: left out
    return (float(np.median(self.iterations[1:][-20:])) * len(left) + mean(self.saves) * saves
            + mean(self.evals) * evals)


class _PreemptionNotice:
  """SIGTERM as a preemption notice, answered at the same step by every process of the run.

  One process: a Python handler records the signal and the loop saves after the step in flight. Several: a scheduler
  signals the hosts at slightly different times, and a host that saved and left alone would leave the others waiting
  in the next step's collectives. jax.distributed's preemption service catches SIGTERM on any host and agrees on a
  step every host has yet to reach (`multihost_utils.reached_preemption_sync_point`, polled once per step), so all
  save that step and stop together. Our own handler would replace the service's, so none is installed then.
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self._received: list[bool] = []
    if not self.multi_process:
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._received.append(True))

  def reached(self, step: int) -> bool:
    """Whether to save `step` (just finished) and stop; called once per step, on every process."""
    if self.multi_process:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service off: no notice reaches us (as Orbax treats it)
        return False
    return bool(self._received)

  def received_before_start(self) -> bool:
    """Whether one process's SIGTERM came while the run was being set up (jax.distributed's service, with several
    processes, answers only at a step)."""
    return not self.multi_process and bool(self._received)

  def close(self) -> None:
    if not self.multi_process:
      signal.signal(signal.SIGTERM, self._previous)


def train(cfg: ExperimentConfig, workdir: str | os.PathLike, *, log=print) -> RunResult:
  """Trains (or resumes) the run in `workdir` up to cfg.loop.steps. SIGTERM saves and returns `preempted=True`."""
  # The notice is up from the start: setting up (data, compiling, restoring) can take minutes, and a SIGTERM then
  # ends the launch before its first step, cleanly and saying so, rather than killing it unannounced.
  preemption = _PreemptionNotice()
  try:
    return _train(cfg, workdir, log, preemption)
  finally:
    preemption.close()


def _train(cfg: ExperimentConfig, workdir: str | os.PathLike, log, preemption: _PreemptionNotice) -> RunResult:
  if jax.process_count() > 1 and not cfg.parallel.enabled:
    raise ValueError(f"this run has {jax.process_count()} processes but no mesh, so each would train alone on its "
                     f"own rows of the batch: give one, e.g. --mesh=data:-1 --dcn_mesh=data:{jax.process_count()}")
  workdir = os.path.abspath(os.fspath(workdir))
  loop = cfg.loop
  if cfg.data.seq_len > cfg.model.max_position_embeddings:
    raise ValueError(f"data.seq_len = {cfg.data.seq_len} is longer than the model's context "
                     f"model.max_position_embeddings = {cfg.model.max_position_embeddings}")
  check_workdir(workdir)
  # The mesh against the devices, heads and batch: before the data is tokenized (minutes on a large corpus) and before
  # anything is written to the workdir, which a corrected relaunch would then have to live with.
  plan = ShardingPlan.from_config(cfg.parallel) if cfg.parallel.enabled else None
  if plan is not None:
    plan.check_heads(cfg.model.attention)
    plan.check_batch(cfg.data.batch_size, cfg.step.grad_accum)  # as launch/plan.py checks it
  config_path = os.path.join(workdir, "config.json")
  previous = _last_launch(config_path)
  # Only a run with a checkpoint keeps its start: a launch that died before its first save resumes nothing.
  _check_init_from(cfg, previous if has_checkpoint(workdir) else None, workdir)
  changed = _changed_since(previous, cfg)
  try:  # another model than the checkpoint's: refused before the data is prepared (and cached in the workdir)
    check_latest_model(workdir, cfg.model)
  except CheckpointError as e:
    raise _with_changes(e, changed) from None
  os.makedirs(workdir, exist_ok=True)
  peak, peak_source = peak_flops_per_device(workdir)  # before the data's threads start: on CPU it is measured
  data = make_data(cfg.data, workdir, model_vocab_size=cfg.model.vocab_size)
  previous_steps = None if previous is None else previous.get("loop", {}).get("steps")
  log(f"data: {data.info.description}")

  data_iter = iter(data.train)
  checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"), save_every=loop.checkpoint_every,
                                 max_to_keep=loop.max_to_keep, use_async=loop.async_checkpointing)
  # Everything from here on closes the checkpointer (its writer threads) on the way out, an early error included.
  metrics_out = None
  try:
    resumed_from = checkpointer.latest_step()

    def stopped_before_start(trainer=None, state=None) -> RunResult | None:
      if not preemption.received_before_start():
        return None
      log("SIGTERM before the first step of this launch: nothing new to save; "
          + ("no checkpoint yet" if resumed_from is None else f"the run resumes from step {resumed_from}")
          + "; exiting")
      return RunResult(resumed_from or 0, resumed_from, True, None, None, None, trainer, state)

    if (early := stopped_before_start()) is not None:
      return early
    args = (cfg.optimizer, cfg.step, cfg.balancing, loop.steps, loop.seed)
    # With a mesh (`plan`) the step runs sharded (zaya_jax.sharding decides every array's placement); without, on one
    # device.
    if resumed_from is None:
      # Built sharded: resolving the plan's shardings (which names any dimension the mesh does not divide) comes first.
      shardings = None if plan is None else plan.state_shardings
      if cfg.loop.init_from is None:
        trainer, state = train_step_lib.create_initialised(cfg.model, *args, state_shardings=shardings)
      else:
        trainer, state = train_step_lib.create_from_hf(cfg.loop.init_from, cfg.model, *args,
                                                       state_shardings=shardings)
        log(f"initialised from {cfg.loop.init_from} (optimizer moments and the PID controller start fresh)")
    else:  # no random initialisation to throw away: restore straight into the state's shapes
      trainer, abstract_state = train_step_lib.create_abstract(cfg.model, *args)
      if plan is not None:
        sharded.validate(plan, abstract_state, cfg.data.batch_size, cfg.step.grad_accum)
        abstract_state = sharded.abstract_state(plan, abstract_state)
      else:  # also a run saved on a mesh, now resumed on one device
        abstract_state = on_one_device(abstract_state)
      if resumed_from > loop.steps:
        raise TrainingError(f"{workdir} is already at step {resumed_from}, past loop.steps = {loop.steps}; ask for "
                            f"--steps >= {resumed_from} or use another workdir")
      try:
        state = checkpointer.restore(resumed_from, abstract_state, data_iter, cfg.model)
      except CheckpointError as e:
        raise _with_changes(e, changed) from None
      log(f"resumed from {os.path.join(checkpointer.directory, str(resumed_from))}")
      saved_meta = checkpointer.meta(resumed_from)
      saved_corpus = saved_meta.get("data_fingerprint")
      if saved_meta.get("data_order", 1) != DATA_ORDER:
        log(f"note: checkpoint {resumed_from} was written by a zaya_jax that shuffled or split the corpus another "
            f"way (data order {saved_meta.get('data_order', 1)}, now {DATA_ORDER}; data.DATA_ORDER lists them): from "
            "here on the batches differ from the ones that run would have seen")
      if saved_corpus not in (None, data.info.fingerprint):  # None: a checkpoint from before fingerprints
        log(f"note: the corpus differs from the one checkpoint {resumed_from} was trained on (files added, removed "
            "or edited, or another tokenizer): the data position resumes by document index into the new corpus, "
            "so this run no longer repeats the batches an uninterrupted run would have seen")
      if changed:  # a resume repeats the straight run exactly only with the same settings
        log("settings changed since the last launch in this workdir: " + "; ".join(changed))
      if previous_steps not in (None, loop.steps) and resumed_from < loop.steps:
        # The schedule is a function of the total length: a longer (or shorter) run moves the rate at this step.
        before = float(learning_rate_schedule(_previous_optimizer(previous, cfg), previous_steps)(resumed_from))
        after = float(learning_rate_schedule(cfg.optimizer, loop.steps)(resumed_from))
        log(f"note: loop.steps {previous_steps} -> {loop.steps} reshapes the {cfg.optimizer.schedule} learning-rate "
            f"schedule: at step {resumed_from + 1}, the first after the checkpoint, it goes from {before:.3g} to "
            f"{after:.3g} (logged per step as lr)")
    if jax.process_index() == 0:  # only now: a launch refused by the checkpoint leaves the workdir's config as it was
      save_json(cfg, config_path)
    start = int(state.step)
    if plan is None:
      step_fn = functools.partial(train_step_lib.jit_train_step, trainer)
      to_device = lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}
    else:
      step_fn = sharded.jit_sharded_train_step(plan, trainer, state)
      to_device = functools.partial(sharded.global_batch, plan)  # this process's rows -> global arrays
      log(f"mesh {plan.describe()} over {jax.device_count()} devices in {jax.process_count()} process(es)")
    if (early := stopped_before_start(trainer, state)) is not None:
      return early
    # One writer per run: process 0 (the others compute the same replicated metrics).
    metrics_out = _Metrics(workdir, resumed_from) if jax.process_index() == 0 else _NoMetrics()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg)
    # A measured CPU peak is the whole host's (every core); forced host devices share those cores.
    peak *= jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count()
    last_loss = eval_loss = None
    step_times: list[float] = []
    clock = _RunClock(loop)
    logged_losses: list[float] = []  # since the last log line: one batch's loss is too noisy to read a trend from
    lr_at = learning_rate_schedule(cfg.optimizer, loop.steps)  # the step's AdamW rate (Muon's has the same shape)
    if cfg.optimizer.warmup_steps >= loop.steps - 1 and cfg.optimizer.schedule != "constant":
      log(f"note: optimizer.warmup_steps = {cfg.optimizer.warmup_steps} is not shorter than loop.steps - 1 = "
          f"{loop.steps - 1}: the rate warms up over {max(loop.steps - 1, 0)} steps and the run ends at the peak, "
          f"with no {cfg.optimizer.schedule} decay")
    evaluates = data.eval is not None  # eval_fraction 0: no held-out split, no eval rows
    if not evaluates:
      log("no held-out split (data.eval_fraction = 0): no eval loss")
    if evaluates and resumed_from and loop.eval_every and resumed_from % loop.eval_every == 0 \
        and resumed_from != loop.steps and _eval_row_missing(metrics_out, resumed_from):
      # A kill between an eval step's save and its eval: the resume starts after that step, so run the eval here.
      eval_loss, n = evaluate(trainer, state, data, loop.eval_batches, to_device)
      metrics_out.write({"step": resumed_from, "eval_loss": eval_loss, "eval_tokens": n})
      log(f"step {resumed_from:>6}  eval loss {eval_loss:.4f} over {n:,.0f} held-out tokens (missed before the resume)")
    for step in range(start, loop.steps):
      t_iteration = time.perf_counter()
      batch = next(data_iter)
      if step == start:
        train_step_lib.check_batch(batch, cfg.model, cfg.step)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, to_device(batch))
      row = _host_metrics(metrics)
      step_times.append(time.perf_counter() - t0)
      if not row["finite"]:
        checkpointer.wait()
        kept = checkpointer.latest_step()
        raise TrainingError(f"step {step + 1}: the loss ({row['loss']}) or gradient norm ({row['grad_norm']}) is "
                            f"not finite; stopped without saving. Last good checkpoint: "
                            f"{'none' if kept is None else os.path.join(checkpointer.directory, str(kept))}")
      done = step + 1
      last_loss = row["loss"]
      logged_losses.append(last_loss)
      timed = step_times[1:][-20:]  # the first step of a process compiles: no throughput from it
      seconds = float(np.median(timed)) if timed else None
      row.update(step=done, lr=float(lr_at(step)), tokens_per_s=tokens_per_step / seconds if timed else None,
                 mfu=tokens_per_step / seconds * flops_per_token / peak if timed else None)
      metrics_out.write(row)
      clock.iterations.append(time.perf_counter() - t_iteration)
      if done % loop.log_every == 0 or done == loop.steps or done == start + 1:
        speed = (f"{row['tokens_per_s']:,.0f} tok/s  MFU {100 * row['mfu']:.1f}% (of {peak_source})  "
                 f"ETA {clock.eta_seconds(done, evaluates) / 60:.1f} min" if timed else
                 f"compiled in {step_times[0]:.1f} s (throughput from the next step)")
        mean = (f"loss {np.mean(logged_losses):.4f} (mean of {len(logged_losses)} steps)" if len(logged_losses) > 1
                else f"loss {last_loss:.4f}")
        log(f"step {done:>6}/{loop.steps}  {mean}  lr {row['lr']:.3g}  {speed}")
        logged_losses.clear()
      preempted = preemption.reached(done)
      t_save = time.perf_counter()
      if checkpointer.save(done, state, data_iter, cfg.model, force=done == loop.steps or preempted,
                           data_fingerprint=data.info.fingerprint, run_config=to_dict(cfg)):
        metrics_out.flush()
        clock.saves.append(time.perf_counter() - t_save)
      if evaluates and loop.eval_every and done % loop.eval_every == 0 and done != loop.steps:
        t_eval = time.perf_counter()
        eval_loss, n = evaluate(trainer, state, data, loop.eval_batches, to_device)
        clock.evals.append(time.perf_counter() - t_eval)
        metrics_out.write({"step": done, "eval_loss": eval_loss, "eval_tokens": n})
        log(f"step {done:>6}  eval loss {eval_loss:.4f} over {n:,.0f} held-out tokens")
      if preempted:
        checkpointer.wait()
        log(f"SIGTERM: saved step {done} to {checkpointer.directory}; exiting")
        return RunResult(done, resumed_from, True, last_loss, eval_loss, None, trainer, state)
    checkpointer.wait()
    if evaluates:
      eval_loss, n = evaluate(trainer, state, data, loop.eval_batches, to_device)
      if int(state.step) not in metrics_out.eval_steps:  # a finished run launched again has its eval row already
        metrics_out.write({"step": int(state.step), "eval_loss": eval_loss, "eval_tokens": n})
      log(f"final eval loss {eval_loss:.4f} over {n:,.0f} held-out tokens")
    sample = None
    if loop.sample_tokens and data.tokenizer is not None and jax.process_count() == 1:
      sample = sample_text(trainer, state, data.tokenizer, loop.sample_prompt, loop.sample_tokens,
                           loop.sample_temperature, loop.seed)
      log(f"sample (temperature {loop.sample_temperature}):\n{sample}")
    return RunResult(int(state.step), resumed_from, False, last_loss, eval_loss, sample, trainer, state)
  finally:
    if metrics_out is not None:
      metrics_out.close()
    checkpointer.close()


__all__ = ["CheckpointError", "RunResult", "TrainingError", "check_workdir", "evaluate", "train"]
