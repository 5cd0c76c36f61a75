"""Decode attention for CCA's cached generation: one new query per row against a KV cache, split along the sequence
(flash-decoding), Pallas lowered through Triton (the Pallas path on ROCm), plus a plain-JAX reference.

B batch, S cache length (S_max), H query heads, K kv heads, G = H // K (query head h reads kv head h // G), E head dim
(Ep: E padded to a power of two >= 16), Gp: G padded to a power of two >= 16 (the smallest tl.dot dim), N splits of
the sequence (num_splits), J key blocks per split.

The caches come in the layout the model's decode state keeps them (zaya_jax.model.cca.CCACache, so a step reads them
in place): keys transposed, [B, K, E, S], values heads-major, [B, K, S, E]. Row b's query sees cache entries
[0, lengths[b]) (the new token's own key and value included); with a sliding window W only [lengths[b] - W,
lengths[b]). Scores are scaled by E**-0.5, the softmax is accumulated online in fp32 (base 2:
log2(e) folded into the scale), matmuls accumulate in fp32, the output has q's dtype.

Stage 1 (the kernel): grid (B, K, N). A program takes the G query heads of one kv head as the rows of a [Gp, Ep] tile,
so each key/value block is loaded once for all G heads and both products run on the matrix cores (tl.dot) — the
padding rows cost compute, but decode is bound by reading the cache, not by FLOPs (the grouped Triton decode kernels
of lightllm/sglang pad heads to 16 the same way). Elementwise products would need a [G, block_k, Ep] fp32 temporary
(128 registers a thread at G=4, 64 keys, E=128, 4 warps): more registers, no MFMA. The program loops over the key
blocks of its chunk that the row's length (and window) make visible — loop bounds, not masks, so a short row in a
long cache reads only its own entries — and writes unnormalized partials acc [Gp, Ep], running max m [Gp] and
sum l [Gp]. Stage 2 (plain JAX, fused by XLA): the log-sum-exp merge of the N partials.

The cache is read in place: no padding copy of S (a copy would double the traffic of a memory-bound step); the last
block's tail and E < Ep are handled by masked loads. Entries at or past a row's length are never trusted (they may be
stale or NaN): keys and values are loaded with the visibility mask and `other=0`, so a NaN there cannot reach p @ v.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.tuning import check_blocks, device_kind, dot_f32

F32 = jnp.float32
LOG2E = math.log2(math.e)
# Finite, so masked keys give exp2(MASK - m) = 0 and never exp2(-inf + inf) = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(F32).max)
MIN_ROWS = 16  # tl.dot needs every dim >= 16: the G query heads of a program are padded to at least this

# (block_k, num_splits, num_warps, num_stages), every entry checked to lower for rocm and cuda by the tests.
# No GPU timings yet: these follow the grouped flash-decoding Triton kernels (lightllm -> sglang/vLLM: 16 padded head
# rows, 32-64 keys a step, 4 warps, 8 splits; 1 stage on ROCm, where pipelining costs LDS that occupancy needs).
# gfx942: 32 keys, 4 warps, 1 stage; static report (tests/test_rocm_report.py, G=4, E=128, bf16, keys [E, S]): 118-126
# VGPR, no spills, 8 KiB LDS, 4 waves/SIMD. 64 keys took 200 VGPR without a window (2 waves/SIMD; 152 with one, and
# with the earlier [S, E] key layout); 128 keys spilled. A memory-bound step wants the waves that hide load latency.
# H100/H200: 64 keys with 3 stages of cp.async pipelining (a decode step is a stream over the cache).
# Fallback: 32 keys, 4 warps, 2 stages, the small-footprint config. 8 splits: B * K * 8 programs fill an MI300X's
# 304 CUs from B * K = 38 and an H100's 132 SMs from 17; fewer rows leave the GPU partly idle (raise num_splits).
BLOCK_CONFIGS = (
  (32, 8, 4, 1),  # gfx942 (MI300X)
  (64, 8, 4, 3),  # H100 / H200
  (32, 8, 4, 2),  # fallback
)
_CONFIG_BY_DEVICE = {"gfx942": BLOCK_CONFIGS[0], "h100": BLOCK_CONFIGS[1], "h200": BLOCK_CONFIGS[1],
                     "fallback": BLOCK_CONFIGS[2]}


def default_block_config(device: jax.Device | None = None) -> tuple[int, int, int, int]:
  """The BLOCK_CONFIGS entry for a device (by `pallas_kernels.tuning.device_kind`), the fallback for anything else."""
  return _CONFIG_BY_DEVICE[device_kind(device)]


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernel specializes on."""
  scale: float  # E**-0.5 of the unpadded head dim
  head_dim: int  # E: columns >= E are masked on load
  window: int | None
  block_k: int
  blocks_per_split: int  # J
  num_warps: int
  num_stages: int
  interpret: bool
  poison: bool  # tests only: outputs start as an aliased NaN buffer, so any element left unwritten stays NaN

  def compiler_params(self):
    return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *refs, st: _Static):
  # len_ref [B] (all rows), q_ref [Gp, Ep] (this row's G heads of kv head kh, zero-padded), k_ref [E, S] and v_ref
  # [S, E] (this row's cache of kv head kh, read in place). Outputs: acc_ref [Gp, Ep], m_ref/l_ref [Gp] (this row,
  # head, split).
  acc_ref, m_ref, l_ref = refs[-3:]  # with poison, the aliased NaN inputs come first and are never read
  bk = st.block_k
  length = len_ref[pl.program_id(0)]
  split = pl.program_id(2)
  q = q_ref[...]
  Gp, Ep = q.shape
  first_key = jnp.int32(0) if st.window is None else jnp.maximum(length - st.window, 0)
  # The visible keys [first_key, length) cut to this split's blocks; a row shorter than the split's start gets
  # lo >= hi and runs no step (its partials stay m = -inf, l = 0, acc = 0, which the merge weighs by zero).
  lo = jnp.maximum(split * st.blocks_per_split, lax.div(first_key, bk))
  hi = jnp.minimum((split + 1) * st.blocks_per_split, lax.div(length + bk - 1, bk))
  col_ok = jnp.arange(Ep) < st.head_dim

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k_pos = j * bk + jnp.arange(bk)
    visible = (k_pos >= first_key) & (k_pos < length)
    # Masked loads: past the cache's end (the last block's tail), past E, and stale entries past the row's length
    # (never trusted: a NaN there would survive 0 * NaN in p @ v) all read as 0.
    # Keys are [E, S]: their block is [Ep, bk], contiguous along the keys, and q @ k needs no transpose.
    k_mask = jnp.broadcast_to(col_ok[:, None] & visible[None, :], (Ep, bk))
    v_mask = jnp.broadcast_to(visible[:, None] & col_ok[None, :], (bk, Ep))
    k = pltriton.load(k_ref.at[pl.ds(0, Ep), pl.ds(j * bk, bk)], mask=k_mask, other=0)
    v = pltriton.load(v_ref.at[pl.ds(j * bk, bk), pl.ds(0, Ep)], mask=v_mask, other=0)
    s = dot_f32(q, k) * (st.scale * LOG2E)
    s = jnp.where(visible[None, :], s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = l_prev * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + dot_f32(p.astype(v.dtype), v)
    return acc, m_next, l_next

  init = (jnp.zeros((Gp, Ep), F32), jnp.full((Gp,), -jnp.inf, F32), jnp.zeros((Gp,), F32))
  acc, m, denom = lax.fori_loop(lo, hi, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = denom


def _partials(lengths_B, q_BKGE, k_BKES, v_BKSE, num_splits, st: _Static):
  """Stage 1: acc [B, K, N, Gp, Ep], m [B, K, N, Gp], l [B, K, N, Gp], all fp32 (m, l in base 2)."""
  B, K, Gp, Ep = q_BKGE.shape
  S, E = v_BKSE.shape[2], v_BKSE.shape[3]
  len_spec = pl.BlockSpec((B,), lambda b, kh, s: (0,))
  q_spec = pl.BlockSpec((None, None, Gp, Ep), lambda b, kh, s: (b, kh, 0, 0))
  # The whole cache of one kv head: the kernel walks it with pl.ds, bounded by the row's length.
  k_spec = pl.BlockSpec((None, None, E, S), lambda b, kh, s: (b, kh, 0, 0))
  v_spec = pl.BlockSpec((None, None, S, E), lambda b, kh, s: (b, kh, 0, 0))
  acc_spec = pl.BlockSpec((None, None, None, Gp, Ep), lambda b, kh, s: (b, kh, s, 0, 0))
  stat_spec = pl.BlockSpec((None, None, None, Gp), lambda b, kh, s: (b, kh, s, 0))
  in_specs = [len_spec, q_spec, k_spec, v_spec]
  out_specs = [acc_spec, stat_spec, stat_spec]
  out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, Gp, Ep), F32),
               jax.ShapeDtypeStruct((B, K, num_splits, Gp), F32), jax.ShapeDtypeStruct((B, K, num_splits, Gp), F32)]
  args = [lengths_B, q_BKGE, k_BKES, v_BKSE]
  aliases = {}
  if st.poison:
    n_in = len(args)
    args = [*args, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape)]
    in_specs = [*in_specs, *out_specs]
    aliases = {n_in + i: i for i in range(len(out_shape))}
  return pl.pallas_call(functools.partial(_decode_kernel, st=st), grid=(B, K, num_splits), in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
                        compiler_params=st.compiler_params(), interpret=st.interpret, name="cca_decode")(*args)


