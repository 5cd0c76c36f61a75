"""Compressed Convolutional Attention (CCA), as `transformers.models.zaya` computes it.

B batch, T sequence, D hidden, H query heads, K kv heads, G = H // K, E head dim,
C = (H + K) * E conv channels, P taps of a conv stage (in a decode state: conv_context raw columns),
S decode cache length, J = P + T raw columns of a cached chunk, V = K * E // 2 value channels per half.

Queries and keys are projected down to H*E and K*E channels, mixed over time by two causal
convolutions (depthwise, then full within each head) over the raw `[q | k]` projections, and given
"qk-mean" residuals. Values are half current token, half previous token. Q and K are L2-normalised
to sqrt(E), keys scaled by a learned per-kv-head temperature, partially rotated, and attended with GQA.

Packed sequences: `segment_ids` restart the convolution taps, the delayed value and attention at
every document boundary, so a packed row equals its documents run one by one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.config import AttentionConfig
from zaya_jax.model.layers import F32, Linear, const_param, in_f32, linear, normal_param, rounded, scale_by
from zaya_jax.model.rope import apply_rope, rope_tables
from zaya_jax.ops.attention import attention, cached_attention
from zaya_jax.sharding import active_plan, constrain


def shift_right(x_BT_, n: int, fill=0, axis: int = 1):
  """x[:, t - n] at t (fill where t < n), along `axis` (the time axis; 1 by default)."""
  if n == 0:
    return x_BT_
  pad = jnp.full((*x_BT_.shape[:axis], n, *x_BT_.shape[axis + 1:]), fill, x_BT_.dtype)
  return jax.lax.slice_in_dim(jnp.concatenate([pad, x_BT_], axis=axis), 0, x_BT_.shape[axis], axis=axis)


def heads_split() -> bool:
  """Whether the active sharding plan splits the query heads over a mesh axis (tensor parallelism)."""
  plan = active_plan()
  return plan is not None and bool(plan.mesh_axes("heads"))


def same_segment_as(segment_ids_BT, n: int):
  """[B, T] bool: token t - n exists and lies in t's document."""
  return shift_right(segment_ids_BT, n, fill=-1) == segment_ids_BT


