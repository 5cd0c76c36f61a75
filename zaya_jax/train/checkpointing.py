"""Run checkpoints with Orbax: the train state, the data iterator and the model config, saved together per step.

Layout of a run directory's `checkpoints/`: one folder per step, written by Orbax's CheckpointManager (async by
default). Orbax writes a step into a temporary folder and renames it only once every part is on disk, and lists only
finished steps, so a save interrupted by a crash (even `kill -9` mid-write) is never picked up: the run resumes from
the previous complete step.

Each step holds `state` (the TrainState pytree), `data` (the grain iterator's position, one file per process) and
`meta` (JSON: the step, the model config and the parameter layout), which is read first so that a checkpoint of
another model fails with a message naming the differing fields rather than a shape error from deep inside Orbax.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from zaya_jax.checkpoint.hf import CheckpointError
from zaya_jax.config import ZayaConfig
from zaya_jax.sharding import with_shardings
from zaya_jax.train.data import DATA_ORDER
from zaya_jax.train.experiment import changed_settings, jsonable, setting_at

# Bumped when a parameter's stored layout changes. 2: gate_up_proj rows interleaved (model/moe.py); the runs before
# (no "param_layout" in their meta) stored the reference's gate-then-up halves.
PARAM_LAYOUT = 2
# Model-config fields a resume may change: how the step computes, not what (remat recomputes the same values).
RESUMABLE_CHANGES = frozenset({"remat"})


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record `RunCheckpointer.save` keeps beside a step's arrays (raises what Orbax raises)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _check_model(meta: dict, model_config: ZayaConfig, where: str) -> None:
  """Refuses a model the checkpoint was not written for, naming each differing setting (dotted) with both values."""
  saved = meta.get("model_config", {})
  if not saved:  # a checkpoint from before model configs were kept
    return
  # A field newer than the checkpoint was, in effect, at its default when it was written.
  saved = jsonable({**dataclasses.asdict(ZayaConfig()), **saved})
  current = jsonable(dataclasses.asdict(model_config))
  differing = []
  for name in changed_settings(saved, current):
    if name.split(".")[0] in RESUMABLE_CHANGES:
      continue
    differing.append(f"{name}: checkpoint {setting_at(saved, name)!r} vs run {setting_at(current, name)!r}")
  if differing:
    raise CheckpointError(f"checkpoint {where} was written for another model ({', '.join(sorted(differing))}); start "
                          "a new workdir, or relaunch with the checkpoint's model (launch/train.py without --config "
                          "continues from the workdir's config.json)")


def check_latest_model(workdir: str | os.PathLike, model_config: ZayaConfig) -> None:
  """`restore`'s model check against the run's latest complete checkpoint, from its metadata alone: a launch makes
  it before preparing data. Nothing to check (no checkpoint, unreadable metadata) is left to the restore to report."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  manager = _read_only_manager(os.path.abspath(os.fspath(workdir)))
  try:
    step = manager.latest_step()
    if step is None:
      return
    try:
      meta = _read_meta(manager, step)
    except Exception:  # Orbax raises many types for unreadable folders; the restore names the problem
      return
  finally:
    manager.close()
  _check_model(meta, model_config, os.path.join(os.fspath(manager.directory), str(step)))


def _check_layout(meta: dict, where: str) -> None:
  if meta.get("param_layout", 1) != PARAM_LAYOUT:
    raise CheckpointError(f"checkpoint {where} stores parameters in layout {meta.get('param_layout', 1)}, this "
                          f"zaya_jax reads layout {PARAM_LAYOUT} (expert gate_up_proj rows interleaved since "
                          "2026-11-28); restore it with the zaya_jax that wrote it and export it with save_hf")