def _merge(acc_BKNGE, m_BKNG, l_BKNG):
  """Stage 2: the log-sum-exp merge of the splits, [B, K, G, E] fp32. Empty splits (m = -inf, l = 0) weigh 0; a row
  with no visible key at all (length 0, outside the contract) gives 0, not NaN."""
  m_BKG = jnp.max(m_BKNG, axis=2)
  m_BKG = jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)
  w_BKNG = jnp.exp2(m_BKNG - m_BKG[:, :, None])
  l_BKG = jnp.sum(w_BKNG * l_BKNG, axis=2)
  acc_BKGE = jnp.sum(w_BKNG[..., None] * acc_BKNGE, axis=2)
  return acc_BKGE / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]


def decode_attention(q_BHE, k_cache_BKES, v_cache_BKSE, lengths_B, *, sliding_window: int | None = None,
                     block_k: int = 64, num_splits: int = 8, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool | None = None, _poison: bool = False):
  """One decoding step of (optionally sliding-window) GQA attention against a KV cache, flash-decoding style.

  q_BHE [B, H, E] (the new token's queries, normalised and rotated), k_cache_BKES [B, K, E, S] (post-RoPE keys,
  transposed) and v_cache_BKSE [B, K, S, E] (values; H % K == 0), lengths_B [B] int: valid entries per row including
  the new token (1 <= length <= S).
  Equals row lengths-1 of causal attention over the first `lengths` positions. bf16 or fp32 in, fp32 accumulation,
  output [B, H, E] in q's dtype. block_k must be a power of two >= 16 (see BLOCK_CONFIGS); it shrinks for short
  caches, and num_splits shrinks to the number of key blocks. interpret=None: interpret mode on CPU, Triton elsewhere.
  """
  # Resolved here, outside the jit: its trace cache does not key on the backend, so a trace made for one platform
  # (interpret mode on CPU) would be reused for a program lowered for another.
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  return _decode_attention(q_BHE, k_cache_BKES, v_cache_BKSE, lengths_B, sliding_window=sliding_window,
                           block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                           interpret=interpret, _poison=_poison)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_k", "num_splits", "num_warps", "num_stages",
                                             "interpret", "_poison"))
