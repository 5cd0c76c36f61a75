"""The pretraining loop: exact resume after kill -9 (also mid-checkpoint), preemption of a two-process run, PID
balancing, the main job, bad input, Muon with bf16 compute.

Runs that must die are separate processes (tests/train_driver.py) sharing the session's persistent JAX compilation
cache (conftest.py), so only the first compiles. The corpus is a handful of standard-library files, except for the
main-job test.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zaya_jax.checkpoint.hf import CheckpointError, flat_params
from zaya_jax.config import ZayaConfig
from zaya_jax.model.decoder import ZayaForCausalLM, forward
from zaya_jax.train import loop as loop_lib
from zaya_jax.train import step as train_step_lib
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.checkpointing import RunCheckpointer, load_run
from zaya_jax.train.data import DataConfig, make_data
from zaya_jax.train.experiment import ExperimentConfig, get_experiment, load_json, override, save_json, to_dict
from zaya_jax.train.loop import TrainingError, train
from zaya_jax.train.optim import OptimizerConfig, learning_rate_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "train_driver.py")
STDLIB = sysconfig.get_paths()["stdlib"]
sys.path.insert(0, os.path.dirname(DRIVER))
from train_driver import small_config  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus")
  for name in ("argparse", "textwrap", "shutil", "glob", "fnmatch", "functools", "inspect", "dataclasses"):
    shutil.copy(os.path.join(STDLIB, f"{name}.py"), path)
  return str(path)


@pytest.fixture(scope="module")
def env():
  # The session's compilation cache (conftest.py) travels in os.environ: drivers reuse each other's compiles.
  return {**os.environ, "PYTHONPATH": ROOT}


def start(env, workdir, corpus, steps, every, *options):
  return subprocess.Popen([sys.executable, DRIVER, str(workdir), corpus, str(steps), str(every), *options], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  # Timing fields differ between runs by nature; everything else must be bitwise equal.
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} as TensorBoard reads the run's event files: in the order they were written, a purge marker
  (tensorboardX's purge_step, written by a resume) drops what earlier files logged at or after its step, and a record
  cut by a kill ends its file."""
  from tensorboardX.proto.event_pb2 import Event

  scalars: dict[str, dict[int, float]] = {}
  for name in sorted(os.listdir(logdir)):  # tensorboardX names files by creation time
    data = open(os.path.join(logdir, name), "rb").read()
    at = 0
    while at + 12 <= len(data):  # TFRecord: length (8 bytes), its CRC (4), the record, its CRC (4)
      length = int.from_bytes(data[at:at + 8], "little")
      if at + 16 + length > len(data):
        break
      event = Event.FromString(data[at + 12:at + 12 + length])
      at += 16 + length
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for values in scalars.values():
          for step in [s for s in values if s >= event.step]:
            del values[step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


N = 6  # the straight run: 2N steps, a checkpoint every N


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
  """(run directory, final parameters) of 2N uninterrupted steps, in-process: it fills the compilation cache that the
  driver processes of the resume, SIGTERM and mesh tests then read. Tests that change the directory copy it."""
  workdir = tmp_path_factory.mktemp("straight")
  result = train(small_config(corpus, 2 * N, N), workdir, log=lambda _: None)
  model = result.trainer.merge(result.state.params, result.state.biases)
  return workdir, {k: np.asarray(v[...]) for k, v in flat_params(model).items()}


def test_resume_after_kill_is_bitwise_identical(tmp_path, corpus, env, straight):
  killed = tmp_path / "killed"
  straight, final_a = straight
  rc, out = finish(start(env, killed, corpus, 2 * N, N, f"kill_after={N + 2}"))
  assert rc == -9, out  # really killed, mid-run
  assert RunCheckpointer(killed / "checkpoints", save_every=N, max_to_keep=3).latest_step() == N

  # Second attempt: resumes from N, then dies while Orbax is writing step N + 2 (checkpoints every step now).
  rc, out = finish(start(env, killed, corpus, 2 * N, N, f"kill_in_save={N + 2}", "set=loop.checkpoint_every=1"))
  assert rc == -9 and f"resumed from {killed / 'checkpoints' / str(N)}" in out, out
  steps = RunCheckpointer(killed / "checkpoints", save_every=1, max_to_keep=3).all_steps()
  assert N + 1 in steps and N + 2 not in steps, steps  # the half-written step is not listed
  assert any(name.startswith(f"{N + 2}.") for name in os.listdir(killed / "checkpoints"))  # but its remains are there
  # TensorBoard's events of this launch reached the disk up to its last complete save (a resume logs only the steps
  # after its checkpoint): the loop flushes them at each save, where the writer's buffer would hold them (~1 KiB a
  # step, written out in 4-8 KiB blocks).
  assert set(range(1, N + 2)) <= set(tensorboard_scalars(killed / "tb")["loss"])

  # Third attempt: the half-written checkpoint is never picked up; resumes from N + 1 and finishes.
  rc, out = finish(start(env, killed, corpus, 2 * N, N))
  assert rc == 0 and f"resumed from {killed / 'checkpoints' / str(N + 1)}" in out, out

  rows_a, rows_b = metrics(straight), metrics(killed)
  # The three launches measured the CPU's peak once (the first) and kept it: MFU per token/s is one constant.
  with open(killed / "metrics.jsonl") as f:
    timed = [r for r in map(json.loads, f) if r.get("mfu")]
  per_token_rate = [r["mfu"] / r["tokens_per_s"] for r in timed]
  assert len(timed) >= 2 * N - 3 and max(per_token_rate) == pytest.approx(min(per_token_rate), rel=1e-9), timed
  assert os.path.exists(killed / "mfu_peak.json")
  assert [r["step"] for r in rows_b] == [*range(1, 2 * N + 1), 2 * N]  # every step once, then the final eval
  assert rows_a == rows_b
  # TensorBoard, across the kills and resumes, holds what metrics.jsonl does: each step once (purged and logged again
  # after each resume), per-layer and per-expert values included.
  board = tensorboard_scalars(killed / "tb")
  train_rows = rows_b[:-1]
  assert board["loss"] == {r["step"]: float(np.float32(r["loss"])) for r in train_rows}
  assert board["eval_loss"] == {2 * N: float(np.float32(rows_b[-1]["eval_loss"]))}
  assert board["expert_load/layer1/expert2"] == {r["step"]: float(np.float32(r["expert_load"][1][2]))
                                                 for r in train_rows}
  final_b = np.load(killed / "final_params.npz")
  assert sorted(final_a) == sorted(final_b)
  for key in final_a:
    np.testing.assert_array_equal(final_a[key], final_b[key], err_msg=key)
  assert rows_a[-2]["loss"] < rows_a[0]["loss"]  # it trains


def test_tensorboard_events_are_on_disk_once_flushed(tmp_path):
  # The writer buffers events for up to 120 s; the loop flushes at each save, so a kill -9 loses none at or before a
  # step a resume could start from.
  out = loop_lib._Metrics(str(tmp_path), None)
  try:
    out.write({"step": 1, "loss": 2.5, "skip_rate": [0.0, 0.25], "expert_load": [[0.75, 0.25], [0.5, 0.5]]})
    out.flush()
    board = tensorboard_scalars(tmp_path / "tb")  # read while the writer is open, as after a kill
    assert board["loss"] == {1: 2.5} and board["skip_rate/layer1"] == {1: 0.25}
    assert board["expert_load/layer0/expert1"] == {1: 0.25}
  finally:
    out.close()


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus, env, straight):
  rc, out = finish(start(env, tmp_path, corpus, 2 * N, N, "sigterm_after=4"))
  assert rc == 0 and "SIGTERM: saved step 4" in out and "preempted=True" in out, out
  with RunCheckpointer(tmp_path / "checkpoints", save_every=6, max_to_keep=3) as ck:
    # Off the save interval, the preemption save is forced; nothing saved at step 1 (Orbax's default first save,
    # which held one of the max_to_keep slots).
    assert ck.all_steps() == [4]


