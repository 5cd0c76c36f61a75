"""Fused causal flash attention for the CCA attention core: Pallas lowered through Triton (the Pallas path on ROCm).

B batch, T query length (padded: Tp), S key length (== T: self-attention over the same packed rows), H query heads,
K kv heads, G = H // K (query head h reads kv head h // G), E head dim (padded: Ep, a power of two >= 16).

Query t sees key s iff s <= t, segment_ids[t] == segment_ids[s] and, with a sliding window W, t - s < W (the mask of
`zaya_jax.ops.attention.causal_mask`). Scores are scaled by E**-0.5 (the unpadded E), the softmax is accumulated
online in fp32 (base 2: exp2 with log2(e) folded into the scale), matmuls accumulate in fp32, the output has the input
dtype. The VJP is flash-attention-2's: recompute the probabilities from the saved logsumexp, one kernel for dq and one
for dk/dv that also sums dk/dv over the G query heads of a kv head (in fp32, in registers).

Key blocks that the mask hides entirely are not visited: each program's `fori_loop` runs only over the key (or query)
blocks between bounds derived from causality, the window and the extent of the segments in the block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import FLASH_ATTENTION_RESIDUALS
from pallas_kernels.tuning import check_blocks, device_kind, dot_f32

F32 = jnp.float32
LOG2E = math.log2(math.e)
# Finite, so a row whose keys in a block are all masked gives exp2(MASK - MASK) = 1 instead of NaN; that garbage is
# wiped by the exp2(MASK - m) = 0 correction as soon as the row meets a visible key (its own diagonal at the latest).
MASK_VALUE = -0.7 * float(jnp.finfo(F32).max)

# (block_q, block_k, num_warps, num_stages) candidates, every one checked to lower for rocm and cuda by the tests.
# gfx942: the AMD Triton flash-attention lineage starts at BLOCK_M=128, BLOCK_N=64, 4 warps, 1 stage (software
# pipelining costs LDS that MI300X needs for occupancy), but the static gfx942 report (pallas_kernels/rocm_report.py)
# shows our forward spilling there (276 VGPRs + 20 AGPRs, 2 spills, 1 wave/SIMD); 64x64 has no spills, 234 VGPRs,
# 2 waves/SIMD. H100/H200: 128x64 with 2-3 stages of cp.async/TMA pipelining.
# Fallback: 64x64, 4 warps, the small-footprint config that fits any GPU (also tokamax's heuristic bound).
BLOCK_CONFIGS = (
  (64, 64, 4, 1),  # gfx942 (MI300X)
  (128, 64, 8, 3),  # H100 / H200
  (64, 64, 4, 2),  # fallback
)
# The backward kernels cap both blocks at this (the forward config's blocks are for the forward's single accumulator).
BWD_MAX_BLOCK = 64
_CONFIG_BY_DEVICE = {"gfx942": BLOCK_CONFIGS[0], "h100": BLOCK_CONFIGS[1], "h200": BLOCK_CONFIGS[1]}


def default_block_config(device: jax.Device | None = None) -> tuple[int, int, int, int]:
  """The BLOCK_CONFIGS entry for a device (by `tuning.device_kind`), the fallback for anything else."""
  return _CONFIG_BY_DEVICE.get(device_kind(device), BLOCK_CONFIGS[-1])


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialize on (hashable: the custom_vjp's non-differentiable argument)."""
  scale: float  # E**-0.5 of the unpadded head dim
  window: int | None
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  interpret: bool
  poison: bool  # tests only: outputs start as an aliased NaN buffer, so any element left unwritten stays NaN

  def compiler_params(self):
    return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels. Refs arrive with the batch (and, where a BlockSpec says None, the head) dimension squeezed away.


def _mask(q_pos, k_pos, q_seg, k_seg, window):
  """[bq, bk] visibility; positions and segment ids are the block's rows and columns."""
  visible = (q_pos[:, None] >= k_pos[None, :]) & (q_seg[:, None] == k_seg[None, :])
  if window is not None:
    visible &= (q_pos[:, None] - k_pos[None, :]) < window
  return visible


