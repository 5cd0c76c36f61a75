"""Compiled memory of one train step per activation-memory setting: `model.remat` x `step.logits_chunk`.

XLA's own accounting of the compiled step on this process's first device (`memory_analysis()`: temporaries, i.e.
buffers other than arguments and outputs), nothing run: ZAYA1-8B's widths with a few layers, fp32 masters and bf16
compute, one micro-batch of `--batch` x `--seq` tokens, AdamW, compiled as training compiles it
(`train.step.train_step_program`: on CPU, with the option that keeps jax.checkpoint's recomputation out of the
forward pass; WORKSPACE.md). On a GPU it checks what GPU compilers keep. Needs neither grain nor a tokenizer (a lent
GPU machine has no grain).

  python -m experiments.step_memory                 # 4 layers, 1 x 4096 tokens, remat none/full/dots x chunk 0/1024
  python -m experiments.step_memory --quick         # the tiny model, 2 x 256 tokens: about a minute on 2 CPU cores
  python -m experiments.step_memory --time_steps=5  # also run each setting 5 times and report its step time
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.common import apply_quick, quiet_library_logging, write_json
from zaya_jax.config import ZayaConfig
from zaya_jax.ops import attention, gmm
from zaya_jax.train import step as step_lib
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.optim import OptimizerConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 4, "Decoder layers of the ZAYA1-8B-wide model.", lower_bound=1)
flags.DEFINE_integer("batch", 1, "Sequences in the micro-batch.", lower_bound=1)
flags.DEFINE_integer("seq", 4096, "Tokens per sequence.", lower_bound=1)
flags.DEFINE_list("remat", ["none", "full", "dots"], "model.remat settings to compile.")
flags.DEFINE_list("logits_chunk", ["0", "1024"], "step.logits_chunk settings to compile (0: whole logits).")
flags.DEFINE_integer("time_steps", 0, "Also run this many steps of each setting from a random state and report the "
                     "median step time (0: compile only, nothing allocated).", lower_bound=0)
flags.DEFINE_bool("quick", False, "The tiny model, 2 x 256 tokens, chunks 0 and 64 (explicit flags win).")
flags.DEFINE_string("out", None, "Results JSON (default experiments/results/step_memory_<platform>[_quick].json).")


def measure(model_cfg: ZayaConfig, step_cfg: step_lib.StepConfig, batch: int, seq: int, steps: int) -> dict:
  """The compiled step's memory; with steps > 0, also its median time over that many steps from a random state."""
  trainer, state = step_lib.create_abstract(model_cfg, OptimizerConfig(), step_cfg, BalancingConfig(), 10, 0)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  program = step_lib.train_step_program(jax.default_backend())
  compiled = program.lower(trainer, state, dict.fromkeys(step_lib.BATCH_KEYS, tokens)).compile()
  stats = compiled.memory_analysis()
  row = dict(temp_bytes=int(stats.temp_size_in_bytes), argument_bytes=int(stats.argument_size_in_bytes))
  if steps:
    _, state = step_lib.create_initialised(model_cfg, OptimizerConfig(), step_cfg, BalancingConfig(), 10, 0)
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, model_cfg.vocab_size, jnp.int32)
    data = dict(input_ids=ids, targets=jnp.roll(ids, -1, axis=1), segment_ids=jnp.ones_like(ids),
                loss_mask=jnp.ones_like(ids))
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
      start = time.perf_counter()
      state, metrics = compiled(state, data)
      float(metrics["loss"])  # waits for the step
      times.append(time.perf_counter() - start)
    row["step_ms"] = 1e3 * statistics.median(times[1:])
  return row


def main(argv):
  del argv
  quiet_library_logging()
  apply_quick({"batch": 2, "seq": 256, "logits_chunk": ["0", "64"]})
  try:
    chunks = [int(c) for c in FLAGS.logits_chunk]
  except ValueError:
    raise SystemExit(f"--logits_chunk: not integers: {FLAGS.logits_chunk}") from None
  base = (ZayaConfig.tiny() if FLAGS.quick else
          ZayaConfig.zaya1_8b(num_layers=FLAGS.layers, dtype="bfloat16", param_dtype="float32"))
  try:  # settings are checked before anything compiles
    settings = [(base.replace(remat=r), step_lib.StepConfig(logits_chunk=c))
                for r, c in itertools.product(FLAGS.remat, chunks)]
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  device = jax.devices()[0]
  print(f"{device.platform} ({device.device_kind}), jax {jax.__version__}: {base.num_layers} layers of hidden "
        f"{base.hidden_size}, vocab {base.vocab_size}, {FLAGS.batch} x {FLAGS.seq} tokens; backends attention "
        f"{attention.resolve_backend(base.attention.backend)}, experts {gmm.resolve_backend(base.moe.backend)}")
  timed = FLAGS.time_steps > 0
  print(f"{'remat':<6} {'chunk':>6} {'temporaries MiB':>16} {'vs first':>9}"
        + (f" {'step ms':>9} {'vs first':>9}" if timed else ""))
  rows = []
  for model_cfg, step_cfg in settings:
    row = dict(remat=model_cfg.remat, logits_chunk=step_cfg.logits_chunk,
               **measure(model_cfg, step_cfg, FLAGS.batch, FLAGS.seq, FLAGS.time_steps))
    rows.append(row)
    line = (f"{row['remat']:<6} {row['logits_chunk']:>6} {row['temp_bytes'] / 2**20:>16.1f} "
            f"{row['temp_bytes'] / rows[0]['temp_bytes']:>8.2f}x")
    if timed:
      line += f" {row['step_ms']:>9.1f} {row['step_ms'] / rows[0]['step_ms']:>8.2f}x"
    print(line, flush=True)
  default = f"experiments/results/step_memory_{device.platform}" + ("_quick" if FLAGS.quick else "") + ".json"
  write_json(FLAGS.out or default, dict(platform=device.platform, device_kind=device.device_kind, jax=jax.__version__,
                                        layers=base.num_layers, batch=FLAGS.batch, seq=FLAGS.seq, rows=rows,
                                        time_steps=FLAGS.time_steps,
                                        nproc=os.cpu_count()))


if __name__ == "__main__":
  app.run(main)
