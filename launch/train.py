"""Pretraining from the command line: a registered experiment config, overridden field by field.

  python launch/train.py --config=tiny --workdir=runs/tiny
  python launch/train.py --config=tiny --workdir=runs/tiny2 --set=optimizer.lr=1e-3 --set=model.num_layers=4 \\
      --steps=500 --data=/path/to/texts --tokenizer=/path/to/tokenizer.json
  python launch/train.py --config=zaya1_8b --init_from=/ckpt/ZAYA1-8B --workdir=runs/cpt --data=/my/texts \\
      --set=optimizer.lr=3e-5 --mesh=fsdp:8                    # continued training of a Hugging Face checkpoint
  python launch/train.py --list_configs
  python launch/train.py --workdir=runs/tiny2 --steps=1000      # a rerun: the run's own settings, then these flags

Multi-host: launch/cluster/ (SLURM or one command per node), or --coordinator_address/--num_processes/--process_id.
A workdir that holds checkpoints is resumed from its latest complete one. SIGTERM saves and exits 0. Errors in the
input (paths, configs, checkpoints, a non-finite loss) print one message and exit 1.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging

from zaya_jax import host_memory
from zaya_jax.checkpoint.hf import CheckpointError
from zaya_jax.parallel import distributed
from zaya_jax.sharding import ShardingError
from zaya_jax.train.experiment import experiment_names, from_hf_checkpoint, get_experiment, load_json, override
from zaya_jax.train.loop import TrainingError, check_workdir, train

_CONFIG = flags.DEFINE_string("config", "tiny", "Registered experiment config (see --list_configs). Left out in a "
                              "workdir that has a config.json, the run's own settings are the base instead.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config, tokenizer.")
_SET = flags.DEFINE_multi_string("set", [], "Override a config field: --set=optimizer.lr=3e-4 (repeatable).")
_STEPS = flags.DEFINE_integer("steps", None, "Shorthand for --set=loop.steps=N.")
_SEED = flags.DEFINE_integer("seed", None, "Shorthand for --set=loop.seed=N (parameters and step key; the data "
                             "order has its own seed: --set=data.seed=N).")
_DATA = flags.DEFINE_list("data", None, "Text files/folders/globs or .array_record files (default: embedded corpus).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A Hugging Face tokenizer.json (default: train a BPE on text; "
                                 "shards from launch/pretokenize.py bring their own).")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,fsdp:2,expert:2,tensor:1 (one axis may be -1); "
                            "shorthand for --set=parallel.mesh=... Default: one device, no mesh.")
_DCN_MESH = flags.DEFINE_string("dcn_mesh", None, "The cross-host part of each axis, e.g. data:16 for 16 nodes.")
_ZERO1 = flags.DEFINE_bool("zero1", None, "Shard the optimizer state over the data axis (ZeRO-1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0. Default: the "
                                   "ZAYA_* variables of launch/cluster/launch_multinode.sh, or SLURM's.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the run (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index (with --coordinator_address).")
_INIT_FROM = flags.DEFINE_string("init_from", None, "A Hugging Face folder (e.g. ZAYA1-8B) to continue training: "
                                 "its architecture, weights and tokenizer; --config gives the rest (dtypes, data, "
                                 "optimizer, ...). Read at the first launch; later ones resume the run.")
_LIST = flags.DEFINE_bool("list_configs", False, "Print the registered configs and exit.")


def main(argv):
  del argv
  host_memory.retain_freed_memory()  # XLA:CPU's step temporaries stay mapped between steps (zaya_jax/host_memory.py)
  if not flags.FLAGS["verbosity"].present:  # Orbax and grain log every save at INFO: keep the progress lines readable
    logging.set_verbosity(logging.WARNING)
  if _LIST.value:
    print("\n".join(experiment_names()))
    return 0
  if not _WORKDIR.value or not _WORKDIR.value.strip():
    print("error: --workdir is required (got an empty or blank one)", file=sys.stderr)
    return 1
  # An empty --data= or --tokenizer= (an unset shell variable) would silently mean the built-in corpus and a freshly
  # trained tokenizer.
  for flag in (_DATA, _TOKENIZER):
    if flag.value is not None and not "".join(flag.value).strip():
      print(f"error: --{flag.name} is empty; leave it out for the default", file=sys.stderr)
      return 1
  assignments = list(_SET.value)
  if _STEPS.value is not None:
    assignments.append(f"loop.steps={_STEPS.value}")
  if _SEED.value is not None:
    assignments.append(f"loop.seed={_SEED.value}")
  if _DATA.value is not None:
    assignments.append(f"data.paths={tuple(_DATA.value)!r}")
  if _TOKENIZER.value is not None:
    assignments.append(f"data.tokenizer={_TOKENIZER.value!r}")
  for field, value in (("mesh", _MESH.value), ("dcn_mesh", _DCN_MESH.value), ("zero1", _ZERO1.value)):
    if value is not None:
      assignments.append(f"parallel.{field}={value!r}")
  try:
    # Multi-host: join the other processes (flags, ZAYA_* or SLURM) before any device is touched.
    given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    source = distributed.initialize(None if given == (None, None, None) else distributed.DistributedConfig(*given))
    if jax.process_count() > 1:
      print(f"process {jax.process_index()} of {jax.process_count()} ({source})")
    saved = os.path.join(_WORKDIR.value, "config.json")
    check_workdir(_WORKDIR.value)  # not a file or a Hugging Face folder, before its config.json is read as a run's
    if not flags.FLAGS["config"].present and os.path.isfile(saved):
      # A rerun without --config goes on with the run's own settings (the flags given now still override them),
      # not with the default preset's, which would change every setting the first launch had overridden.
      cfg = load_json(saved)
      print(f"settings from {saved} (pass --config to start from a registered config instead)")
    else:
      cfg = get_experiment(_CONFIG.value)
    if _INIT_FROM.value is not None:  # before the overrides, so that --set can still change how the model runs
      cfg = from_hf_checkpoint(cfg, _INIT_FROM.value)
    cfg = override(cfg, assignments)
    result = train(cfg, _WORKDIR.value)
  except (ValueError, OSError, CheckpointError, TrainingError, ShardingError) as e:  # OSError: e.g. a file as --workdir
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"done: step {result.final_step}" + (" (preempted; rerun to resume)" if result.preempted else ""))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
