"""How the PID balancing gain behaves over a few hundred steps: expert-load imbalance per window, per gain.

The tiny model trains on a few standard-library modules (the same set-up as tests/test_train.py's PID test) once per
gain and seed, plus once per seed with balancing off; for every window of steps it reports, per layer, the max/min
ratio of the experts' shares of the whole window's tokens (what the controller balances), the median of each step's
own max/min token-count ratio and the mean share of a step's busiest expert (balance within a batch, which needs
routers that tell tokens apart), and the mean loss. This is how `BalancingConfig.kp`'s default was chosen
(WORKSPACE.md has the reading). The seed sets the model's initialisation and the data order: routing trajectories
are chaotic, so one seed says little.

  python -m experiments.pid_gain_sweep                           # gains 1e-4,3e-4,1e-3,3e-3 and off, 800 steps
  python -m experiments.pid_gain_sweep --gains=1e-3 --steps=400 --seeds=0,1,2,3

Writes experiments/results/pid_gain_sweep.json (the settings, the commit, and every window's figures).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.common import git_commit, quiet_library_logging, write_json
from zaya_jax import host_memory
from zaya_jax.config import ZayaConfig
from zaya_jax.model.decoder import ZayaForCausalLM
from zaya_jax.train import step as train_step_lib
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.data import DataConfig, make_data
from zaya_jax.train.optim import OptimizerConfig

STDLIB_MODULES = ("argparse", "textwrap", "shutil", "glob", "fnmatch", "functools", "inspect", "dataclasses")

flags.DEFINE_list("gains", ["1e-4", "3e-4", "1e-3", "3e-3"], "PID proportional gains (BalancingConfig.kp) to run.")
flags.DEFINE_boolean("off", True, "Also run with balancing off.")
flags.DEFINE_integer("steps", 800, "Train steps per run.", lower_bound=1)
flags.DEFINE_integer("window", 50, "Steps per reported window.", lower_bound=1)
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("seq", 32, "Tokens per row.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (10 warm-up steps, then the default cosine decay).")
flags.DEFINE_list("seeds", ["0"], "Model and data seeds; every gain (and off) runs once per seed.")
flags.DEFINE_string("out", os.path.join("experiments", "results", "pid_gain_sweep.json"), "Result file.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing --out (the default one holds the committed sweep).")
FLAGS = flags.FLAGS


def run(data, balancing: BalancingConfig, seed: int) -> list[dict]:
  model = ZayaForCausalLM(ZayaConfig.tiny(vocab_size=512), rngs=nnx.Rngs(seed))
  trainer, state = train_step_lib.create(model, OptimizerConfig(lr=FLAGS.lr, warmup_steps=10),
                                         train_step_lib.StepConfig(), balancing, FLAGS.steps, seed)
  batches = iter(data.train)
  ratio, load, loss = [], [], []
  for _ in range(FLAGS.steps):
    state, m = train_step_lib.jit_train_step(trainer, state, {k: jnp.asarray(v) for k, v in next(batches).items()})
    ratio.append(np.asarray(m["load_max_over_min"]))
    load.append(np.asarray(m["expert_load"]))  # [L, X] shares of the step's routed tokens
    loss.append(float(m["loss"]))
  ratio, load = np.array(ratio, np.float64), np.array(load, np.float64)
  windows = []
  for w in range(0, FLAGS.steps, FLAGS.window):
    share_LX = load[w:w + FLAGS.window].mean(0)  # skip rate ~0, so each step weighs the same
    windows.append(dict(steps=[w, min(w + FLAGS.window, FLAGS.steps)],
                        window_max_over_min=(share_LX.max(1) / np.maximum(share_LX.min(1), 1e-3)).round(2).tolist(),
                        median_max_over_min=np.median(ratio[w:w + FLAGS.window], 0).round(2).tolist(),
                        mean_busiest_share=load[w:w + FLAGS.window].max(-1).mean(0).round(3).tolist(),
                        mean_loss=round(float(np.mean(loss[w:w + FLAGS.window])), 3)))
  return windows


def main(argv):
  del argv
  if os.path.exists(FLAGS.out) and not FLAGS.overwrite:  # before the runs: their results would have nowhere to go
    raise SystemExit(f"error: {FLAGS.out} exists (an earlier sweep's results; the default file is the repository's "
                     "committed sweep): pass --out=<another file>, or --overwrite to replace it")
  quiet_library_logging()
  # The runs' step temporaries stay mapped; 8x32-token steps keep asynchronous dispatch (zaya_jax/host_memory.py).
  host_memory.retain_freed_memory(calls_on_caller_thread=False)
  runs = [("pid", float(g)) for g in FLAGS.gains] + ([("none", 0.0)] if FLAGS.off else [])
  commit = git_commit()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    for name in STDLIB_MODULES:
      shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], f"{name}.py"), corpus)
    for seed in map(int, FLAGS.seeds):
      data = make_data(DataConfig(paths=(corpus,), seq_len=FLAGS.seq, batch_size=FLAGS.batch, vocab_size=512,
                                  eval_fraction=0.0, seed=seed), os.path.join(tmp, "run"), model_vocab_size=512)
      for mode, kp in runs:
        start = time.time()
        windows = run(data, BalancingConfig(mode=mode, kp=kp) if mode == "pid" else BalancingConfig(mode="none"), seed)
        label = f"pid kp={kp:g}" if mode == "pid" else "off"
        results.append(dict(label=label, mode=mode, kp=kp, seed=seed, seconds=round(time.time() - start, 1),
                            windows=windows))
        print(f"\n{label}, seed {seed} ({results[-1]['seconds']} s): steps, per layer: max/min of the window's expert "
              "shares, median of each step's max/min, busiest expert's share of a step; loss")
        for w in windows:
          print(f"  {w['steps'][0]:4d}-{w['steps'][1]:<4d} {w['window_max_over_min']}  {w['median_max_over_min']}  "
                f"{w['mean_busiest_share']}  {w['mean_loss']:.2f}")
  settings = {name: FLAGS[name].value for name in ("steps", "window", "batch", "seq", "lr", "seeds")}
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  write_json(FLAGS.out, dict(settings=settings, commit=commit, model="ZayaConfig.tiny(vocab_size=512)",
                             corpus=list(STDLIB_MODULES), runs=results))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