class RunCheckpointer:
  """Saves and restores (state, data iterator) at steps of a run; a context manager that waits for writes on exit."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, max_to_keep: int, use_async: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    # Orbax's default policy also saves the first step it sees, which then holds one of the max_to_keep slots (a
    # whole train state right after step 1): every save_every steps, plus the forced saves (last step, preemption).
    policy = ocp.checkpoint_managers.AnySavePolicy([ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                                                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_decision_policy=policy,
                                           enable_async_checkpointing=use_async, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, model_config: ZayaConfig, *, force: bool = False,
           data_fingerprint: str | None = None, run_config: dict | None = None) -> bool:
    """Starts saving (returns once the arrays are copied off the device); False when the interval skips the step.
    `data_fingerprint` (CorpusInfo.fingerprint) lets a resume tell whether the corpus it continues is the same.
    `run_config` (the resolved experiment config as a dict) is kept with the step: the workdir's config.json is the
    latest launch's, and a resume may change settings, so only this tells what trained up to each step."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave({"step": int(step), "model_config": dataclasses.asdict(model_config),
                                "param_layout": PARAM_LAYOUT, "data_fingerprint": data_fingerprint,
                                "data_order": DATA_ORDER, "run_config": run_config}))
    return self.manager.save(step, args=args, force=force)

  def meta(self, step: int) -> dict:
    """What the checkpoint at `step` records besides the arrays: step, model config, layout, data fingerprint and
    order (data.DATA_ORDER; absent before it existed), and the run's resolved config (absent before it was kept)."""
    try:
      return _read_meta(self.manager, step)
    except Exception as e:  # Orbax raises many types for unreadable folders
      raise CheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} is unreadable: "
                            f"{type(e).__name__}: {e}{self._earlier_steps_hint(step)}") from e

  def _earlier_steps_hint(self, step: int) -> str:
    """How to fall back from a damaged step to the complete ones before it (none: no hint)."""
    earlier = [s for s in self.all_steps() if s < step]
    if not earlier:
      return ""
    return (f"\nif its files are damaged: move {os.path.join(self.directory, str(step))} out of the workdir and the "
            f"run resumes from step {earlier[-1]} (complete checkpoints before it: {', '.join(map(str, earlier))})")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, data_iter, model_config: ZayaConfig):
    """The state saved at `step` (shaped and sharded like `abstract_state`); moves `data_iter` to its position."""
    where = os.path.join(self.directory, str(step))
    meta = self.meta(step)
    _check_layout(meta, where)
    _check_model(meta, model_config, where)
    saved_position = _saved_data_position(where)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      detail = str(e) if len(str(e)) <= 600 else str(e)[:600] + " ..."  # Orbax dumps whole tree diffs
      raise CheckpointError(f"checkpoint {where} cannot be restored into this run's state (another optimizer or "
                            f"train-state layout?): {type(e).__name__}: {detail}"
                            f"{self._earlier_steps_hint(step)}") from e
    data_iter.set_state(as_saved_by_grain(saved_position))
    return restored["state"]


def _saved_data_position(where: str) -> dict:
  """The data-iterator state the checkpoint saved (grain's process_<i>-of-<n>.json, as JSON reads it back).

  Every host runs the same pipeline and keeps its own block of each global batch (data.py), so all hosts' files hold
  one and the same position, and it is the position of any host count: a run resumes exactly on more or fewer hosts,
  or on one. This process's own file is read when there is one.
  """
  folder = os.path.join(where, "data")
  own = os.path.join(folder, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
  saved = [own] if os.path.exists(own) else sorted(glob.glob(os.path.join(folder, "process_*-of-*.json")))
  if not saved:
    raise CheckpointError(f"checkpoint {where} holds no data-iterator position ({folder} has no process_*.json)")
  positions = []
  for path in saved:
    with open(path) as f:
      positions.append(json.load(f))
  if any(p != positions[0] for p in positions[1:]):
    raise CheckpointError(f"checkpoint {where}: its {len(saved)} processes saved different data positions, so it "
                          f"resumes only with {len(saved)} processes")
  return positions[0]


def as_saved_by_grain(position):
  """A data-iterator state read back from JSON, with the tuples grain wrote restored.

  grain's packer (concat-then-split) keeps `remainder_slices` as (start, stop) tuples and tests them against the
  tuple (-1, -1) ("no remainder"); JSON gives lists back, which never equal it, so a position saved where a document
  had just ended made the restored packer slice an empty remainder out of the next document, which was then lost
  (grain's own CheckpointRestore reads the file the same way). Every such pair becomes a tuple again.
  """
  if isinstance(position, dict):
    return {k: ({f: tuple(v) for f, v in value.items()} if k == "remainder_slices" and isinstance(value, dict)
                else as_saved_by_grain(value)) for k, value in position.items()}
  if isinstance(position, list):
    return [as_saved_by_grain(v) for v in position]
  return position


def on_one_device(abstract_state):
  """The restore target of a run without a mesh: every array on this process's first device. Without a sharding,
  Orbax restores onto the devices the checkpoint was saved from, and refuses ("Topology mismatch") a run saved on a
  mesh of more devices than this process has."""
  one = SingleDeviceSharding(jax.local_devices()[0])
  return with_shardings(abstract_state, jax.tree.map(lambda _: one, abstract_state))


def _not_the_read_only_notice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Given directory is read only")


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  if not os.path.isdir(workdir):  # a mistyped path would otherwise read as a run without checkpoints
    raise CheckpointError(f"{workdir}: no such run directory" if not os.path.exists(workdir)
                          else f"{workdir} is not a directory")
  # Orbax warns that a read-only manager is read-only on every load_run; here that is the point, not news.
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_not_the_read_only_notice)
  try:
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False))
  finally:
    absl_logger.removeFilter(_not_the_read_only_notice)