def test_sigterm_while_setting_up_exits_cleanly_and_says_so(tmp_path, corpus, env):
  rc, out = finish(start(env, tmp_path, corpus, 2 * N, N, "sigterm_on=data:"))  # right after the data is built
  assert rc == 0 and "SIGTERM before the first step of this launch: nothing new to save; no checkpoint yet" in out, out
  assert "preempted=True" in out and "step      1/" not in out, out
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  assert RunCheckpointer(tmp_path / "checkpoints", save_every=N, max_to_keep=3).all_steps() == []


def test_eta_counts_the_evals_and_saves_to_come():
  from zaya_jax.train.loop import _RunClock

  clock = _RunClock(dataclasses.replace(get_experiment("tiny").loop, steps=10, checkpoint_every=4, eval_every=3))
  clock.iterations = [10.0, 1.0, 1.0, 1.0]  # the first compiles
  clock.saves, clock.evals = [5.0, 2.0], [7.0, 3.0]  # so do the first save and eval
  # After step 4: steps 5-10 at 1 s, saves at 8 and 10 at 2 s, evals at 6 and 9 and the final one at 3 s.
  assert clock.eta_seconds(4, evaluates=True) == 6 * 1 + 2 * 2 + 3 * 3
  assert clock.eta_seconds(4, evaluates=False) == 6 * 1 + 2 * 2
  assert clock.eta_seconds(10, evaluates=True) == 0


def run_balancing(data, mode: str, steps: int, last: int):
  """Per layer, over the last `last` steps: the max/min ratio of the experts' shares of all those steps' tokens, the
  median of each step's own max/min ratio, and the mean skip rate."""
  cfg = ZayaConfig.tiny(vocab_size=512)
  model = ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))
  trainer, state = train_step_lib.create(model, OptimizerConfig(lr=3e-3, warmup_steps=10), train_step_lib.StepConfig(),
                                         BalancingConfig(mode=mode), steps, 0)
  it = iter(data.train)
  ratios, loads, skips = [], [], []
  for _ in range(steps):
    state, m = train_step_lib.jit_train_step(trainer, state, {k: jnp.asarray(v) for k, v in next(it).items()})
    ratios.append(np.asarray(m["load_max_over_min"]))
    loads.append(np.asarray(m["expert_load"]))  # [L, X] shares of a step's routed tokens (all routed: skip ~ 0)
    skips.append(np.asarray(m["skip_rate"]))
  window_LX = np.mean(loads[-last:], axis=0)
  return (window_LX.max(1) / np.maximum(window_LX.min(1), 1e-3), np.median(np.array(ratios[-last:]), axis=0),
          np.array(skips[-last:]).mean(0))


