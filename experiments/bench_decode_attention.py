"""The flash-decoding kernel (pallas_kernels.decode_attention) on a GPU: compiled correctness at every BLOCK_CONFIGS
entry, then one decode step's attention against the XLA path the model would otherwise take
(zaya_jax.ops.attention.cached_attention, backend "xla"), both reading the decode cache in its layout.

B rows, S cache length, H query heads, K kv heads, E head dim. Rows have ragged lengths (S/2 to S), so the kernel's
loop bounds, not masks, decide what it reads; bandwidth counts only the visible keys and values (what a step must
read) against the card's peak.

  python -m experiments.bench_decode_attention --out=experiments/results/bench_decode_attention_<card>.json  # GPU
  python -m experiments.bench_decode_attention --quick   # interpret mode on CPU: a smoke run of the script
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import median_seconds, quiet_library_logging, rel_err, write_json
from pallas_kernels import decode_attention as da
from zaya_jax.ops.attention import cached_attention

warnings.simplefilter("ignore", DeprecationWarning)  # the Pallas Triton backend's, on every pallas_call

flags.DEFINE_list("shapes", ["16x4096", "16x32768", "64x8192", "16x32768:win4096"],
                  "BxS[:winW] timing shapes (bf16, H=8, K=2, E=128: ZAYA1-8B's attention).")
flags.DEFINE_bool("quick", False, "CPU smoke run: interpret mode, 2x256, no timing of the XLA path's large shapes.")
flags.DEFINE_string("out", None, "Results JSON.")
FLAGS = flags.FLAGS
H, K, E = 8, 2, 128


def inputs(seed, B, S, dtype):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, H, E)), dtype)
  k = jnp.asarray(rng.standard_normal((B, K, E, S)), dtype)
  v = jnp.asarray(rng.standard_normal((B, K, S, E)), dtype)
  lengths = jnp.asarray(rng.integers(S // 2, S + 1, B), jnp.int32)
  return q, k, v, lengths


def bench(f, *args):
  return median_seconds(f, *args, reps=20) * 1e3


def parse_shape(spec):
  size, _, extra = spec.partition(":")
  B, S = map(int, size.split("x"))
  return B, S, int(extra[3:]) if extra.startswith("win") else None


def kernel_fn(config, window, interpret):
  block_k, num_splits, num_warps, num_stages = config
  return jax.jit(lambda q, k, v, lengths: da.decode_attention(
    q, k, v, lengths, sliding_window=window, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
    num_stages=num_stages, interpret=interpret))


def xla_fn(window):
  # The model's XLA decode path: one query per row at position lengths - 1.
  return jax.jit(lambda q, k, v, lengths: cached_attention(
    q[:, None], k, v, (lengths - 1)[:, None], sliding_window=window, backend="xla")[:, 0])


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  interpret = jax.default_backend() == "cpu"
  if interpret and not FLAGS.quick:
    raise SystemExit("no GPU here: run with --quick for an interpret-mode smoke run")
  dev = jax.devices()[0]
  res = dict(device=dev.device_kind, jax=jax.__version__, default_config=da.default_block_config(),
             correctness=[], timing=[])
  print(res["device"], res["jax"], "default", res["default_config"], flush=True)

  for config in da.BLOCK_CONFIGS:
    for dtype, window in ((jnp.float32, None), (jnp.bfloat16, 100), (jnp.bfloat16, None)):
      q, k, v, lengths = inputs(0, 3, 333, dtype)
      row = dict(config=config, dtype=jnp.dtype(dtype).name, window=window)
      try:
        out = kernel_fn(config, window, interpret)(q, k, v, lengths)
      except Exception as e:  # a config that does not fit is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      else:
        row["rel_err"] = rel_err(out, da.decode_attention_reference(q, k, v, lengths, sliding_window=window))
      res["correctness"].append(row)
      print(row, flush=True)

  for B, S, window in map(parse_shape, ["2x256"] if FLAGS.quick else FLAGS.shapes):
    q, k, v, lengths = inputs(1, B, S, jnp.bfloat16)
    visible = np.minimum(np.asarray(lengths), window or S)
    read_bytes = int(visible.sum()) * K * E * 2 * 2  # keys and values, bf16
    row = dict(B=B, S=S, window=window, visible_cache_bytes=read_bytes, xla_ms=bench(xla_fn(window), q, k, v, lengths))
    row["xla_GBps"] = read_bytes / row["xla_ms"] / 1e6
    for config in da.BLOCK_CONFIGS:
      try:
        ms = bench(kernel_fn(config, window, interpret), q, k, v, lengths)
      except Exception as e:
        row[f"pallas{config}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        continue
      row[f"pallas{config}_ms"] = ms
      row[f"pallas{config}_GBps"] = read_bytes / ms / 1e6
      row[f"pallas{config}_speedup_vs_xla"] = row["xla_ms"] / ms
    res["timing"].append(row)
    print(row, flush=True)

  if FLAGS.out:
    write_json(FLAGS.out, res)


if __name__ == "__main__":
  app.run(main)