def _key_block_range(q_start, first_key_ref, st: _Static):
  """Key blocks a query block [q_start, q_start + bq) can see: from its earliest same-segment key (and the window's
  first key), to its diagonal block. Everything outside is skipped, not masked."""
  lo = jnp.min(first_key_ref[pl.ds(q_start, st.block_q)])
  if st.window is not None:
    lo = jnp.maximum(lo, q_start - st.window + 1)
  return lax.div(lo, st.block_k), lax.div(q_start + st.block_q + st.block_k - 1, st.block_k)


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, first_key_ref, *refs, st: _Static):
  # q_ref [bq, Ep] (this program's query block and head), k_ref/v_ref [Tp, Ep] (its kv head), seg/first_key [Tp].
  o_ref, lse_ref = refs[-2:]  # with poison, the aliased NaN inputs come first and are never read
  bq, bk = st.block_q, st.block_k
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  q_pos = q_start + jnp.arange(bq)
  q_seg = seg_ref[pl.ds(q_start, bq)]

  def body(j, carry):
    acc, m_prev, l_prev = carry
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = dot_f32(q, k, (1, 1)) * (st.scale * LOG2E)
    s = jnp.where(_mask(q_pos, j * bk + jnp.arange(bk), q_seg, seg_ref[keys], st.window), s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = l_prev * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + dot_f32(p.astype(v.dtype), v)
    return acc, m_next, l_next

  lo, hi = _key_block_range(q_start, first_key_ref, st)
  init = (jnp.zeros(q.shape, F32), jnp.full((bq,), -jnp.inf, F32), jnp.zeros((bq,), F32))
  acc, m, denom = lax.fori_loop(lo, hi, body, init)
  # Every row sees at least its own key, so denom >= 1.
  o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(denom)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, first_key_ref, *refs, st: _Static):
  # q_ref/do_ref [bq, Ep], lse/delta [bq] (this block and head), k/v [Tp, Ep] (its kv head).
  dq_ref = refs[-1]
  bq, bk = st.block_q, st.block_k
  q_start = pl.program_id(0) * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = q_start + jnp.arange(bq)
  q_seg = seg_ref[pl.ds(q_start, bq)]

  def body(j, dq):
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = dot_f32(q, k, (1, 1)) * (st.scale * LOG2E)
    s = jnp.where(_mask(q_pos, j * bk + jnp.arange(bk), q_seg, seg_ref[keys], st.window), s, MASK_VALUE)
    p = jnp.exp2(s - lse[:, None])  # masked: exp2(MASK - lse) == 0
    dp = dot_f32(do, v, (1, 1))
    ds = p * (dp - delta[:, None])
    return dq + dot_f32(ds.astype(k.dtype), k)

  lo, hi = _key_block_range(q_start, first_key_ref, st)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, last_query_ref, *refs, st: _Static,
                 group: int):
  # k_ref/v_ref [bk, Ep] (this key block, kv head kh), q/do [Tp, H, Ep], lse/delta [H, Tp] (all heads of the row:
  # the G heads of kv head kh are read by dynamic index), seg/last_query [Tp].
  dk_ref, dv_ref = refs[-2:]
  bq, bk = st.block_q, st.block_k
  k_start = pl.program_id(0) * bk
  kh = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_pos = k_start + jnp.arange(bk)
  k_seg = seg_ref[pl.ds(k_start, bk)]

  # Query blocks that can see this key block: from its diagonal block to the last same-segment query (and the
  # window's last query); fully masked query blocks are skipped.
  hi_q = jnp.max(last_query_ref[pl.ds(k_start, bk)]) + 1
  if st.window is not None:
    hi_q = jnp.minimum(hi_q, k_start + bk - 1 + st.window)
  lo, hi = lax.div(k_start, bq), lax.div(hi_q + bq - 1, bq)

  def head_body(g, carry):
    h = kh * group + g

    def body(i, carry):
      dk, dv = carry
      queries = pl.ds(i * bq, bq)
      q, do = q_ref[queries, h, :], do_ref[queries, h, :]
      lse, delta = lse_ref[h, queries], delta_ref[h, queries]
      s = dot_f32(q, k, (1, 1)) * (st.scale * LOG2E)
      s = jnp.where(_mask(i * bq + jnp.arange(bq), k_pos, seg_ref[queries], k_seg, st.window), s, MASK_VALUE)
      p = jnp.exp2(s - lse[:, None])
      dv = dv + dot_f32(p.astype(do.dtype), do, (0, 0))
      dp = dot_f32(do, v, (1, 1))
      ds = p * (dp - delta[:, None])
      dk = dk + dot_f32(ds.astype(q.dtype), q, (0, 0))
      return dk, dv

    return lax.fori_loop(lo, hi, body, carry)

  # The GQA reduction: dk/dv of a kv head sum over its G query heads, accumulated here in fp32.
  dk, dv = lax.fori_loop(0, group, head_body, (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# pallas_calls on padded operands: q [B, Tp, H, Ep], k/v [B, Tp, K, Ep], seg/first_key/last_query [B, Tp] int32.


def _call(kernel, name, grid, in_specs, out_specs, out_shape, args, st: _Static):
  """pallas_call with the Triton compiler params. With st.poison (tests), each output starts as an aliased NaN
  buffer (extra trailing inputs the kernels never read), so an element a kernel fails to write stays NaN."""
  if st.poison:
    n_in = len(args)
    args = [*args, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape)]
    in_specs = [*in_specs, *out_specs]
    aliases = {n_in + i: i for i in range(len(out_shape))}
  else:
    aliases = {}
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        input_output_aliases=aliases, compiler_params=st.compiler_params(),
                        interpret=st.interpret, name=name)(*args)