def test_a_resume_on_an_edited_corpus_says_so(tmp_path, corpus, straight):
  """The data position is an index into the document list: on another corpus a resume cannot repeat the straight
  run, and the log says so (the checkpoint records the corpus's fingerprint)."""
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  edited = tmp_path / "corpus"
  shutil.copytree(corpus, edited)
  name = sorted(os.listdir(edited))[0]
  with open(edited / name, "a") as f:
    f.write("\n# one more line\n")
  for data, noted in ((corpus, False), (str(edited), True)):
    lines = []
    cfg = small_config(corpus, 2 * N, N, [f"data.paths=({data!r},)", "loop.sample_tokens=0"])
    train(cfg, workdir, log=lines.append)
    assert any(x.startswith("resumed from") for x in lines), lines
    assert any("the corpus differs" in x for x in lines) == noted, lines


def test_a_resume_runs_the_eval_a_kill_after_the_save_skipped(tmp_path, corpus, straight, monkeypatch):
  """An eval step saves, then evaluates: a kill in between left no eval row for that step, and the resume (which
  starts after it) never ran it. Now the resume evaluates it first, once. Without a held-out split: no eval rows."""
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / str(2 * N))  # as if killed in step N's eval: step N is the latest save
  lines = []
  cfg = small_config(corpus, 2 * N, N, [f"loop.eval_every={N}", "loop.sample_tokens=0"])
  train(cfg, workdir, log=lines.append)
  assert [r["step"] for r in metrics(workdir) if "eval_loss" in r] == [N, 2 * N]
  assert sum("missed before the resume" in x for x in lines) == 1, lines
  # Killed after step N's eval this time: its row is there, and the resume must not evaluate it again.
  shutil.rmtree(workdir / "checkpoints" / str(2 * N))
  peak = 1e9
  monkeypatch.setattr(loop_lib, "peak_flops_per_device", lambda workdir: (peak, "test peak"))

  class OneSecondPerReading:  # the loop's clock: every perf_counter() reading one second after the last
    def __init__(self, real):
      self.real, self.now = real, 0.0

    def perf_counter(self):
      self.now += 1.0
      return self.now

    def __getattr__(self, name):
      return getattr(self.real, name)

  monkeypatch.setattr(loop_lib, "time", OneSecondPerReading(loop_lib.time))
  lines.clear()
  train(cfg, workdir, log=lines.append)
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]  # with the timing fields, which metrics() leaves out
  assert [r["step"] for r in rows if "eval_loss" in r] == [N, 2 * N]
  assert not any("missed before the resume" in x for x in lines), lines
  # MFU = tokens/s x training FLOPs per token / (peak x devices), on every timed row of this launch (the first
  # step of a launch compiles and is not timed).
  timed = [r for r in rows if r["step"] > N and r.get("tokens_per_s") is not None]
  assert len(timed) == N - 1
  for r in timed:
    assert r["tokens_per_s"] == cfg.data.batch_size * cfg.data.seq_len  # one step a second
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * loop_lib.train_flops_per_token(cfg)
                                     / (peak * jax.device_count()), rel=1e-9)
  lines.clear()
  train(small_config(corpus, 2 * N + 1, N, ["data.eval_fraction=0.0", "loop.eval_every=1", "loop.sample_tokens=0"]),
        workdir, log=lines.append)
  rows = metrics(workdir)
  assert rows[-1]["step"] == 2 * N + 1 and [r["step"] for r in rows if "eval_loss" in r] == [N, 2 * N], rows[-3:]
  assert any("no held-out split" in x for x in lines) and not any("held-out tokens" in x for x in lines), lines


def test_pid_controller_balances_expert_load(tmp_path, corpus):
  data = make_data(DataConfig(paths=(corpus,), seq_len=32, batch_size=8, vocab_size=512, eval_fraction=0.0),
                   tmp_path, model_vocab_size=512)
  steps, last = 250, 60
  window_off, step_off, _ = run_balancing(data, "none", steps, last)
  window_pid, step_pid, skip_pid = run_balancing(data, "pid", steps, last)
  print(f"max/min expert load over the last {last} of {steps} steps, per layer: off {window_off}, PID {window_pid}; "
        f"median of each step's own: off {step_off}, PID {step_pid}")
  # Measured (CPU, kp = 1e-3; ad-hoc runs and experiments/pid_gain_sweep.py over data seeds 0-3, 50-step windows):
  # off, one or two experts take every token and the others none (ratio 569-998, the floor's 1000 at most); PID,
  # every expert holds 15-44% of a window's tokens (ratio 1.1-3.8). Within one step the ratio stays high for hundreds
  # of steps: the routers' probabilities hardly differ between tokens yet, so one small bias step moves most of a
  # batch from one expert to another. It falls to 1.5-7 once the routers tell tokens apart, which happens at a
  # chaotic point (by step 750 in 4 of 4 data orders at the default XLA settings; not by then at seed 0 in this test's
  # compiled program).
  assert (window_off > 10).all()
  assert (window_pid < 4).all()
  assert (skip_pid < 0.5).all()  # the controller leaves the skip slot alone; it does not balance by skipping


