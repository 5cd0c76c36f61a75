"""Pallas-Triton CCA flash attention on a GPU: compiled correctness at every BLOCK_CONFIGS entry, then speed against
the XLA backend (zaya_jax.ops.attention.xla_attention with causal_mask), forward and forward+backward.

Also times `jax.nn.dot_product_attention` (XLA and cuDNN implementations, causal, GQA) where the mask is plain
causal, for the issue's goals: no slower than it, and >= 1.5x faster than the XLA reference at 16k tokens.

B batch, T sequence, H query heads, K kv heads, E head dim.
Usage: python -m experiments.bench_cca_attention [--out out.json] [--skip_correctness] [--shapes 2x4096,1x16384]
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import median_seconds, quiet_library_logging, write_json
from experiments.common import rel_err as rel
from pallas_kernels import cca_attention as ca
from zaya_jax.ops.attention import causal_mask, xla_attention

warnings.simplefilter("ignore", DeprecationWarning)

flags.DEFINE_string("out", None, "Results JSON.")
flags.DEFINE_bool("skip_correctness", False, "Skip the compiled correctness pass over BLOCK_CONFIGS.")
flags.DEFINE_list("shapes", ["2x4096", "1x8192:doc1024", "1x8192:win1024", "1x16384"],
                  "BxT[:docN|:winN] timing shapes (bf16, H=8, K=2, E=128).")
FLAGS = flags.FLAGS


def inputs(seed, B, T, H, K, E, dtype, doc_len=None):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, E)), dtype) for n in (H, K, K))
  seg = np.zeros((B, T), np.int32) if doc_len is None else np.cumsum(rng.random((B, T)) < 1 / doc_len, axis=1)
  return q, k, v, jnp.asarray(seg, jnp.int32)


def fwd_bwd(fn, seg, **kw):
  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, **kw), q, k, v)
    return out, vjp(out)  # cotangent = output: deterministic, touches every element
  return jax.jit(f)


def bench(f, *args):
  return median_seconds(f, *args, reps=10) * 1e3


def parse_shape(spec):
  size, _, extra = spec.partition(":")
  B, T = map(int, size.split("x"))
  doc = int(extra[3:]) if extra.startswith("doc") else None
  window = int(extra[3:]) if extra.startswith("win") else None
  return B, T, doc, window


def jax_nn_attention(implementation):
  def fn(q, k, v, seg):
    del seg  # only used on single-segment shapes: the mask is plain causal
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return fn


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  dev = jax.devices()[0]
  res = {"device": f"{dev.device_kind}", "jax": jax.__version__, "default_config": ca.default_block_config(),
         "correctness": [], "timing": []}
  print(res["device"], res["jax"], "default", res["default_config"], flush=True)

  for cfg in () if FLAGS.skip_correctness else ca.BLOCK_CONFIGS:
    bq, bk, nw, ns = cfg
    for dtype, window, doc in ((jnp.float32, None, 40), (jnp.bfloat16, 100, 60), (jnp.bfloat16, None, None)):
      q, k, v, seg = inputs(0, 2, 333, 8, 2, 128, dtype, doc)
      kw = dict(sliding_window=window)
      row = dict(config=cfg, dtype=jnp.dtype(dtype).name, window=window, doc_len=doc)
      fa = dict(block_q=bq, block_k=bk, num_warps=nw, num_stages=ns, **kw)
      try:  # forward alone first, so a resource error names the pass that hit it
        jax.block_until_ready(jax.jit(lambda q, k, v, seg=seg, fa=fa: ca.flash_attention(q, k, v, seg, **fa))(q, k, v))
        out, grads = fwd_bwd(ca.flash_attention, seg, **fa)(q, k, v)
      except Exception as e:  # a config that does not fit (shared memory) is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["correctness"].append(row)
        print(row, flush=True)
        continue
      q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
      ref, ref_grads = fwd_bwd(ca.attention_reference, seg, **kw)(q32, k32, v32)
      row.update({n: rel(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))})
      row["nan"] = any(not np.isfinite(np.asarray(x, np.float32)).all() for x in (out, *grads))
      res["correctness"].append(row)
      print(row, flush=True)

  for B, T, doc, window in map(parse_shape, FLAGS.shapes):
    q, k, v, seg = inputs(1, B, T, 8, 2, 128, jnp.bfloat16, doc)
    mask = causal_mask(seg, window)
    xla_fwd = jax.jit(lambda q, k, v, mask=mask: xla_attention(q, k, v, mask))
    xla_both = fwd_bwd(lambda q, k, v, seg, mask=mask: xla_attention(q, k, v, mask), seg)
    row = dict(B=B, T=T, doc_len=doc, window=window, xla_fwd_ms=bench(xla_fwd, q, k, v),
               xla_fwd_bwd_ms=bench(xla_both, q, k, v))
    for cfg in ca.BLOCK_CONFIGS:
      bq, bk, nw, ns = cfg
      kw = dict(sliding_window=window, block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)
      fa_fwd = jax.jit(lambda q, k, v, kw=kw, seg=seg: ca.flash_attention(q, k, v, seg, **kw))
      for name, f in (("fwd", fa_fwd), ("fwd_bwd", fwd_bwd(ca.flash_attention, seg, **kw))):
        try:
          row[f"flash{cfg}_{name}_ms"] = bench(f, q, k, v)
        except Exception as e:
          row[f"flash{cfg}_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if doc is None and window is None:
      for impl in (None, "cudnn"):
        for name, f in (("fwd", jax.jit(lambda q, k, v, i=impl, s=seg: jax_nn_attention(i)(q, k, v, s))),
                        ("fwd_bwd", fwd_bwd(jax_nn_attention(impl), seg))):
          try:
            row[f"jax_nn_{impl or 'default'}_{name}_ms"] = bench(f, q, k, v)
          except Exception as e:
            row[f"jax_nn_{impl or 'default'}_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    res["timing"].append(row)
    print(row, flush=True)

  if FLAGS.out:
    write_json(FLAGS.out, json.loads(json.dumps(res, default=str)))


if __name__ == "__main__":
  app.run(main)
