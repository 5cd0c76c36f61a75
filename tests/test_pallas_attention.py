"""The Pallas-Triton CCA flash attention: interpret mode on CPU against the plain-JAX reference (forward and dq, dk,
dv), every output element written, static checks, and lowering for rocm and cuda at every BLOCK_CONFIGS entry.

B batch, T sequence, H query heads, K kv heads, E head dim.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_draws import with_key_temperatures

from pallas_kernels import cca_attention as ca
from pallas_kernels.tuning import check_blocks
from zaya_jax.ops.attention import causal_mask, xla_attention

# The Pallas Triton backend warns that it is deprecated on every pallas_call; that is known (JAX_ANCHORS.md §2.3).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def make_inputs(seed, B, T, H, K, E, dtype, segments):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, E)), dtype) for n in (H, K, K))
  if segments == "packed":  # contiguous documents of random lengths
    seg_BT = np.cumsum(rng.random((B, T)) < 0.08, axis=1)
  elif segments == "scattered":  # ids that recur after other ids: equality semantics, not runs
    seg_BT = rng.integers(0, 3, (B, T))
  else:
    seg_BT = np.zeros((B, T))
  return q, k, v, jnp.asarray(seg_BT, jnp.int32)


def loss_and_grads(fn, q, k, v, seg, **kw):
  # A random-weight readout makes every output element matter to every gradient.
  w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
  f = lambda q, k, v: jnp.sum(fn(q, k, v, seg, **kw).astype(jnp.float32) * w)
  out = fn(q, k, v, seg, **kw)
  return out, jax.grad(f, (0, 1, 2))(q, k, v)


# (B, T, H, K, E, dtype, segments, window, block_q, block_k): H/K = 1, 2, 4; T never a block multiple; E = 24 pads.
# Windows 2 and 18 with 16-row blocks put a window's first key (forward, dq) and last query (dk, dv) on a block edge,
# where a block range one off would skip a block that holds visible keys.
CASES = [
  (2, 40, 2, 2, 32, jnp.float32, "scattered", None, 16, 32),
  (1, 50, 4, 2, 32, jnp.float32, "packed", 7, 32, 16),
  (1, 33, 4, 1, 24, jnp.float32, "none", None, 16, 16),
  (1, 70, 8, 2, 128, jnp.bfloat16, "packed", 20, 32, 32),
  (1, 60, 2, 1, 16, jnp.float32, "none", 2, 16, 16),
  (1, 60, 2, 1, 16, jnp.float32, "none", 18, 16, 16),
]


@pytest.mark.parametrize("B,T,H,K,E,dtype,segments,window,block_q,block_k", CASES)
def test_matches_reference(B, T, H, K, E, dtype, segments, window, block_q, block_k):
  q, k, v, seg = make_inputs(0, B, T, H, K, E, dtype, segments)
  kw = dict(sliding_window=window)
  out, grads = jax.jit(lambda q, k, v: loss_and_grads(
    ca.flash_attention, q, k, v, seg, block_q=block_q, block_k=block_k, interpret=True, **kw))(q, k, v)
  ref_out, ref_grads = jax.jit(lambda q, k, v: loss_and_grads(ca.attention_reference, q, k, v, seg, **kw))(q, k, v)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert out.dtype == dtype and out.shape == q.shape
  assert rel_err(out, ref_out) <= tol
  for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.dtype == dtype
    assert rel_err(g, ref_g) <= tol, name


def test_reference_is_the_project_mask():
  # The reference (and so the kernel) masks exactly as the XLA backend's causal_mask, window and segments included.
  q, k, v, seg = make_inputs(1, 2, 37, 4, 2, 16, jnp.float32, "scattered")
  ref = ca.attention_reference(q, k, v, seg, sliding_window=5)
  assert rel_err(xla_attention(q, k, v, causal_mask(seg, 5)), ref) <= 1e-6


def test_every_output_element_written():
  # Outputs (o, logsumexp, dq, dk, dv) start as aliased NaN buffers; T = 45 leaves the last 16-row block partly
  # padding and G = 2 makes dk/dv a sum over heads, so an unwritten element or an unvisited block would stay NaN.
  q, k, v, seg = make_inputs(2, 1, 45, 4, 2, 16, jnp.float32, "packed")
  out, grads = jax.jit(lambda q, k, v: loss_and_grads(
    ca.flash_attention, q, k, v, seg, sliding_window=9, block_q=16, block_k=16, interpret=True, _poison=True))(q, k, v)
  ref_out, ref_grads = jax.jit(lambda q, k, v: loss_and_grads(
    ca.attention_reference, q, k, v, seg, sliding_window=9))(q, k, v)
  for x, ref in zip((out, *grads), (ref_out, *ref_grads)):
    assert np.isfinite(np.asarray(x)).all()
    assert rel_err(x, ref) <= 1e-5


def test_segment_extent_any_ids():
  seg = jnp.asarray([[3, 3, 1, 3, 1, 7], [0, 0, 0, 0, 0, 0]], jnp.int32)
  first, last = ca.segment_extent(seg)
  np.testing.assert_array_equal(first, [[0, 0, 2, 0, 2, 5], [0] * 6])
  np.testing.assert_array_equal(last, [[3, 3, 4, 3, 4, 5], [5] * 6])


@pytest.mark.parametrize("kw,name", [
  (dict(block_q=48), "block_q"), (dict(block_k=8), "block_k"), (dict(num_warps=3), "num_warps"),
  (dict(num_stages=0), "num_stages"), (dict(sliding_window=0), "sliding_window"),
])
def test_static_checks_name_the_parameter(kw, name):
  q, k, v, seg = make_inputs(0, 1, 16, 2, 1, 16, jnp.float32, "none")
  with pytest.raises(ValueError, match=name):
    ca.flash_attention(q, k, v, seg, interpret=True, **kw)


def test_block_configs_are_triton_legal():
  assert len(ca.BLOCK_CONFIGS) >= 3
  for block_q, block_k, num_warps, num_stages in ca.BLOCK_CONFIGS:
    check_blocks(dict(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages), "attention")


DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def export(fn, platform, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)


@pytest.mark.parametrize("platform", ["rocm", "cuda"])
@pytest.mark.parametrize("config", ca.BLOCK_CONFIGS)
def test_lowers_for_gpu(config, platform):
  # Lowering only (no GPU here): enforces Triton's rules that interpret mode ignores (ROCM_ON_CPU.md §1).
  block_q, block_k, num_warps, num_stages = config
  B, T, H, K, E = 1, 256, 4, 2, 128
  sds = [jax.ShapeDtypeStruct((B, T, n, E), jnp.bfloat16) for n in (H, K, K)] + [
    jax.ShapeDtypeStruct((B, T), jnp.int32)]
  kw = dict(sliding_window=64, block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
            interpret=False)
  fwd = lambda q, k, v, seg: ca.flash_attention(q, k, v, seg, **kw)
  grad = jax.grad(lambda q, k, v, seg: jnp.sum(fwd(q, k, v, seg).astype(jnp.float32)), (0, 1, 2))
  assert export(fwd, platform, *sds).mlir_module().count("__gpu$xla.gpu.triton") == 1
  # Forward (for the residuals), dq and dk/dv kernels.
  assert export(grad, platform, *sds).mlir_module().count("__gpu$xla.gpu.triton") == 3


def test_lowering_enforces_triton_rules():
  # The control for test_lowers_for_gpu: a 48-row block, which interpret mode would run, fails to lower.
  st = ca._Static(scale=1.0, window=None, block_q=48, block_k=16, num_warps=4, num_stages=1, interpret=False,
                  poison=False)
  q = jax.ShapeDtypeStruct((1, 96, 2, 16), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, 96), jnp.int32)
  with pytest.raises(Exception, match="power of 2"):
    export(lambda q, seg: ca._forward(q, q, q, seg, seg, st)[0], "rocm", q, seg)


def test_the_kernel_keeps_no_scores_in_memory():
  """What `launch/plan.py --target=gpu` counts on: compiled on the CPU (interpret mode), the kernel's gradient
  program holds blocks and the saved residuals, not the [T, T] scores the XLA path keeps for its backward pass."""
  from zaya_jax.ops.attention import attention

  B, T, H, K, E = 1, 1024, 4, 2, 16
  q, kv = jax.ShapeDtypeStruct((B, T, H, E), jnp.float32), jax.ShapeDtypeStruct((B, T, K, E), jnp.float32)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def temporaries(backend: str) -> int:
    grad = jax.grad(lambda q, k, v, s: attention(q, k, v, s, backend=backend).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes

  scores_bytes = B * H * T * T * 4  # one fp32 score per query head and (query, key) pair: 16 MiB
  xla, kernel = temporaries("xla"), temporaries("pallas")
  assert xla > scores_bytes and kernel < scores_bytes / 4, (xla / 2**20, kernel / 2**20)  # measured 38.5 vs 2.6 MiB


def test_remat_dots_keeps_what_the_backward_kernels_need_from_the_forward_one():
  """The kernel names its output and log-sum-exp, so ZayaConfig.remat "dots" keeps them and the backward pass does
  not run the forward kernel again; "full" does, in every layer. Counted as the while loops of the compiled
  gradient (interpret mode; the tiled experts' loops, whose outputs "dots" keeps too, add the same to each): measured
  38, 38, 50 (dots 42 when the forward kernel ran inside the custom VJP, where the policy cannot see its outputs).
  The gradients are the same in the three."""
  from flax import nnx

  from zaya_jax.config import ZayaConfig
  from zaya_jax.model.decoder import ZayaForCausalLM
  from zaya_jax.train.step import step_compiler_options

  ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 32)), jnp.int32)

  def loops_and_grads(remat: str):
    cfg = ZayaConfig.tiny(remat=remat).replace(attention=dict(backend="pallas"), moe=dict(backend="tiled"))
    model = with_key_temperatures(ZayaForCausalLM(cfg, rngs=nnx.Rngs(0)), seed=0)  # scores that depend on q, k
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights = jax.random.normal(jax.random.key(1), (2, 32, cfg.vocab_size))
    loss = lambda p: (nnx.merge(graphdef, p, rest)(ids).logits_BTV * weights).sum()
    compiled = jax.jit(jax.grad(loss), compiler_options=step_compiler_options("cpu")).lower(params).compile()
    return compiled.as_text().count(" while("), compiled(params)

  (none, want), (dots, got_dots), (full, got_full) = (loops_and_grads(r) for r in ("none", "dots", "full"))
  assert dots == none < full, (none, dots, full)
  for got in (got_dots, got_full):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