def test_muon_step_with_bf16_compute_keeps_fp32_masters_and_orthogonalises_matrices():
  cfg = ZayaConfig.tiny(vocab_size=256, dtype="bfloat16", param_dtype="float32")
  model = ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))
  before = {k: np.asarray(v) for k, v in flat_params(model).items()}
  ids = np.random.default_rng(1).integers(3, 256, (4, 33)).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
           "segment_ids": jnp.ones((4, 32), jnp.int32), "loss_mask": jnp.ones((4, 32), jnp.float32)}
  lr, muon_lr = 1e-3, 0.02
  opt = OptimizerConfig(name="muon", lr=lr, muon_lr=muon_lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                        clip_norm=0.0)
  trainer, state = train_step_lib.create(model, opt, train_step_lib.StepConfig(), BalancingConfig(mode="none"), 10, 0)
  state, metrics = train_step_lib.jit_train_step(trainer, state, batch)
  after = {k: np.asarray(v) for k, v in flat_params(trainer.merge(state.params, state.biases)).items()}
  assert {str(v.dtype) for v in after.values()} == {"float32"}  # the master copy stays fp32

  # The step computed in bf16: near the fp32 forward's loss on the same weights, and not equal to it.
  logits = np.asarray(forward(ZayaForCausalLM(ZayaConfig.tiny(vocab_size=256), rngs=nnx.Rngs(0)),
                              ids[:, :-1]).logits_BTV, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  loss_fp32 = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
  assert 0 < abs(float(metrics["loss"]) - loss_fp32) < 1e-2 * loss_fp32

  def singular_values(name, expert=None):
    delta = after[name] - before[name]
    return np.linalg.svd(delta if expert is None else delta[expert], compute_uv=False) / muon_lr

  # Muon matrices move by an orthogonalised step: every singular value near muon_lr (Newton-Schulz leaves them in
  # about [0.7, 1.4] with optax's shape scale). AdamW's first step would be lr * sign(grad): spread-out and 20x smaller.
  layer = "model.layers.0."
  for name in ("self_attn.qkv_proj.v_proj_current.weight", "mlp.gate.down_proj.weight"):
    sv = singular_values(layer + name)
    assert 0.5 < sv.min() and sv.max() < 1.6, (name, sv)
  for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # per expert, the busiest one
    busiest = int(np.argmax(np.abs(after[layer + name] - before[layer + name]).sum((1, 2))))
    sv = singular_values(layer + name, busiest)
    assert 0.5 < sv.min() and sv.max() < 1.6, (name, sv)
  # The rest (embedding, norms, scales) is AdamW: a first step moves each entry by at most lr.
  for name in ("model.embed_tokens.weight", "model.norm.weight", layer + "post_mlp_residual_scale.residual_scale"):
    step = np.abs(after[name] - before[name])
    assert step.max() <= lr * (1 + 1e-4) and np.median(step) > 0.5 * lr, name


def test_non_finite_loss_stops_without_saving(tmp_path, corpus):
  cfg = small_config(corpus, 8, 1, ["optimizer.lr=1e9", "optimizer.warmup_steps=0", "optimizer.clip_norm=0.0",
                                    "model.num_layers=1"])  # one layer: a quicker compile
  with pytest.raises(TrainingError, match="not finite; stopped without saving") as info:
    train(cfg, tmp_path, log=lambda _: None)
  with RunCheckpointer(tmp_path / "checkpoints", save_every=1, max_to_keep=3) as ck:
    last = ck.latest_step()
  failed_at = int(str(info.value).split()[1].rstrip(":"))
  assert failed_at >= 2 and last == failed_at - 1  # every finite step was saved, the failing one was not
  with open(tmp_path / "metrics.jsonl") as f:
    assert all(np.isfinite(json.loads(line)["loss"]) for line in f)


def test_incompatible_and_corrupt_checkpoints_are_named(tmp_path, corpus, straight):
  cfg = small_config(corpus, 2 * N, N)
  tmp_path = tmp_path / "run"
  shutil.copytree(straight[0], tmp_path)  # a finished run of `cfg`
  files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  other = override(cfg, ["model.hidden_size=32"])
  with pytest.raises(CheckpointError, match=r"another model \(hidden_size: checkpoint 64 vs run 32\)"):
    train(other, tmp_path, log=lambda _: None)
  # Nested settings by their dotted names, each value alone (not the whole section); refused before the data is
  # prepared, so nothing (a token cache of the new settings) is left behind.
  fewer = tmp_path.parent / "fewer_docs"  # another corpus: its token cache would replace the run's
  fewer.mkdir()
  for doc in sorted(pathlib.Path(corpus).iterdir())[:-1]:
    shutil.copy(doc, fewer)
  other = override(cfg, ["model.moe.intermediate_size=24", "data.seq_len=24", f"data.paths={fewer}"])
  with pytest.raises(CheckpointError, match=r"\(moe\.intermediate_size: checkpoint \d+ vs run 24\); .*without --config"
                     r"[^\n]*\nsettings changed since the last launch in this workdir: .*data.seq_len: 32 -> 24"):
    train(other, tmp_path, log=lambda _: None)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files
  assert load_json(tmp_path / "config.json") == cfg  # the refused launch left the workdir's config alone
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  schedule = learning_rate_schedule(cfg.optimizer, cfg.loop.steps)
  assert [r["lr"] for r in rows if "loss" in r] == [float(schedule(i)) for i in range(cfg.loop.steps)]
  throughput = [r["tokens_per_s"] for r in rows if "loss" in r]
  assert throughput[0] is None and None not in throughput[1:]  # the compiling step reports none
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 13, "loss": 1.')  # a line cut by a crash mid-write
  logs = []
  train(override(cfg, ["loop.log_every=5"]), tmp_path, log=logs.append)  # resumes at its last step: nothing to do
  assert f"settings changed since the last launch in this workdir: loop.log_every: {cfg.loop.log_every} -> 5" in logs
  again = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]  # the cut line dropped, no second eval row
  assert again == rows
  with pytest.raises(TrainingError, match=r"already at step 12, past loop.steps = 6"):
    train(override(cfg, ["loop.steps=6"]), tmp_path, log=lambda _: None)
  with pytest.raises(ValueError, match=r"data.seq_len = 2048 is longer than .* model.max_position_embeddings = 1024"):
    train(override(cfg, ["data.seq_len=2048"]), tmp_path, log=lambda _: None)
  with pytest.raises(CheckpointError, match=r"optimizer.name: 'adamw' -> 'muon'") as e:
    train(override(cfg, ["optimizer.name=muon"]), tmp_path, log=lambda _: None)
  assert len(str(e.value)) < 2000  # not Orbax's whole tree diff
  # Extending the run: the schedule is a function of the total length, so the rate at the resumed step moves (noted).
  # A checkpoint from before data.DATA_ORDER (the seed used unhashed): the resume says its batches differ.
  meta_12 = tmp_path / "checkpoints" / "12" / "meta" / "metadata"
  meta = json.loads(meta_12.read_text())
  assert meta["run_config"] == json.loads(json.dumps(to_dict(cfg)))  # each step keeps the config that trained it
  assert meta.pop("data_order") == 3
  del meta["model_config"]["remat"]  # and before model.remat: the field at its default
  del meta["model_config"]["residual_scaling"]  # a field the checkpoint predates was at its default (True) then
  meta_12.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"another model \(residual_scaling: checkpoint True vs run False\)"):
    train(override(cfg, ["loop.steps=14", "model.residual_scaling=False"]), tmp_path, log=lambda _: None)
  logs = []
  longer = override(cfg, ["loop.steps=14", "optimizer.lr=0.002",  # the "from" rate is the last launch's
                          "model.remat=full"])  # recomputes the same values: a resume may change it
  train(longer, tmp_path, log=logs.append)
  assert any("model.remat: 'none' -> 'full'" in line for line in logs), logs
  assert any(line.startswith("note: checkpoint 12 was written by a zaya_jax that shuffled or split the corpus "
                             "another way (data order 1, now 3;") for line in logs), logs
  before = float(learning_rate_schedule(cfg.optimizer, 12)(12))
  after = float(learning_rate_schedule(longer.optimizer, 14)(12))
  assert before != after and cfg.optimizer.lr != 0.002
  assert (f"note: loop.steps 12 -> 14 reshapes the cosine learning-rate schedule: at step 13, the first after the "
          f"checkpoint, it goes from "
          f"{before:.3g} to {after:.3g} (logged per step as lr)") in logs, logs
  extended = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert extended[:len(rows)] == rows and [r["step"] for r in extended[len(rows):]] == [13, 14, 14]
  assert [r["lr"] for r in extended[len(rows):-1]] == [float(learning_rate_schedule(longer.optimizer, 14)(i))
                                                        for i in (12, 13)]
  logs = []  # a warmup as long as the run (the 8B preset's 2000 steps in a short ablation) is cut, and said so
  train(override(longer, ["optimizer.warmup_steps=20"]), tmp_path, log=logs.append)
  assert ("note: optimizer.warmup_steps = 20 is not shorter than loop.steps - 1 = 13: the rate warms up over 13 steps "
          "and the run ends at the peak, with no cosine decay") in logs, logs
  one_short = dataclasses.replace(longer.optimizer, warmup_steps=13)  # steps - 1: the last step is at the peak too
  assert float(learning_rate_schedule(one_short, 14)(13)) == pytest.approx(0.002)
  # A run written before gate_up_proj's rows were interleaved (no "param_layout" in its meta) is refused, named.
  meta_file = tmp_path / "checkpoints" / "14" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert meta.pop("param_layout") == 2
  meta_file.write_text(json.dumps(meta))
  for load in (lambda: train(longer, tmp_path, log=lambda _: None), lambda: load_run(tmp_path)):
    with pytest.raises(CheckpointError, match=r"stores parameters in layout 1, this zaya_jax reads layout 2"):
      load()
  meta_file.write_text(json.dumps({**meta, "param_layout": 2}))
  state_dir = tmp_path / "checkpoints" / "14" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  assert json.loads(meta_file.read_text())["run_config"]["loop"]["steps"] == 14  # the launch that wrote step 14
  with pytest.raises(CheckpointError, match="cannot be restored") as e:
    train(longer, tmp_path, log=lambda _: None)
  # The error says how to fall back to the last complete step before the damaged one, and that works.
  damaged = tmp_path / "checkpoints" / "14"
  assert (f"if its files are damaged: move {damaged} out of the workdir and the run resumes from step 12 (complete "
          "checkpoints before it: 6, 12)") in str(e.value)
  meta_file.write_text("garbage")  # its record unreadable too: the same way back is named
  with pytest.raises(CheckpointError, match=r"checkpoints/14 is unreadable") as e:
    train(longer, tmp_path, log=lambda _: None)
  assert "the run resumes from step 12 (complete checkpoints before it: 6, 12)" in str(e.value)
  shutil.move(damaged, tmp_path / "damaged_14")
  assert RunCheckpointer(tmp_path / "checkpoints", save_every=6, max_to_keep=3).latest_step() == 12
  load_run(tmp_path)