def _complete_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """`step`, or the latest, if the run holds it complete (a half-written one is never listed); else CheckpointError
  naming the steps it has."""
  steps = sorted(manager.all_steps())
  if step is None and steps:
    return steps[-1]
  if step is None or step not in steps:
    have = f" (it has {', '.join(map(str, steps))})" if steps else ""
    raise CheckpointError(f"{os.fspath(manager.directory)} holds no complete checkpoint"
                          + ("" if step is None else f" at step {step}") + have)
  return step


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether the run directory holds a complete checkpoint (what a launch there resumes from)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False
  manager = _read_only_manager(os.path.abspath(os.fspath(workdir)))
  try:
    return manager.latest_step() is not None
  finally:
    manager.close()


def resolve_step(workdir: str | os.PathLike, step: int | None = None) -> int:
  """The checkpoint step `load_run(workdir, step)` would load, found without reading it."""
  manager = _read_only_manager(os.path.abspath(os.fspath(workdir)))
  try:
    return _complete_step(manager, step)
  finally:
    manager.close()


def load_run(workdir: str | os.PathLike, step: int | None = None):
  """(model, tokenizer or None, ExperimentConfig) from a run directory's latest (or given) complete checkpoint.

  For inference and export: the model carries the trained parameters and balancing biases in the run's dtypes.
  Only those are read (a partial restore): the optimizer moments, twice the parameters' size, stay on disk.
  """
  from zaya_jax.tokenizer import load_tokenizer
  from zaya_jax.train import step as train_step_lib
  from zaya_jax.train.experiment import load_json

  workdir = os.path.abspath(os.fspath(workdir))
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{workdir} is not a run directory: it has no config.json")
  cfg = load_json(config_path)
  trainer, abstract_state = train_step_lib.create_abstract(cfg.model, cfg.optimizer, cfg.step, cfg.balancing,
                                                           cfg.loop.steps, cfg.loop.seed)
  manager = _read_only_manager(workdir)
  try:
    step = _complete_step(manager, step)
    where = os.path.join(os.fspath(manager.directory), str(step))
    try:
      meta = _read_meta(manager, step)
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} is unreadable: {type(e).__name__}: {e}") from e
    _check_layout(meta, where)
    target = on_one_device(abstract_state)
    target = {"params": target.params, "biases": target.biases}
    try:
      restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                       partial_restore=True)
      state = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} cannot be restored: "
                            f"{type(e).__name__}: {e}") from e
  finally:
    manager.close()
  tokenizer_path = os.path.join(workdir, "tokenizer.json")
  tokenizer = load_tokenizer(tokenizer_path) if os.path.exists(tokenizer_path) else None
  return trainer.merge(state["params"], state["biases"]), tokenizer, cfg