def _decode_attention(q_BHE, k_cache_BKES, v_cache_BKSE, lengths_B, *, sliding_window, block_k, num_splits,
                      num_warps, num_stages, interpret: bool, _poison: bool):
  check_blocks(dict(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                    sliding_window=sliding_window), "decode_attention")
  B, H, E = q_BHE.shape
  Bv, K, S, Ev = v_cache_BKSE.shape
  if (Bv, Ev) != (B, E) or k_cache_BKES.shape != (B, K, E, S):
    raise ValueError(f"need q [B, H, E], k_cache [B, K, E, S] and v_cache [B, K, S, E]: {q_BHE.shape=} "
                     f"{k_cache_BKES.shape=} {v_cache_BKSE.shape=}")
  if H % K:
    raise ValueError(f"query heads H={H} must be a multiple of kv heads K={K}")
  if lengths_B.shape != (B,):
    raise ValueError(f"lengths_B must be [B] = {(B,)}, got {lengths_B.shape}")
  dtype = q_BHE.dtype
  if dtype not in (jnp.bfloat16, jnp.float32, jnp.float16) or {k_cache_BKES.dtype, v_cache_BKSE.dtype} != {dtype}:
    raise ValueError(f"q and the caches must share one of bf16/fp16/fp32, got {q_BHE.dtype}, {k_cache_BKES.dtype}, "
                     f"{v_cache_BKSE.dtype}")

  G = H // K
  Gp = max(MIN_ROWS, pl.next_power_of_2(G))
  Ep = max(16, pl.next_power_of_2(E))
  # Short caches: a block no longer than the cache (rounded up to 16) avoids loading pure padding; no more splits
  # than key blocks, so no program is empty by construction (ragged rows can still leave splits empty).
  block_k = min(block_k, max(16, pl.next_power_of_2(S)))
  n_blocks = pl.cdiv(S, block_k)
  num_splits = min(num_splits, n_blocks)
  st = _Static(scale=E ** -0.5, head_dim=E, window=sliding_window, block_k=block_k,
               blocks_per_split=pl.cdiv(n_blocks, num_splits), num_warps=num_warps, num_stages=num_stages,
               interpret=interpret, poison=_poison)
  # q is tiny: padding it ([B, K, Gp, Ep], zero rows and columns add nothing to q.k) is free, unlike the cache.
  q_BKGE = jnp.pad(q_BHE.reshape(B, K, G, E), ((0, 0), (0, 0), (0, Gp - G), (0, Ep - E)))
  # Clamped: a length past S would have the masked loads read beyond the cache (NaN in interpret mode, out of bounds
  # on a GPU); the model's callers clamp already, direct callers may not.
  lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, S)
  acc, m, denom = _partials(lengths_B, q_BKGE, k_cache_BKES, v_cache_BKSE, num_splits, st)
  out_BKGE = _merge(acc[:, :, :, :G, :E], m[:, :, :, :G], denom[:, :, :, :G])
  return out_BKGE.reshape(B, H, E).astype(dtype)


