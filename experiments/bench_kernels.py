"""Kernel benchmark: the Pallas-Triton kernels against the XLA paths and a dense matmul of the same FLOPs.

For each kernel and shape, in one run: correctness against the XLA path, then median time, TFLOP/s,
and the ratios ours / XLA and ours / dense. Expert shapes default to ZAYA1-8B's (16 experts,
2048 -> 2 x 2048 gate_up in PyTorch layout, 2048 -> 2048 down) over 8k-64k routed tokens.

  python -m experiments.bench_kernels                         # on a GPU (Triton path)
  python -m experiments.bench_kernels --quick                 # small shapes; CPU runs Pallas in interpret mode

Results go to experiments/results/bench_kernels_<device kind>.json.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import apply_quick, median_seconds, quiet_library_logging, write_json
from pallas_kernels.gmm import gmm as pallas_gmm
from pallas_kernels.tuning import GMM_TUNING, GmmBlocks, GmmTuning, device_kind
from zaya_jax.ops.gmm import gmm as xla_gmm

warnings.filterwarnings("ignore", category=DeprecationWarning)  # "the Pallas Triton backend is deprecated"

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["8192", "32768", "65536"], "Routed tokens M per expert matmul.")
flags.DEFINE_integer("experts", 16, "Experts G.")
flags.DEFINE_integer("hidden", 2048, "Hidden size D.")
flags.DEFINE_integer("ffn", 2048, "Expert FFN width F.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Operand dtype (accumulation is fp32).")
flags.DEFINE_list("xla_backends", ["ragged_dot"], "XLA grouped-matmul paths to compare against.")
flags.DEFINE_bool("backward", True, "Also time forward+backward (lhs and weight gradients).")
flags.DEFINE_integer("reps", 10, "Timed repetitions (median reported).", lower_bound=1)
flags.DEFINE_bool("quick", False, "Small shapes and 2 reps.")
flags.DEFINE_list("sweep", [], "Forward block configs to time at the largest M, as bm/bk/bn/warps/stages "
                  "(e.g. 128/64/256/8/3); the tuning table's entry is always included.")
flags.DEFINE_bool("rocm_report", True, "Print the static gfx942 report of the gmm kernels (needs the triton package) "
                  "and MI300X roofline times of each shape.")
flags.DEFINE_string("out", None, "Results JSON (default experiments/results/bench_kernels_<kind>.json).")


def group_sizes(M: int, G: int, seed: int) -> np.ndarray:
  """A realistic, mildly imbalanced top-1 routing: multinomial over experts with Dirichlet weights."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(M, rng.dirichlet(np.full(G, 8.0))).astype(np.int32)