def test_a_workdir_must_not_be_a_file_or_a_hugging_face_folder(tmp_path, corpus):
  cfg = small_config(corpus, 2, 2)
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(TrainingError, match=r"a_file is a file, not a directory"):
    train(cfg, tmp_path / "a_file", log=lambda _: None)
  # Any file of a saved model counts, whatever its config.json holds (a weights file beside a config without
  # "model_type" too), and the error names the model's files.
  before = signal.getsignal(signal.SIGTERM)
  for files, named in (({"config.json": json.dumps({"model_type": "zaya"})}, "config.json"),
                       ({"model.safetensors": ""}, "model.safetensors"),
                       ({"model.safetensors.index.json": "{}"}, "model.safetensors.index.json"),
                       ({"model.safetensors": "", "config.json": "{}"}, "model.safetensors")):
    folder = tmp_path / f"hf_{len(os.listdir(tmp_path))}"
    folder.mkdir()
    for name, text in files.items():
      (folder / name).write_text(text)
    with pytest.raises(TrainingError, match=rf"holds a Hugging Face model \({re.escape(named)}\), not a training run"):
      train(cfg, folder, log=lambda _: None)
    assert sorted(os.listdir(folder)) == sorted(files)  # left as it was
  assert signal.getsignal(signal.SIGTERM) is before  # train() gives the SIGTERM handler back, however it ends
  # A mesh the devices cannot hold is refused before the data is tokenized or anything is written to the workdir
  # (a trained tokenizer left there would bind the corrected relaunch).
  from zaya_jax.sharding import ShardingError

  with pytest.raises(ShardingError, match=rf"but there are {jax.device_count()} devices"):
    train(override(cfg, [f"parallel.mesh='data:{jax.device_count() + 1}'"]), tmp_path / "meshed", log=print)
  assert not (tmp_path / "meshed").exists()


