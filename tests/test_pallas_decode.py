"""The Pallas-Triton decode attention: interpret mode on CPU against the plain-JAX reference and against row t of the
training-time causal attention, every partial written, empty splits without NaN, static checks, and lowering for rocm
and cuda at every BLOCK_CONFIGS entry.

B batch, S cache length, T sequence, H query heads, K kv heads, E head dim.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as da
from pallas_kernels.cca_attention import attention_reference
from pallas_kernels.tuning import check_blocks

# The Pallas Triton backend warns that it is deprecated on every pallas_call; that is known (JAX_ANCHORS.md §2.3).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def cache_layout(k_BSKE, v_BSKE):
  """Keys and values [B, S, K, E] in the decode cache's layout: k [B, K, E, S], v [B, K, S, E]."""
  return k_BSKE.transpose(0, 2, 3, 1), v_BSKE.transpose(0, 2, 1, 3)


def make_inputs(seed, lengths, S, H, K, E, dtype):
  """Random q and caches; every entry at or past a row's length is NaN, as stale or never-written cache slots may be."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  q = jnp.asarray(rng.standard_normal((B, H, E)), dtype)
  stale_BS = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]
  k, v = (jnp.asarray(np.where(stale_BS[:, :, None, None], np.nan, rng.standard_normal((B, S, K, E))), dtype)
          for _ in range(2))
  return q, *cache_layout(k, v), jnp.asarray(lengths, jnp.int32)


# (lengths, S, H, K, E, dtype, window, block_k, num_splits): H/K = 1, 2, 4; S never a multiple of block_k * num_splits;
# lengths 1 and S in every case (a length-1 row leaves all splits but the first empty); E = 24 is masked to 32.
CASES = [
  ((1, 50, 17, 33), 50, 2, 2, 32, jnp.float32, None, 16, 2),
  ((70, 1, 9, 40), 70, 4, 2, 24, jnp.float32, 9, 16, 3),
  ((45, 1, 31), 45, 8, 2, 16, jnp.float32, None, 32, 4),  # 2 key blocks: num_splits shrinks to 2
  ((1, 100, 64, 20), 100, 8, 2, 128, jnp.bfloat16, 20, 32, 2),
  ((77, 1, 5), 77, 8, 1, 64, jnp.bfloat16, None, 16, 8),
]


@pytest.mark.parametrize("lengths,S,H,K,E,dtype,window,block_k,num_splits", CASES)
def test_matches_reference(lengths, S, H, K, E, dtype, window, block_k, num_splits):
  q, k, v, lengths_B = make_inputs(0, lengths, S, H, K, E, dtype)
  out = da.decode_attention(q, k, v, lengths_B, sliding_window=window, block_k=block_k, num_splits=num_splits,
                            interpret=True)
  ref = da.decode_attention_reference(q, k, v, lengths_B, sliding_window=window)
  assert out.dtype == dtype and out.shape == q.shape
  assert np.isfinite(np.asarray(ref, np.float32)).all()  # the reference itself ignores the NaN stale entries
  assert rel_err(out, ref) <= (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("window", [None, 6])
def test_equals_row_t_of_training_attention(window):
  # Decoding token t with the cache filled to t + 1 is row t of causal attention over the whole sequence. Rows of one
  # batch decode different t (ragged lengths), and t = 0, a block boundary and T - 1 all occur.
  B, T, H, K, E = 3, 37, 4, 2, 16
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, E)), jnp.float32) for n in (H, K, K))
  full = attention_reference(q, k, v, jnp.zeros((B, T), jnp.int32), sliding_window=window)
  k, v = cache_layout(k, v)
  rows = np.arange(B)
  for t_B in ((0, 15, 36), (16, 36, 0), (7, 7, 31)):
    t_B = np.asarray(t_B)
    out = da.decode_attention(q[rows, t_B], k, v, jnp.asarray(t_B + 1, jnp.int32), sliding_window=window,
                              block_k=16, num_splits=2, interpret=True)
    assert rel_err(out, full[rows, t_B]) <= 1e-5, t_B


@pytest.mark.parametrize("window", [None, 20])
def test_splits_merge_by_the_largest_maximum(window):
  # Scores rising over hundreds of base-2 units from the first split to the last: merged by any split's maximum but
  # the largest, the rescaling overflows. (Unit-sized random scores never show that.)
  rng = np.random.default_rng(0)
  B, S, H, K, E = 2, 64, 2, 1, 16
  q = np.zeros((B, H, E), np.float32)
  q[..., 0] = 40.0
  k = rng.standard_normal((B, K, E, S)).astype(np.float32)
  k[:, :, 0, :] = np.linspace(-10, 10, S)
  v = rng.standard_normal((B, K, S, E)).astype(np.float32)
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray([64, 50], jnp.int32))
  out = np.asarray(da.decode_attention(*args, sliding_window=window, block_k=16, num_splits=4, interpret=True))
  np.testing.assert_allclose(out, np.asarray(da.decode_attention_reference(*args, sliding_window=window)),
                             rtol=1e-4, atol=1e-5)


def test_every_partial_written_and_empty_splits_finite():
  # Partials start as aliased NaN buffers: every element (padded head rows and columns included) must be written. The
  # length-1 row leaves splits 1..3 empty: m = -inf, l = 0, acc = 0 there, and the merged output is still finite.
  lengths, S, H, K, E = (1, 64, 30), 64, 4, 2, 24
  q, k, v, lengths_B = make_inputs(2, lengths, S, H, K, E, jnp.float32)
  st = da._Static(scale=E ** -0.5, head_dim=E, window=None, block_k=16, blocks_per_split=1, num_warps=4,
                  num_stages=1, interpret=True, poison=True)
  q_BKGE = jnp.pad(q.reshape(3, K, H // K, E), ((0, 0), (0, 0), (0, 16 - H // K), (0, 32 - E)))
  acc, m, denom = jax.jit(lambda *a: da._partials(*a, 4, st))(lengths_B, q_BKGE, k, v)
  for x in (acc, m, denom):
    assert not np.isnan(np.asarray(x)).any()
  assert np.isneginf(np.asarray(m[0, :, 1:])).all() and (np.asarray(denom[0, :, 1:]) == 0).all()
  assert (np.asarray(acc[0, :, 1:]) == 0).all()
  out = da.decode_attention(q, k, v, lengths_B, block_k=16, num_splits=4, interpret=True, _poison=True)
  assert np.isfinite(np.asarray(out)).all()
  assert rel_err(out, da.decode_attention_reference(q, k, v, lengths_B)) <= 1e-5


@pytest.mark.parametrize("kw,name", [
  (dict(block_k=48), "block_k"), (dict(block_k=8), "block_k"), (dict(num_splits=0), "num_splits"),
  (dict(num_warps=3), "num_warps"), (dict(num_stages=0), "num_stages"), (dict(sliding_window=0), "sliding_window"),
])
def test_static_checks_name_the_parameter(kw, name):
  q, k, v, lengths_B = make_inputs(0, (3,), 16, 2, 1, 16, jnp.float32)
  with pytest.raises(ValueError, match=name):
    da.decode_attention(q, k, v, lengths_B, interpret=True, **kw)


def test_shape_checks():
  q, k, v, lengths_B = make_inputs(0, (3, 4), 16, 3, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    da.decode_attention(q, k, v, lengths_B, interpret=True)
  q, k, v, lengths_B = make_inputs(0, (3, 4), 16, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="lengths_B"):
    da.decode_attention(q, k, v, lengths_B[:1], interpret=True)
  # A length past the cache reads the whole cache (clamped), never past it: finite, and equal to length S.
  q, k, v, _ = make_inputs(1, (40, 40), 40, 2, 1, 16, jnp.float32)  # S = 40: the last 16-key block overhangs
  over = da.decode_attention(q, k, v, jnp.array([50, 40]), block_k=16, num_splits=2, interpret=True)
  full = da.decode_attention(q, k, v, jnp.array([40, 40]), block_k=16, num_splits=2, interpret=True)
  np.testing.assert_array_equal(np.asarray(over), np.asarray(full))


def test_block_configs_are_triton_legal():
  assert len(da.BLOCK_CONFIGS) >= 3
  for config in da.BLOCK_CONFIGS:
    check_blocks(dict(zip(("block_k", "num_splits", "num_warps", "num_stages"), config, strict=True)), "decode")
  assert da.default_block_config() == da.BLOCK_CONFIGS[2]  # this CPU is no tuned GPU


DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def export(fn, platform, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)


def decode_shapes(B, S, H, K, E, dtype):
  return [jax.ShapeDtypeStruct((B, H, E), dtype), jax.ShapeDtypeStruct((B, K, E, S), dtype),
          jax.ShapeDtypeStruct((B, K, S, E), dtype), jax.ShapeDtypeStruct((B,), jnp.int32)]


@pytest.mark.parametrize("platform", ["rocm", "cuda"])
@pytest.mark.parametrize("config", da.BLOCK_CONFIGS)
def test_lowers_for_gpu(config, platform):
  # Lowering only (no GPU here): enforces Triton's rules that interpret mode ignores (ROCM_ON_CPU.md §1). S = 1000 is
  # no block multiple (masked tail), the window adds the lower bound.
  block_k, num_splits, num_warps, num_stages = config
  fn = lambda q, k, v, lengths: da.decode_attention(q, k, v, lengths, sliding_window=256, block_k=block_k,
                                                    num_splits=num_splits, num_warps=num_warps,
                                                    num_stages=num_stages, interpret=False)
  module = export(fn, platform, *decode_shapes(3, 1000, 8, 2, 128, jnp.bfloat16)).mlir_module()
  assert module.count("__gpu$xla.gpu.triton") == 1


def test_lowers_with_padded_head_dim_and_fp32():
  # E = 24 (masked columns), G = 1, fp32 operands (IEEE dots).
  fn = lambda q, k, v, lengths: da.decode_attention(q, k, v, lengths, block_k=16, num_splits=4, interpret=False)
  assert export(fn, "rocm", *decode_shapes(2, 70, 2, 2, 24, jnp.float32)).mlir_module().count(
    "__gpu$xla.gpu.triton") == 1


def test_lowering_enforces_triton_rules():
  # The control for test_lowers_for_gpu: a 48-key block, which interpret mode would run, fails to lower.
  st = da._Static(scale=1.0, head_dim=16, window=None, block_k=48, blocks_per_split=1, num_warps=4, num_stages=1,
                  interpret=False, poison=False)
  shapes = [jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2, 1, 16, 16), jnp.float32),
            jax.ShapeDtypeStruct((2, 1, 16, 96), jnp.float32), jax.ShapeDtypeStruct((2, 1, 96, 16), jnp.float32)]
  with pytest.raises(Exception, match="power of 2"):
    export(lambda *a: da._partials(*a, 2, st)[0], "rocm", *shapes)