class Conv1d(nnx.Module):
  """Weights of a PyTorch `nn.Conv1d` ([C_out, C_in / groups, P] and bias); applied by `causal_convs`."""

  def __init__(self, channels: int, groups: int, taps: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.weight = normal_param(rngs, (channels, channels // groups, taps), std, param_dtype,
                               ("conv", "conv_in", "taps"))
    self.bias = const_param((channels,), 0.0, param_dtype, ("conv",))


def write_rows(cache, new_BT_, positions_BT, num_new_B, *, seq_axis: int = 1):
  """Row b's first num_new_B[b] new entries written at their positions in a cache [B, S, ...] (seq_axis=1),
  [B, K, S, E] (seq_axis=2, heads-major) or [B, K, E, S] (seq_axis=3, transposed keys); new_BT_ is [B, T, ...] in
  every case.

  Padding tokens aim past the cache and are dropped, so entries past a row's length stay finite (zeros or real keys)
  and a masked-out key can never turn p @ v into NaN.
  """
  B, T = positions_BT.shape
  real_BT = jnp.arange(T)[None] < num_new_B[:, None]
  write_BT = jnp.where(real_BT, positions_BT, cache.shape[seq_axis])
  # Index arrays split by a slice put their [B, T] first: the selected entries are [B, T, K, ...], as new_BT_ is.
  index = (jnp.arange(B)[:, None],) + (slice(None),) * (seq_axis - 1) + (write_BT,)
  return cache.at[index].set(new_BT_.astype(cache.dtype), mode="drop")


def key_value_zeros(cfg: AttentionConfig, batch: int, max_len: int, dtype) -> tuple[jax.Array, jax.Array]:
  """Empty decode-cache keys [B, K, E, S] and values [B, K, S, E]: the layout ops.attention.cached_attention reads."""
  K, E = cfg.num_kv_heads, cfg.head_dim
  return jnp.zeros((batch, K, E, max_len), dtype), jnp.zeros((batch, K, max_len, E), dtype)


class CCACache(NamedTuple):
  """One layer's decode state (static shapes). S cache length. The row lengths live with the whole model's state."""

  # Laid out for a decode step's two matmuls (ops.attention.cached_attention): [B, S, K, E] made XLA:CPU copy both
  # whole caches into another layout at every step (half of a small model's attention time).
  k_BKES: jax.Array  # keys after qk-norm, temperature and RoPE, transposed; compute dtype
  v_BKSE: jax.Array  # values [v_cur | v_del], heads-major; compute dtype
  qk_BPC: jax.Array  # the last P = conv_context raw pre-conv [q|k] columns (zeros before the start); fp32
  v_prev_BV: jax.Array  # [B, K*E/2] v_proj_delayed of the row's last processed token; compute dtype

  @property
  def max_len(self) -> int:
    return self.v_BKSE.shape[2]

  @classmethod
  def zeros(cls, cfg: AttentionConfig, batch: int, max_len: int, dtype) -> CCACache:
    conv_BPC = jnp.zeros((batch, cfg.conv_context, cfg.conv_channels), F32)
    return cls(*key_value_zeros(cfg, batch, max_len, dtype), conv_BPC,
               jnp.zeros((batch, cfg.num_kv_heads * cfg.head_dim // 2), dtype))


class CCAProjection(nnx.Module):

  def __init__(self, cfg: AttentionConfig, hidden_size: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(bias=cfg.use_bias, std=std, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(hidden_size, H * E, axes=("heads", "embed"), **kw)
    self.k_proj = Linear(hidden_size, K * E, axes=("kv", "embed"), **kw)
    self.v_proj_current = Linear(hidden_size, K * E // 2, axes=("kv", "embed"), **kw)
    self.v_proj_delayed = Linear(hidden_size, K * E // 2, axes=("kv", "embed"), **kw)
    conv = dict(std=std, param_dtype=param_dtype, rngs=rngs)
    self.conv_qk_depthwise = Conv1d(cfg.conv_channels, cfg.conv_channels, cfg.cca_time0, **conv)
    self.conv_qk_grouped = Conv1d(cfg.conv_channels, H + K, cfg.cca_time1, **conv)
    self.cfg = cfg

  def causal_convs(self, qk_BTC, segment_ids_BT):
    """Both conv stages over the raw [q|k] projections, each accumulated in fp32 and rounded once.

    Equivalent to left-padding the raw input of every document with `conv_context` zeros and running
    the two convolutions 'valid'. Intermediates that fall before a document start are the depthwise
    conv of zeros, i.e. its bias.
    """
    return self._convs(qk_BTC, segment_ids_BT, slice(None), self.cfg.num_heads + self.cfg.num_kv_heads)

  def causal_convs_split(self, q0_BTHE, k0_BTKE, segment_ids_BT):
    """`causal_convs` on the query and key channels apart (the convs never mix a head's channels with another
    head's): with query heads split over a mesh axis, each device convolves its own heads."""
    B, T, H, E = q0_BTHE.shape
    K = k0_BTKE.shape[2]
    zq = self._convs(q0_BTHE.reshape(B, T, H * E), segment_ids_BT, slice(0, H * E), H, "heads").reshape(B, T, H, E)
    zk = self._convs(k0_BTKE.reshape(B, T, K * E), segment_ids_BT, slice(H * E, None), K, "kv").reshape(B, T, K, E)
    return constrain(zq, ("batch", None, "heads", None)), zk

  def _convs(self, qk_BTC, segment_ids_BT, channels: slice, groups: int, group_axis: str | None = None):
    dtype = qk_BTC.dtype
    B, T, C = qk_BTC.shape
    P0, P1 = self.cfg.cca_time0, self.cfg.cca_time1
    w0_CP = self.conv_qk_depthwise.weight[...][channels, 0, :].astype(dtype).astype(F32)
    b0_C = self.conv_qk_depthwise.bias[...][channels].astype(dtype).astype(F32)
    w1_GOIP = self.conv_qk_grouped.weight[...][channels].astype(dtype).reshape(groups, C // groups, C // groups, P1)
    b1_C = self.conv_qk_grouped.bias[...][channels].astype(dtype).astype(F32)

    # Stage 1 (depthwise): tap p reads x[t - (P0 - 1 - p)].
    y_BTC = b0_C + sum(
        w0_CP[:, p] * jnp.where(same_segment_as(segment_ids_BT, P0 - 1 - p)[..., None],
                                shift_right(qk_BTC, P0 - 1 - p), 0).astype(F32)
        for p in range(P0))
    y_BTC = y_BTC.astype(dtype)
    # Stage 2 (per head, full): tap p reads y[t - n], n = P1 - 1 - p, or the bias-only value before the document.
    # A matmul acts row by row, so y is multiplied unshifted by all taps at once and each tap's product is shifted
    # (in fp32); rows before the document take the product of the bias-only value. Heads lead ([G, B*T, I]): one
    # batched matmul over contiguous heads, and the taps are summed before the one transpose back. Per-head matmuls on
    # strided slices cost XLA:CPU a layout copy per head and tap in the backward (forward + backward 105 vs 76 ms at
    # B=8, T=256, 6 heads of 64 on the 2-core CPU, while another job ran).
    N = B * T
    y_GNI = y_BTC.reshape(N, groups, C // groups).transpose(1, 0, 2)
    w1_GIPO = w1_GOIP.transpose(0, 2, 3, 1)
    z_GBTPO = jnp.einsum("gni,gipo->gnpo", y_GNI, w1_GIPO, preferred_element_type=F32).reshape(
        groups, B, T, P1, C // groups)
    # On a mesh the batch stays split through the heads-major layout (the merged B*T dim lost it: XLA gathered the
    # whole batch here).
    z_GBTPO = constrain(z_GBTPO, (group_axis, "batch", None, None, None))
    z_start_GPO = jnp.einsum("gi,gipo->gpo", b0_C.astype(dtype).reshape(groups, -1), w1_GIPO,
                             preferred_element_type=F32)
    z_GBTO = 0
    for p in range(P1):
      n = P1 - 1 - p
      zp_GBTO = z_GBTPO[:, :, :, p]
      if n:
        zp_GBTO = shift_right(zp_GBTO, n, axis=2)
        zp_GBTO = jnp.where(same_segment_as(segment_ids_BT, n)[None, :, :, None], zp_GBTO,
                            z_start_GPO[:, None, None, p])
      z_GBTO = z_GBTO + zp_GBTO
    z_BTGO = z_GBTO.transpose(1, 2, 0, 3)
    return (z_BTGO.reshape(B, T, C) + b1_C).astype(dtype)

  def __call__(self, h_BTD, segment_ids_BT, context: tuple | None = None):
    """q [B, T, H, E], k and v [B, T, K, E], and the raw columns a decode state keeps.

    `context` None: every document of `segment_ids_BT` starts in h (the training path). Otherwise
    `(qk_BPC, v_prev_BV)`, what came before h's first token in a cached decode (one document per row): the last P
    raw [q|k] columns (zeros before the row's start) and v_proj_delayed of the previous token. Returns
    `(q, k, v), (qk_BTC, v_now_BTV)`: the raw [q|k] columns and v_proj_delayed(h), from which the caller takes the
    state after each row's last real token.
    """
    cfg = self.cfg
    B, T, _ = h_BTD.shape
    H, K, E, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
    C, V = H * E + K * E, K * E // 2
    # With the query heads split over a mesh axis (tensor parallelism) every projection and both convs run apart, so
    # each device keeps its own heads: one [q|k|v] matmul would give XLA slices that straddle the devices. Otherwise
    # one matmul serves all four projections (each output column is the same dot product either way), and the raw
    # [q|k] conv input is then a slice instead of a concatenation.
    split = context is None and heads_split()
    if split:
      q0_BTHE = constrain(self.q_proj(h_BTD).reshape(B, T, H, E), ("batch", None, "heads", None))
      k0_BTKE = constrain(self.k_proj(h_BTD).reshape(B, T, K, E), ("batch", None, "kv", None))
      v_cur_BTV, v_now_BTV = self.v_proj_current(h_BTD), self.v_proj_delayed(h_BTD)
      qk_BTC = jnp.concatenate([q0_BTHE.reshape(B, T, H * E), k0_BTKE.reshape(B, T, K * E)], axis=-1)
    else:
      projs = (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
      w_ND = jnp.concatenate([p.weight[...] for p in projs])
      b_N = None if self.q_proj.bias is None else jnp.concatenate([p.bias[...] for p in projs])
      qkv_BTN = linear(h_BTD, w_ND, b_N)
      qk_BTC = qkv_BTN[..., :C]
      q0_BTHE = qk_BTC[..., :H * E].reshape(B, T, H, E)
      k0_BTKE = qk_BTC[..., H * E:].reshape(B, T, K, E)
      v_cur_BTV, v_now_BTV = qkv_BTN[..., C:C + V], qkv_BTN[..., C + V:]

    # qk-mean residuals from the pre-conv projections: q head i pairs with kv head i // G.
    q_res_BTHE = scale_by(q0_BTHE + jnp.repeat(k0_BTKE, G, axis=2), 0.5)
    k_res_BTKE = q_res_BTHE.reshape(B, T, K, G, E).astype(F32).mean(axis=3).astype(h_BTD.dtype)

    if split:
      zq_BTHE, zk_BTKE = self.causal_convs_split(q0_BTHE, k0_BTKE, segment_ids_BT)
    else:
      if context is None:
        z_BTC = self.causal_convs(qk_BTC, segment_ids_BT)
      else:
        # The reference's cache path: the cached raw columns prepended, both convs run 'valid'. As one segment
        # through `causal_convs`, the first P outputs (which would see the zero left padding) are dropped.
        qk_prev_BPC, v_prev_BV = context
        qk_all_BJC = jnp.concatenate([qk_prev_BPC.astype(qk_BTC.dtype), qk_BTC], axis=1)
        z_BTC = self.causal_convs(qk_all_BJC, jnp.zeros(qk_all_BJC.shape[:2], jnp.int32))[:, qk_prev_BPC.shape[1]:]
      zq_BTHE, zk_BTKE = z_BTC[..., :H * E].reshape(B, T, H, E), z_BTC[..., H * E:].reshape(B, T, K, E)
    q_BTHE = zq_BTHE + q_res_BTHE
    k_BTKE = zk_BTKE + k_res_BTKE

    # Values: current token in the first K*E/2 channels, previous token (per document) in the rest.
    if context is None:
      v_start_V = self.start_value(h_BTD.dtype)
      v_del_BTV = jnp.where(same_segment_as(segment_ids_BT, 1)[..., None], shift_right(v_now_BTV, 1), v_start_V)
    else:
      v_del_BTV = jnp.concatenate([v_prev_BV[:, None].astype(v_now_BTV.dtype), v_now_BTV[:, :-1]], axis=1)
    v_BTKE = jnp.concatenate([v_cur_BTV, v_del_BTV], axis=-1).reshape(B, T, K, E)
    return (q_BTHE, k_BTKE, v_BTKE), (qk_BTC, v_now_BTV)

  def start_value(self, dtype):
    """[K*E/2] v_proj_delayed of zeros: the delayed value of a document's first token."""
    return self.v_proj_delayed(jnp.zeros((1, self.v_proj_delayed.weight.shape[1]), dtype))[0]


def l2_normalize_to_sqrt_dim(x_BTNE):
  dtype = x_BTNE.dtype
  sum_sq = jnp.sum(jnp.square(x_BTNE.astype(F32)), axis=-1, keepdims=True)
  # `rounded` ends XLA:CPU's YNNPACK fusion at the sum: fused with what follows (from ~512 tokens on), it skipped the
  # bf16 rounding of the reciprocal below, and earlier positions' logits changed with the sequence length.
  norm = jnp.sqrt(rounded(sum_sq, sum_sq)).astype(dtype)
  norm = jnp.maximum(norm, jnp.finfo(dtype).eps)
  # The reference writes `sqrt(E) / norm`; PyTorch evaluates a scalar divided by a tensor as
  # `reciprocal(norm) * sqrt(E)`, rounding the reciprocal first. Matters in bf16 when sqrt(E) is inexact.
  return x_BTNE * scale_by(in_f32(jnp.reciprocal, norm), math.sqrt(x_BTNE.shape[-1]))


class QKNorm(nnx.Module):

  def __init__(self, num_kv_heads: int, *, param_dtype):
    # A raw multiplier, init 0 as in the reference.
    self.temp = const_param((num_kv_heads,), 0.0, param_dtype, ("kv_heads",))

  def __call__(self, q_BTHE, k_BTKE):
    k_BTKE = l2_normalize_to_sqrt_dim(k_BTKE) * self.temp[...].astype(k_BTKE.dtype)[None, None, :, None]
    return l2_normalize_to_sqrt_dim(q_BTHE), k_BTKE


class AttentionBlock(nnx.Module):
  """What every attention kind shares: the training-path call and the output projection.

  A kind defines `queries_keys_values(h_BTD, segment_ids_BT, positions_BT)` -> (q [B, T, H, E], k and v [B, T, K, E],
  anything) and `extend(h_BTD, positions_BT, num_new_B, cache, fresh)` -> (output, cache), and sets o_proj, cfg,
  layer_type.
  """

  @property
  def sliding_window(self) -> int | None:
    return self.cfg.sliding_window if self.layer_type == "hybrid_sliding" else None

  def output(self, out_BTHE):
    B, T = out_BTHE.shape[:2]
    return self.o_proj(out_BTHE.reshape(B, T, self.cfg.num_heads * self.cfg.head_dim))

  def attend_cache(self, q_BTHE, k_BTKE, v_BTKE, k_BKES, v_BKSE, positions_BT, fresh: bool):
    """The cached path's attention core, with this layer's window and backend: the new queries against the cache
    (ops.attention.cached_attention), which already holds the new keys and values.

    `fresh` (static) promises that every row starts at position 0 (a prefill into an empty state): the chunk then
    only sees itself, so it runs as training's causal attention over the new keys and values, O(T) memory with the
    flash kernel instead of [T, S] scores. Right padding follows every real token, so causality hides it.
    """
    if fresh:
      segment_ids_BT = jnp.zeros(positions_BT.shape, jnp.int32)
      return attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, sliding_window=self.sliding_window,
                       backend=self.cfg.backend)
    return cached_attention(q_BTHE, k_BKES, v_BKSE, positions_BT, sliding_window=self.sliding_window,
                            backend=self.cfg.backend)

  def __call__(self, h_BTD, segment_ids_BT, positions_BT):
    q_BTHE, k_BTKE, v_BTKE, _ = self.queries_keys_values(h_BTD, segment_ids_BT, positions_BT)
    out_BTHE = attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, sliding_window=self.sliding_window,
                         backend=self.cfg.backend)
    return self.output(out_BTHE)


class CCAttention(AttentionBlock):

  def __init__(self, cfg: AttentionConfig, hidden_size: int, layer_type: str, *, std: float, param_dtype,
               rngs: nnx.Rngs):
    self.qkv_proj = CCAProjection(cfg, hidden_size, std=std, param_dtype=param_dtype, rngs=rngs)
    self.qk_norm = QKNorm(cfg.num_kv_heads, param_dtype=param_dtype)
    self.o_proj = Linear(cfg.num_heads * cfg.head_dim, hidden_size, bias=cfg.use_bias, std=std,
                         param_dtype=param_dtype, rngs=rngs, axes=("embed", "heads"))
    self.cfg = cfg
    self.layer_type = layer_type

  def queries_keys_values(self, h_BTD, segment_ids_BT, positions_BT, context=None):
    """Normalised, scaled and rotated q and k, v, and the raw columns for a decode state (see CCAProjection)."""
    (q_BTHE, k_BTKE, v_BTKE), raw = self.qkv_proj(h_BTD, segment_ids_BT, context)
    q_BTHE, k_BTKE = self.qk_norm(q_BTHE, k_BTKE)
    theta, rotary_dim = self.cfg.rope(self.layer_type)
    cos, sin = rope_tables(positions_BT, theta, rotary_dim, h_BTD.dtype)
    q_BTHE, k_BTKE = apply_rope(q_BTHE, cos, sin), apply_rope(k_BTKE, cos, sin)
    return (constrain(q_BTHE, ("batch", None, "heads", None)), constrain(k_BTKE, ("batch", None, "kv", None)),
            constrain(v_BTKE, ("batch", None, "kv", None)), raw)

  def extend(self, h_BTD, positions_BT, num_new_B, cache: CCACache, fresh: bool = False):
    """The cached path: row b appends its first num_new_B[b] tokens of h at positions_BT[b] (= its length + t).

    Tokens past num_new_B[b] are right padding: their outputs are garbage, they write nothing to the cache and the
    state is taken after the last real token. `fresh`: see attend_cache. Returns (output [B, T, D], updated cache).
    """
    # A row that has seen nothing starts a document: zero conv context (as stored) and the zero-input delayed value.
    v_prev_BV = jnp.where((positions_BT[:, 0] == 0)[:, None], self.qkv_proj.start_value(h_BTD.dtype),
                          cache.v_prev_BV)
    context = (cache.qk_BPC, v_prev_BV)
    q_BTHE, k_BTKE, v_BTKE, (qk_BTC, v_now_BTV) = self.queries_keys_values(h_BTD, None, positions_BT, context)

    k_BKES = write_rows(cache.k_BKES, k_BTKE, positions_BT, num_new_B, seq_axis=3)
    v_BKSE = write_rows(cache.v_BKSE, v_BTKE, positions_BT, num_new_B, seq_axis=2)
    out_BTHE = self.attend_cache(q_BTHE, k_BTKE, v_BTKE, k_BKES, v_BKSE, positions_BT, fresh)

    # State after each row's last real token: the last P raw columns of [context | real new columns] and the delayed
    # projection of that token (the old state where a row adds nothing).
    qk_all_BJC = jnp.concatenate([cache.qk_BPC, qk_BTC.astype(cache.qk_BPC.dtype)], axis=1)
    P = cache.qk_BPC.shape[1]
    qk_BPC = jnp.take_along_axis(qk_all_BJC, (num_new_B[:, None] + jnp.arange(P)[None])[..., None], axis=1)
    v_all_BTV = jnp.concatenate([v_prev_BV[:, None], v_now_BTV], axis=1)  # [B, 1 + T, V]
    v_prev_BV = jnp.take_along_axis(v_all_BTV, num_new_B[:, None, None], axis=1)[:, 0]
    return self.output(out_BTHE), CCACache(k_BKES, v_BKSE, qk_BPC, v_prev_BV.astype(cache.v_prev_BV.dtype))