def test_a_rerun_without_config_keeps_the_runs_settings(tmp_path, env):
  # The workdir's config.json (as a first launch leaves it) says where its data is; a rerun without --config must
  # start from it, not from the default preset (the embedded corpus).
  save_json(override(get_experiment("tiny"), ["data.paths=('/nonexistent/kept_corpus',)"]), tmp_path / "config.json")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--workdir={tmp_path}",
                         "--steps=1"], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and f"settings from {tmp_path / 'config.json'}" in proc.stdout, proc.stdout
  assert "/nonexistent/kept_corpus" in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--data=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--set=model.vocab_size=300"], "300"),
    (["--set=optimizer.lr=fast"], "optimizer.lr"),
    (["--set=model.nope=1"], "no field 'nope'"),
    (["--data="], "--data is empty"),  # an unset shell variable: not silently the built-in corpus
])
def test_cli_bad_input_is_one_clear_message(tmp_path, corpus, env, args, message):
  if "--data" not in args[0]:
    args = [f"--data={corpus}", *args]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=tiny",
                         f"--workdir={tmp_path}", "--steps=1", *args], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  last_line = proc.stderr.strip().splitlines()[-1]  # absl may log INFO lines (platform probing) before it
  assert last_line.startswith("error: ") and message in last_line, proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_main_job_trains_checkpoints_evaluates_and_samples(tmp_path, env):
  """The README's main command, shortened: the embedded default corpus, the tiny config."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=tiny",
                         f"--workdir={tmp_path}", "--steps=4", "--set=loop.eval_batches=1",
                         "--set=loop.sample_tokens=8"], env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for expected in ("final eval loss", "sample (temperature 0.8):\nimport os\n", "done: step 4"):
    assert expected in proc.stdout, proc.stdout
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
  # Logged at step 1 (the compile) and 4: that line reads the mean of steps 2-4, not step 4's batch alone.
  assert f"loss {np.mean(losses[1:]):.4f} (mean of 3 steps)" in proc.stdout, proc.stdout
  assert RunCheckpointer(tmp_path / "checkpoints", save_every=1, max_to_keep=3).latest_step() == 4
  assert load_json(tmp_path / "config.json") == override(get_experiment("tiny"), ["loop.steps=4",
                                                                                  "loop.eval_batches=1",
                                                                                  "loop.sample_tokens=8"])
  assert os.path.exists(tmp_path / "tokenizer.json") and os.listdir(tmp_path / "tb")
  from experiments.plot_run import plot_runs  # the run's curves, drawn from its metrics.jsonl

  png = plot_runs([str(tmp_path)], str(tmp_path / "run.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(FileNotFoundError, match=r"is .* a run directory"):
    plot_runs([str(tmp_path / "tb")], str(tmp_path / "no.png"))
  older = tmp_path / "older_run"  # rows without the routing metrics (a run logged before they existed): blank panels
  older.mkdir()
  (older / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 5.0 - i}) + "\n" for i in (1, 2)))
  assert os.path.exists(plot_runs([str(tmp_path), str(older)], str(tmp_path / "both.png")))
  # Per-layer and per-expert routing figures reach TensorBoard as well as metrics.jsonl.
  board = tensorboard_scalars(tmp_path / "tb")
  assert {"loss", "router_entropy/layer1", "expert_load/layer1/expert3"} <= set(board)


def test_overrides_and_json_round_trip(tmp_path):
  cfg = override(get_experiment("tiny"), ["optimizer.lr=1e-3", "model.attention.num_heads=8", "data.paths=('a', 'b')",
                                          "balancing.mode=aux_loss", "step.grad_accum=2", "loop.steps=7"])
  assert cfg.optimizer.lr == 1e-3 and cfg.model.attention.num_heads == 8 and cfg.data.paths == ("a", "b")
  assert override(cfg, ["optimizer.lr=1"]).optimizer.lr == 1.0  # an int is a float
  shell = override(cfg, ["loop.async_checkpointing=false", "data.paths=/my/corpus"])  # as typed in a shell
  assert shell.loop.async_checkpointing is False and shell.data.paths == ("/my/corpus",)
  listed = override(cfg, ["data.paths=/a, /b", "model.attention.sliding_window=16",
                          "model.layer_types=hybrid,hybrid_sliding"])
  assert listed.data.paths == ("/a", "/b") and listed.model.layer_types == ("hybrid", "hybrid_sliding")
  assert override(listed, ["model.layer_types="]).model.layer_types == ()
  with pytest.raises(ValueError, match=r"data.paths.*empty item"):
    override(cfg, ["data.paths=/a,,/b"])
  save_json(cfg, tmp_path / "c.json")
  assert load_json(tmp_path / "c.json") == cfg
  with pytest.raises(ValueError, match=r"BalancingConfig\.mode"):
    override(cfg, ["balancing.mode=sometimes"])
  with pytest.raises(ValueError, match=r"loop.steps.*'many' is not of type int \(that of LoopConfig.steps\)"):
    override(cfg, ["loop.steps=many"])
  with pytest.raises(ValueError, match="unknown experiment config 'huge'"):
    get_experiment("huge")
  assert isinstance(get_experiment("zaya1_8b"), ExperimentConfig)
  # None for optional fields, and a tuple in a union field, which JSON stores as a list and must give back a tuple.
  cfg = override(get_experiment("tiny"), ["data.default_corpus_bytes=None", "model.attention.sliding_window=None",
                                          "loop.init_from=None", "model.eos_token_id=(1, 2)"])
  assert cfg.data.default_corpus_bytes is None and cfg.model.attention.sliding_window is None
  assert cfg.model.eos_token_id == (1, 2)
  save_json(cfg, tmp_path / "union.json")
  assert load_json(tmp_path / "union.json") == cfg


def test_gradient_accumulation_matches_one_batch():
  # The second micro-batch has fewer scored tokens (padding from position 20 in rows 4-7): the accumulated step must
  # still be the whole batch's token mean, not a mean of micro-batch means. Padding tokens count nowhere.
  cfg = ZayaConfig.tiny(vocab_size=512)
  model = ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 512, (8, 33))
  segments = np.repeat(np.array([[1] * 17 + [2] * 15]), 8, axis=0)
  segments[4:, 20:] = 0
  batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=segments, loss_mask=(segments > 0))
  batch = {k: jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32) for k, v in batch.items()}
  repadded = dict(batch, input_ids=batch["input_ids"].at[4:, 25:].set(7), targets=batch["targets"].at[4:, 25:].set(9))
  z_weight = 1e-3
  results = []
  for accum, data in ((1, batch), (2, batch), (1, repadded)):
    trainer, state = train_step_lib.create(model, OptimizerConfig(lr=3e-3, warmup_steps=10),
                                           train_step_lib.StepConfig(accum, z_loss_weight=z_weight),
                                           BalancingConfig(mode="none"), 250, 0)
    results.append(train_step_lib.jit_train_step(trainer, state, data))
  (s1, m1), (s2, m2), (s3, m3) = results
  # The loss terms against a float64 computation on the host from the model's logits.
  logits_BTV = np.asarray(model(batch["input_ids"], batch["segment_ids"]).logits_BTV, np.float64)
  lse_BT = np.log(np.exp(logits_BTV - logits_BTV.max(-1, keepdims=True)).sum(-1)) + logits_BTV.max(-1)
  target_BT = np.take_along_axis(logits_BTV, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask_BT = np.asarray(batch["loss_mask"], np.float64)
  ce, z = ((lse_BT - target_BT) * mask_BT).sum() / mask_BT.sum(), (lse_BT**2 * mask_BT).sum() / mask_BT.sum()
  np.testing.assert_allclose([m1["ce_loss"], m1["z_loss"], m1["loss"]], [ce, z, ce + z_weight * z], rtol=1e-5)
  for m, s in ((m2, s2), (m3, s3)):
    np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s.params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(m["expert_load"], m1["expert_load"])  # the controller sees the batch's tokens


def _infinite_loss(model, out, micro):
  del out, micro
  return jnp.inf + 0.0 * jnp.sum(model.model.norm.weight[...])


def _nan_gradient(model, out, micro):
  """0 at the start (norm weights are 1), with a NaN gradient: |w - 1| has slope 0 where sqrt's is infinite."""
  del out, micro
  return jnp.sum(jnp.sqrt(jnp.abs(model.model.norm.weight[...] - 1.0)))