def _row_spec(Tp):
  return pl.BlockSpec((None, Tp), lambda i, b, h: (b, 0))


def _forward(q, k, v, seg, first_key, st: _Static):
  B, Tp, H, Ep = q.shape
  G = H // k.shape[2]
  bq = st.block_q
  kv_spec = pl.BlockSpec((None, Tp, None, Ep), lambda i, b, h: (b, 0, h // G, 0))
  q_spec = pl.BlockSpec((None, bq, None, Ep), lambda i, b, h: (b, i, h, 0))
  lse_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  o, lse = _call(functools.partial(_fwd_kernel, st=st), "cca_flash_fwd", (Tp // bq, B, H),
                 [q_spec, kv_spec, kv_spec, _row_spec(Tp), _row_spec(Tp)], [q_spec, lse_spec],
                 [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp), F32)],
                 [q, k, v, seg, first_key], st)
  return o, lse


def _backward(q, k, v, o, lse, do, seg, first_key, last_query, st: _Static):
  B, Tp, H, Ep = q.shape
  K = k.shape[2]
  G = H // K
  bq, bk = st.block_q, st.block_k
  # delta_t = rowsum(dO * O): one fused elementwise-reduce in XLA, no kernel needed.
  delta = jnp.einsum("bthe,bthe->bht", o.astype(F32), do.astype(F32))

  # dq: grid over (query block, batch, query head), loop over key blocks.
  q_spec = pl.BlockSpec((None, bq, None, Ep), lambda i, b, h: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, Tp, None, Ep), lambda i, b, h: (b, 0, h // G, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  (dq,) = _call(functools.partial(_dq_kernel, st=st), "cca_flash_dq", (Tp // bq, B, H),
                [q_spec, kv_full, kv_full, q_spec, row_spec, row_spec, _row_spec(Tp), _row_spec(Tp)], [q_spec],
                [jax.ShapeDtypeStruct(q.shape, q.dtype)], [q, k, v, do, lse, delta, seg, first_key], st)

  # dk, dv: grid over (key block, batch, kv head), loops over the G query heads and the query blocks.
  kv_spec = pl.BlockSpec((None, bk, None, Ep), lambda j, b, kh: (b, j, kh, 0))
  q_full = pl.BlockSpec((None, Tp, H, Ep), lambda j, b, kh: (b, 0, 0, 0))
  rows_full = pl.BlockSpec((None, H, Tp), lambda j, b, kh: (b, 0, 0))
  dk, dv = _call(functools.partial(_dkdv_kernel, st=st, group=G), "cca_flash_dkdv", (Tp // bk, B, K),
                 [q_full, kv_spec, kv_spec, q_full, rows_full, rows_full, _row_spec(Tp), _row_spec(Tp)],
                 [kv_spec, kv_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 [q, k, v, do, lse, delta, seg, last_query], st)
  return dq, dk, dv


def _flash(q, k, v, seg, first_key, last_query, st):
  # The forward kernel runs outside the custom VJP, on inputs cut from differentiation, so its output and
  # log-sum-exp are named values of the caller's program: a remat policy can keep them (ZayaConfig.remat "dots"),
  # where a kernel inside the VJP's forward rule would run again in the backward pass to give them back.
  o, lse = _forward(*(lax.stop_gradient(x) for x in (q, k, v)), seg, first_key, st)
  o, lse = (checkpoint_name(x, name) for x, name in zip((o, lse), FLASH_ATTENTION_RESIDUALS, strict=True))
  return _attach_vjp(q, k, v, o, lse, seg, first_key, last_query, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attach_vjp(q, k, v, o, lse, seg, first_key, last_query, st):
  """o, with the flash-attention-2 gradient to q, k and v (o and lse are the forward kernel's outputs)."""
  return o


def _attach_vjp_fwd(q, k, v, o, lse, seg, first_key, last_query, st):
  return o, (q, k, v, o, lse, seg, first_key, last_query)


def _attach_vjp_bwd(st, res, do):
  q, k, v, o, lse, seg, first_key, last_query = res
  # The backward loops hold two fp32 accumulators and load four tiles per step: blocks above BWD_MAX_BLOCK overflow
  # shared memory / registers (measured: 128-row blocks with 3 stages asked for 288 KiB of shared memory on H200).
  st = dataclasses.replace(st, block_q=min(st.block_q, BWD_MAX_BLOCK), block_k=min(st.block_k, BWD_MAX_BLOCK))
  dq, dk, dv = _backward(q, k, v, o, lse, do, seg, first_key, last_query, st)
  return dq, dk, dv, None, None, None, None, None  # o and lse: computed without gradient; the rest are ints


_attach_vjp.defvjp(_attach_vjp_fwd, _attach_vjp_bwd)


# ---------------------------------------------------------------------------------------------------------------------
# Public API.


def segment_extent(segment_ids_BT):
  """first_key_BT[t] = first position with t's segment id, last_query_BT[t] = last one ([B, T] int32 each).

  Exact for any ids (not only contiguous runs): a stable sort groups equal ids with positions ascending."""
  B, T = segment_ids_BT.shape
  order_BT = jnp.argsort(segment_ids_BT, axis=1, stable=True)
  sorted_BT = jnp.take_along_axis(segment_ids_BT, order_BT, axis=1)
  idx = jnp.arange(T)
  new_BT = jnp.concatenate([jnp.ones((B, 1), bool), sorted_BT[:, 1:] != sorted_BT[:, :-1]], axis=1)
  end_BT = jnp.concatenate([sorted_BT[:, 1:] != sorted_BT[:, :-1], jnp.ones((B, 1), bool)], axis=1)
  start_BT = lax.cummax(jnp.where(new_BT, idx, 0), axis=1)
  stop_BT = lax.cummin(jnp.where(end_BT, idx, T - 1), axis=1, reverse=True)
  rows = jnp.arange(B)[:, None]
  first_key_BT = jnp.zeros((B, T), jnp.int32).at[rows, order_BT].set(jnp.take_along_axis(order_BT, start_BT, axis=1))
  last_query_BT = jnp.zeros((B, T), jnp.int32).at[rows, order_BT].set(jnp.take_along_axis(order_BT, stop_BT, axis=1))
  return first_key_BT, last_query_BT


def flash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, *, sliding_window: int | None = None,
                    block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                    interpret: bool | None = None, _poison: bool = False):
  """Causal (optionally sliding-window) GQA attention over packed rows; differentiable (flash-attention-2 VJP).

  q_BTHE [B, T, H, E], k_BSKE/v_BSKE [B, S=T, K, E] with H % K == 0, segment_ids_BT [B, T] int. Same mask and scale
  as `zaya_jax.ops.attention.xla_attention(q, k, v, causal_mask(segment_ids, sliding_window))`. bf16 or fp32 in,
  fp32 accumulation, output in the input dtype. Block sizes must be powers of two >= 16 (see BLOCK_CONFIGS); they
  shrink to the padded length for short rows. T is padded to a block multiple and E to a power of two >= 16 here.
  interpret=None: interpret mode on CPU, compiled Triton elsewhere.
  """
  # Resolved here, outside the jit: its trace cache does not key on the backend, so a trace made for one platform
  # (interpret mode on CPU) would be reused for a program lowered for another.
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  return _flash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, sliding_window=sliding_window, block_q=block_q,
                          block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                          _poison=_poison)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret", "_poison"))
def _flash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, *, sliding_window, block_q, block_k, num_warps,
                     num_stages, interpret: bool, _poison: bool):
  check_blocks(dict(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                    sliding_window=sliding_window), "flash_attention")
  B, T, H, E = q_BTHE.shape
  Bk, S, K, Ek = k_BSKE.shape
  if (Bk, S, Ek) != (B, T, E) or v_BSKE.shape != k_BSKE.shape:
    raise ValueError(f"need q [B, T, H, E] and k, v [B, T, K, E] (self-attention): {q_BTHE.shape=} "
                     f"{k_BSKE.shape=} {v_BSKE.shape=}")
  if H % K:
    raise ValueError(f"query heads H={H} must be a multiple of kv heads K={K}")
  if segment_ids_BT.shape != (B, T):
    raise ValueError(f"segment_ids_BT must be [B, T] = {(B, T)}, got {segment_ids_BT.shape}")
  dtype = q_BTHE.dtype
  if dtype not in (jnp.bfloat16, jnp.float32, jnp.float16) or k_BSKE.dtype != dtype or v_BSKE.dtype != dtype:
    raise ValueError(f"q, k, v must share one of bf16/fp16/fp32, got {q_BTHE.dtype}, {k_BSKE.dtype}, {v_BSKE.dtype}")

  # Short rows: blocks no longer than the row (padded to 16, the smallest tl.dot dim) avoid computing pure padding.
  row = max(16, pl.next_power_of_2(T))
  block_q, block_k = min(block_q, row), min(block_k, row)
  Tp = pl.cdiv(T, max(block_q, block_k)) * max(block_q, block_k)
  Ep = max(16, pl.next_power_of_2(E))
  st = _Static(scale=E ** -0.5, window=sliding_window, block_q=block_q, block_k=block_k, num_warps=num_warps,
               num_stages=num_stages, interpret=interpret, poison=_poison)

  # Zero padding: extra head-dim columns add 0 to q.k and give 0 output columns; padded positions sit after every
  # real one (causality hides them from real queries) in a segment of their own (each sees its own key: no 0/0).
  seg_BT = segment_ids_BT.astype(jnp.int32)
  if Tp != T:
    pad_id_B1 = jnp.max(seg_BT, axis=1, keepdims=True) + 1
    seg_BT = jnp.concatenate([seg_BT, jnp.broadcast_to(pad_id_B1, (B, Tp - T))], axis=1)
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, Ep - E))
  q, k, v = (jnp.pad(x, pad) if pad != ((0, 0),) * 4 else x for x in (q_BTHE, k_BSKE, v_BSKE))
  first_key_BT, last_query_BT = segment_extent(seg_BT)
  out = _flash(q, k, v, seg_BT, first_key_BT, last_query_BT, st)
  return out[:, :T, :, :E]


def attention_reference(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, *, sliding_window: int | None = None):
  """Plain-JAX attention with the same mask and scale, softmax and matmuls in fp32, output in the input dtype."""
  B, T, H, E = q_BTHE.shape
  K = k_BSKE.shape[2]
  t = jnp.arange(T)
  visible_TS = t[:, None] >= t[None, :]
  if sliding_window is not None:
    visible_TS &= (t[:, None] - t[None, :]) < sliding_window
  mask_BTS = visible_TS[None] & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  q_BTKGE = q_BTHE.astype(F32).reshape(B, T, K, H // K, E)
  hi = lax.Precision.HIGHEST
  scores_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE.astype(F32), precision=hi) * E ** -0.5
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
  out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE.astype(F32), precision=hi)
  return out_BTKGE.reshape(B, T, H, E).astype(q_BTHE.dtype)