def decode_attention_reference(q_BHE, k_cache_BKES, v_cache_BKSE, lengths_B, *, sliding_window: int | None = None):
  """Plain-JAX decode attention with the same visibility, scale and cache layout, fp32 math, output in q's dtype."""
  B, H, E = q_BHE.shape
  K, S = v_cache_BKSE.shape[1:3]
  s = jnp.arange(S)
  length_B1 = lengths_B.astype(jnp.int32)[:, None]
  visible_BS = s[None, :] < length_B1
  if sliding_window is not None:
    visible_BS &= s[None, :] >= length_B1 - sliding_window
  hi = lax.Precision.HIGHEST
  q_BKGE = q_BHE.astype(F32).reshape(B, K, H // K, E)
  scores_BKGS = jnp.einsum("bkge,bkes->bkgs", q_BKGE, k_cache_BKES.astype(F32), precision=hi) * E ** -0.5
  scores_BKGS = jnp.where(visible_BS[:, None, None], scores_BKGS, -jnp.inf)
  probs_BKGS = jax.nn.softmax(scores_BKGS, axis=-1)
  # Invisible entries may hold anything (stale, NaN): zero them so 0 * NaN cannot reach the output.
  v_BKSE = jnp.where(visible_BS[:, None, :, None], v_cache_BKSE.astype(F32), 0.0)
  out_BKGE = jnp.einsum("bkgs,bkse->bkge", probs_BKGS, v_BKSE, precision=hi)
  return out_BKGE.reshape(B, H, E).astype(q_BHE.dtype)