@pytest.mark.parametrize("extra", [_infinite_loss, _nan_gradient])
def test_a_non_finite_step_leaves_the_state_as_it_was(extra):
  # The loop's test above stops either way; here the step itself must hand back its input state, bit for bit.
  model = ZayaForCausalLM(ZayaConfig.tiny(vocab_size=512), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(1).integers(0, 512, (4, 17))
  batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((4, 16)), loss_mask=np.ones((4, 16)))
  batch = {k: jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32) for k, v in batch.items()}
  trainer, state = train_step_lib.create(model, OptimizerConfig(), train_step_lib.StepConfig(), BalancingConfig(),
                                         10, 0)
  trainer = dataclasses.replace(trainer, extra_loss=extra)
  before = jax.tree.map(np.asarray, state)
  state, metrics = train_step_lib.jit_train_step(trainer, state, batch)
  assert not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def _norm_weight_penalty(model, out, micro):
  """An extra loss for the hook's test: independent of the data, so any micro-batch split sums to the same."""
  del out, micro
  return 500.0 * jnp.sum(model.model.norm.weight[...] ** 2)


def test_extra_loss_hook_adds_its_term_and_gradient():
  cfg = ZayaConfig.tiny(vocab_size=512)
  model = ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(1).integers(0, 512, (4, 17))
  batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((4, 16)), loss_mask=np.ones((4, 16)))
  batch = {k: jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32) for k, v in batch.items()}
  rows = {}
  for accum, extra in ((1, None), (1, _norm_weight_penalty), (2, _norm_weight_penalty)):
    trainer, state = train_step_lib.create(model, OptimizerConfig(), train_step_lib.StepConfig(accum),
                                           BalancingConfig(mode="none"), 10, 0)
    trainer = dataclasses.replace(trainer, extra_loss=extra)
    state, rows[accum, extra] = train_step_lib.jit_train_step(trainer, state, batch)
    kept = trainer.model_of(state)
    state, _ = train_step_lib.jit_train_step(trainer, state, batch)  # donates the state's arrays
    assert np.isfinite(np.asarray(kept.model.norm.weight[...])).all()  # the copy outlives them
  plain, with_extra, accumulated = rows.values()
  assert "extra_loss" not in plain
  np.testing.assert_allclose(with_extra["extra_loss"], 500.0 * 64, rtol=1e-6)  # norm weights start at 1
  np.testing.assert_allclose(with_extra["loss"], plain["loss"] + 500.0 * 64, rtol=1e-6)
  # Its gradient, 1000 * weight on the 64 norm weights, dominates the step's: norm 1000 * 8.
  np.testing.assert_allclose(with_extra["grad_norm"], 8000.0, rtol=1e-3)
  for name in ("loss", "extra_loss", "grad_norm"):  # split into two micro-batches: the same step
    np.testing.assert_allclose(accumulated[name], with_extra[name], rtol=1e-5)