def bench_gmm(M: int, K: int, N: int, G: int, transpose_rhs: bool, dtype, reps: int) -> dict:
  rng = np.random.default_rng(M + N)
  lhs = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
  rhs = jnp.asarray(rng.standard_normal((G, N, K) if transpose_rhs else (G, K, N), np.float32) / np.sqrt(K), dtype)
  gs = jnp.asarray(group_sizes(M, G, M))
  dense_w = jnp.asarray(rng.standard_normal((K, N), np.float32) / np.sqrt(K), dtype)
  flops = 2.0 * M * K * N
  candidates = {"pallas": jax.jit(lambda a, b, g: pallas_gmm(a, b, g, transpose_rhs))}
  for backend in FLAGS.xla_backends:
    candidates[backend] = jax.jit(lambda a, b, g, be=backend: xla_gmm(a, b, g, backend=be, transpose_rhs=transpose_rhs))
  row = {"M": M, "K": K, "N": N, "G": G, "transpose_rhs": transpose_rhs, "group_sizes": gs.tolist()}
  reference = candidates[FLAGS.xla_backends[0]](lhs, rhs, gs).astype(jnp.float32)
  got = candidates["pallas"](lhs, rhs, gs).astype(jnp.float32)
  row["rel_err_vs_xla"] = float(jnp.linalg.norm(got - reference) / jnp.linalg.norm(reference))
  dense = jax.jit(lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(dtype))
  row["dense_ms"] = 1e3 * median_seconds(dense, lhs, dense_w, reps=reps)
  for name, fn in candidates.items():
    row[f"{name}_ms"] = 1e3 * median_seconds(fn, lhs, rhs, gs, reps=reps)
  if FLAGS.backward:
    cot = jnp.asarray(rng.standard_normal((M, N), np.float32), dtype)
    def fwd_bwd(fn):
      return jax.jit(jax.grad(lambda a, b, g: jnp.sum((fn(a, b, g) * cot).astype(jnp.float32)), argnums=(0, 1)))
    dense_fb = fwd_bwd(lambda a, w, g: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(dtype))
    row["dense_fwd_bwd_ms"] = 1e3 * median_seconds(dense_fb, lhs, dense_w, gs, reps=reps)
    for name, fn in candidates.items():
      row[f"{name}_fwd_bwd_ms"] = 1e3 * median_seconds(fwd_bwd(fn), lhs, rhs, gs, reps=reps)
  row["tflops"] = {k[:-3]: flops / (v * 1e-3) / 1e12 * (3 if "fwd_bwd" in k else 1)
                   for k, v in row.items() if k.endswith("_ms")}
  return row


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  kind = device_kind()
  apply_quick(dict(reps=2, hidden=256, ffn=256, experts=4, tokens=["512"]))
  reps, D, F, G = FLAGS.reps, FLAGS.hidden, FLAGS.ffn, FLAGS.experts
  tokens = [int(t) for t in FLAGS.tokens]
  dtype = jnp.dtype(FLAGS.dtype)
  device = jax.devices()[0]
  print(f"device: {getattr(device, 'device_kind', device.platform)} (tuning '{kind}': {GMM_TUNING[kind]}), "
        f"jax {jax.__version__}, dtype {dtype.name}")
  rows = []
  header = (f"{'matmul':>10} {'M':>6} {'pallas ms':>9} {'xla ms':>8} {'dense ms':>8} {'TFLOP/s':>8} "
            f"{'vs xla':>7} {'vs dense':>8} {'fb vs xla':>9} {'fb vs dense':>11} {'rel err':>8}")
  print(header)
  for M in tokens:
    # gate_up: [G, 2F, D] (PyTorch layout, contracted on D); down: [G, D, F].
    for name, K, N in (("gate_up", D, 2 * F), ("down", F, D)):
      row = bench_gmm(M, K, N, G, True, dtype, reps)
      row["name"] = name
      rows.append(row)
      xla = FLAGS.xla_backends[0]
      fb = (f"{row[f'{xla}_fwd_bwd_ms'] / row['pallas_fwd_bwd_ms']:>8.2f}x "
            f"{row['dense_fwd_bwd_ms'] / row['pallas_fwd_bwd_ms']:>10.2f}x") if FLAGS.backward else ""
      print(f"{name:>10} {M:>6} {row['pallas_ms']:>9.3f} {row[f'{xla}_ms']:>8.3f} {row['dense_ms']:>8.3f} "
            f"{row['tflops']['pallas']:>8.1f} {row[f'{xla}_ms'] / row['pallas_ms']:>6.2f}x "
            f"{row['dense_ms'] / row['pallas_ms']:>7.2f}x {fb} {row['rel_err_vs_xla']:>8.1e}")
  if FLAGS.rocm_report:
    from pallas_kernels.rocm_report import format_report, report, roofline_ms

    shapes = (jax.ShapeDtypeStruct((max(tokens), D), dtype), jax.ShapeDtypeStruct((G, 2 * F, D), dtype),
              jax.ShapeDtypeStruct((G,), jnp.int32))
    fwd = lambda a, b, g: pallas_gmm(a, b, g, True, GMM_TUNING["gfx942"], False)
    grad = jax.grad(lambda a, b, g: jnp.sum(fwd(a, b, g).astype(jnp.float32)), argnums=(0, 1))
    print("\nstatic MI300X (gfx942) report, gate_up shapes, tuning", GMM_TUNING["gfx942"])
    print(format_report(report(fwd, *shapes) + report(grad, *shapes)))
    for row in rows:
      M, K, N = row["M"], row["K"], row["N"]
      bytes_moved = dtype.itemsize * (M * K + G * K * N + M * N)
      print(f"MI300X roofline {row['name']:>8} M={M}: >= {roofline_ms(2.0 * M * K * N, bytes_moved):.3f} ms forward "
            f"(arithmetic intensity {2.0 * M * K * N / bytes_moved:.0f} FLOP/B)")
  suffix = "_quick" if FLAGS.quick else ""
  sweep = []
  if FLAGS.sweep:
    M, tuned = max(tokens), GMM_TUNING[kind]
    configs = [tuned.gmm] + [GmmBlocks(*map(int, c.split("/"))) for c in FLAGS.sweep]
    for name, K, N in (("gate_up", D, 2 * F), ("down", F, D)):
      rng = np.random.default_rng(0)
      lhs = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
      rhs = jnp.asarray(rng.standard_normal((G, N, K), np.float32), dtype)
      gs = jnp.asarray(group_sizes(M, G, M))
      for blocks in configs:
        tuning = GmmTuning(blocks, tuned.tgmm)
        fn = jax.jit(lambda a, b, g, t=tuning: pallas_gmm(a, b, g, True, t))
        ms = 1e3 * median_seconds(fn, lhs, rhs, gs, reps=reps)
        sweep.append({"name": name, "M": M, "blocks": str(blocks), "ms": ms, "tflops": 2.0 * M * K * N / ms / 1e9})
        print(f"sweep {name:>8} M={M} {blocks}: {ms:.3f} ms, {sweep[-1]['tflops']:.1f} TFLOP/s")
  out = FLAGS.out or os.path.join("experiments", "results", f"bench_kernels_{kind}{suffix}.json")
  write_json(out, {"device": str(getattr(device, "device_kind", device.platform)), "jax": jax.__version__,
                   "dtype": dtype.name, "tuning": str(GMM_TUNING[kind]), "gmm": rows, "sweep": sweep})
  print(f"wrote {out}  (vs xla / vs dense: time ratio, > 1 means the Pallas kernel is faster)")


if __name__ == "__main__":
  app.run(main)