def run_two_processes(env, workdir, corpus, port, rank1_options=(), timeout=240) -> list[str]:
  """One launch of a two-process run (each with 2 CPU devices): data:2 within a process x data:2 across the two, with
  ZeRO-1. Returns the two logs; a process still running when the other failed is killed."""
  env = {**env, "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}
  options = ["set=parallel.mesh=data:2", "set=parallel.dcn_mesh=data:2", "set=parallel.zero1=True"]
  procs = [start(env, workdir, corpus, 2 * N, N, f"process={rank}/2@{port}", *options,
                 *(rank1_options if rank == 1 else ())) for rank in range(2)]
  try:
    logs = [finish(p, timeout)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  return logs


def test_two_processes_preempt_together_resume_and_train_like_one_device(tmp_path, corpus, env, straight, free_port):
  """A multi-host launch through the loop (jax.distributed over localhost): SIGTERM reaches only process 1, yet both
  save the same step and exit cleanly (before, process 1 saved alone and the next collective aborted both); the
  relaunch resumes both, and every loss follows the one-device straight run. Process 0 alone writes the metrics. Then
  the run is loaded for inference and resumed on one device (it was saved from four, by two processes)."""
  logs = run_two_processes(env, tmp_path, corpus, free_port, ["sigterm_after=3"])
  assert all("mesh data:4,fsdp:1,expert:1,tensor:1 + zero1 over 4 devices in 2 process(es)" in log for log in logs)
  saved = [int(line.split()[3]) for log in logs for line in log.splitlines() if line.startswith("SIGTERM: saved step")]
  assert len(saved) == 2 and saved[0] == saved[1] and 3 < saved[0] < 2 * N, logs[1][-2000:]
  logs = run_two_processes(env, tmp_path, corpus, free_port)
  assert all(f"resumed from {tmp_path / 'checkpoints' / str(saved[0])}" in log for log in logs), logs[0][-2000:]
  rows_one, rows_mesh = metrics(straight[0]), metrics(tmp_path)
  assert [r["step"] for r in rows_mesh] == [*range(1, 2 * N + 1), 2 * N]  # one writer; every step once, then eval
  for a, b in zip(rows_one, rows_mesh):
    key = "loss" if "loss" in a else "eval_loss"
    assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a, b)
  # The cluster's run on one device: loaded for inference exactly as trained, and resumed (it was saved on 4).
  model, _, _ = load_run(tmp_path)
  trained = np.load(tmp_path / "final_params.npz")  # process 0's copy of the final state
  loaded = {k: np.asarray(v[...]) for k, v in flat_params(model).items()}
  assert sorted(loaded) == sorted(trained.files)
  for key in trained.files:
    np.testing.assert_array_equal(loaded[key], trained[key], err_msg=key)
  # Resumed by one process: the data position of two hosts is that of any host count, so the next steps follow the
  # straight run's own extension.
  longer = small_config(corpus, 2 * N + 2, N)
  result = train(longer, tmp_path, log=lambda _: None)
  assert (result.resumed_from, result.final_step) == (2 * N, 2 * N + 2)
  shutil.copytree(straight[0], tmp_path / "one")
  train(longer, tmp_path / "one", log=lambda _: None)
  extended = [metrics(d)[len(rows_one):] for d in (tmp_path / "one", tmp_path)]
  assert [r["step"] for r in extended[1]] == [2 * N + 1, 2 * N + 2, 2 * N + 2]
  for a, b in zip(*extended):
    key = "loss" if "loss" in a else "eval_loss"
    assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a, b)


def test_several_processes_without_a_mesh_are_refused(tmp_path, corpus, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # as after jax.distributed.initialize on two hosts
  with pytest.raises(ValueError, match=r"2 processes but no mesh.* --mesh=data:-1 --dcn_mesh=data:2"):
    train(small_config(corpus, 2, 2), tmp_path / "run")
  assert not (tmp_path / "run").exists()  # refused before anything is written
