"""Compressed Convolutional Attention (CCA), as `transformers.models.zaya` computes it.

B batch, T sequence, D hidden, H query heads, K kv heads, G = H // K, E head dim,
C = (H + K) * E conv channels, P taps of a conv stage.

Queries and keys are projected down to H*E and K*E channels, mixed over time by two causal
convolutions (depthwise, then full within each head) over the raw `[q | k]` projections, and given
"qk-mean" residuals. Values are half current token, half previous token. Q and K are L2-normalised
to sqrt(E), keys scaled by a learned per-kv-head temperature, partially rotated, and attended with GQA.

Packed sequences: `segment_ids` restart the convolution taps, the delayed value and attention at
every document boundary, so a packed row equals its documents run one by one.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from zaya_jax.config import AttentionConfig
from zaya_jax.model.layers import F32, Linear, const_param, in_f32, linear, normal_param, scale_by
from zaya_jax.model.rope import apply_rope, rope_tables
from zaya_jax.ops.attention import attention


def shift_right(x_BT_, n: int, fill=0):
  """x[:, t - n] at t (fill where t < n)."""
  if n == 0:
    return x_BT_
  pad = jnp.full((x_BT_.shape[0], n, *x_BT_.shape[2:]), fill, x_BT_.dtype)
  return jnp.concatenate([pad, x_BT_], axis=1)[:, :x_BT_.shape[1]]


def same_segment_as(segment_ids_BT, n: int):
  """[B, T] bool: token t - n exists and lies in t's document."""
  return shift_right(segment_ids_BT, n, fill=-1) == segment_ids_BT


class Conv1d(nnx.Module):
  """Weights of a PyTorch `nn.Conv1d` ([C_out, C_in / groups, P] and bias); applied by `causal_convs`."""

  def __init__(self, channels: int, groups: int, taps: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    self.weight = normal_param(rngs, (channels, channels // groups, taps), std, param_dtype)
    self.bias = const_param((channels,), 0.0, param_dtype)


class CCAProjection(nnx.Module):

  def __init__(self, cfg: AttentionConfig, hidden_size: int, *, std: float, param_dtype, rngs: nnx.Rngs):
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(bias=cfg.use_bias, std=std, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(hidden_size, H * E, **kw)
    self.k_proj = Linear(hidden_size, K * E, **kw)
    self.v_proj_current = Linear(hidden_size, K * E // 2, **kw)
    self.v_proj_delayed = Linear(hidden_size, K * E // 2, **kw)
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
    dtype = qk_BTC.dtype
    B, T, C = qk_BTC.shape
    P0, P1 = self.cfg.cca_time0, self.cfg.cca_time1
    groups = self.cfg.num_heads + self.cfg.num_kv_heads
    w0_CP = self.conv_qk_depthwise.weight[...][:, 0, :].astype(dtype).astype(F32)
    b0_C = self.conv_qk_depthwise.bias[...].astype(dtype).astype(F32)
    w1_GOIP = self.conv_qk_grouped.weight[...].astype(dtype).reshape(groups, C // groups, C // groups, P1)
    b1_C = self.conv_qk_grouped.bias[...].astype(dtype).astype(F32)

    # Stage 1 (depthwise): tap p reads x[t - (P0 - 1 - p)].
    y_BTC = b0_C + sum(
        w0_CP[:, p] * jnp.where(same_segment_as(segment_ids_BT, P0 - 1 - p)[..., None],
                                shift_right(qk_BTC, P0 - 1 - p), 0).astype(F32)
        for p in range(P0))
    y_BTC = y_BTC.astype(dtype)
    # Stage 2 (per head, full): tap p reads y[t - n], n = P1 - 1 - p, or the bias-only value before the document.
    # A matmul acts row by row, so y is multiplied unshifted by all taps at once and each tap's product is shifted
    # (in fp32); rows before the document take the product of the bias-only value. One plain matmul per head:
    # XLA:CPU runs these faster than one batched matmul over the heads (with K = E).
    y_BTGI = y_BTC.reshape(B, T, groups, C // groups)
    w1_GIPO = w1_GOIP.transpose(0, 2, 3, 1)
    z_BTGPO = jnp.stack([jnp.einsum("bti,ipo->btpo", y_BTGI[:, :, g], w1_GIPO[g], preferred_element_type=F32)
                         for g in range(groups)], axis=2)
    z_start_GPO = jnp.einsum("gi,gipo->gpo", b0_C.astype(dtype).reshape(groups, -1), w1_GIPO,
                             preferred_element_type=F32)
    z_BTGO = 0
    for p in range(P1):
      n = P1 - 1 - p
      zp_BTGO = z_BTGPO[:, :, :, p]
      if n:
        zp_BTGO = jnp.where(same_segment_as(segment_ids_BT, n)[..., None, None], shift_right(zp_BTGO, n),
                            z_start_GPO[:, p])
      z_BTGO = z_BTGO + zp_BTGO
    return (z_BTGO.reshape(B, T, C) + b1_C).astype(dtype)

  def __call__(self, h_BTD, segment_ids_BT):
    cfg = self.cfg
    B, T, _ = h_BTD.shape
    H, K, E, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
    # One matmul for all four projections (each output column is the same dot product either way): the raw [q|k]
    # conv input is then a slice instead of a concatenation.
    projs = (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
    w_ND = jnp.concatenate([p.weight[...] for p in projs])
    b_N = None if self.q_proj.bias is None else jnp.concatenate([p.bias[...] for p in projs])
    qkv_BTN = linear(h_BTD, w_ND, b_N)
    C, V = H * E + K * E, K * E // 2
    qk_BTC = qkv_BTN[..., :C]
    q0_BTHE = qk_BTC[..., :H * E].reshape(B, T, H, E)
    k0_BTKE = qk_BTC[..., H * E:].reshape(B, T, K, E)

    # qk-mean residuals from the pre-conv projections: q head i pairs with kv head i // G.
    q_res_BTHE = scale_by(q0_BTHE + jnp.repeat(k0_BTKE, G, axis=2), 0.5)
    k_res_BTKE = q_res_BTHE.reshape(B, T, K, G, E).astype(F32).mean(axis=3).astype(h_BTD.dtype)

    z_BTC = self.causal_convs(qk_BTC, segment_ids_BT)
    q_BTHE = z_BTC[..., :H * E].reshape(B, T, H, E) + q_res_BTHE
    k_BTKE = z_BTC[..., H * E:].reshape(B, T, K, E) + k_res_BTKE

    # Values: current token in the first K*E/2 channels, previous token (per document) in the rest.
    v_cur_BTV, v_now_BTV = qkv_BTN[..., C:C + V], qkv_BTN[..., C + V:]
    v_start_V = self.v_proj_delayed(jnp.zeros((1, h_BTD.shape[-1]), h_BTD.dtype))[0]  # the projection of zeros
    v_del_BTV = jnp.where(same_segment_as(segment_ids_BT, 1)[..., None], shift_right(v_now_BTV, 1), v_start_V)
    v_BTKE = jnp.concatenate([v_cur_BTV, v_del_BTV], axis=-1).reshape(B, T, K, E)
    return q_BTHE, k_BTKE, v_BTKE


def l2_normalize_to_sqrt_dim(x_BTNE):
  dtype = x_BTNE.dtype
  norm = jnp.sqrt(jnp.sum(jnp.square(x_BTNE.astype(F32)), axis=-1, keepdims=True)).astype(dtype)
  norm = jnp.maximum(norm, jnp.finfo(dtype).eps)
  # The reference writes `sqrt(E) / norm`; PyTorch evaluates a scalar divided by a tensor as
  # `reciprocal(norm) * sqrt(E)`, rounding the reciprocal first. Matters in bf16 when sqrt(E) is inexact.
  return x_BTNE * scale_by(in_f32(jnp.reciprocal, norm), math.sqrt(x_BTNE.shape[-1]))


class QKNorm(nnx.Module):

  def __init__(self, num_kv_heads: int, *, param_dtype):
    self.temp = const_param((num_kv_heads,), 0.0, param_dtype)  # raw multiplier, init 0 as in the reference

  def __call__(self, q_BTHE, k_BTKE):
    k_BTKE = l2_normalize_to_sqrt_dim(k_BTKE) * self.temp[...].astype(k_BTKE.dtype)[None, None, :, None]
    return l2_normalize_to_sqrt_dim(q_BTHE), k_BTKE


class CCAttention(nnx.Module):

  def __init__(self, cfg: AttentionConfig, hidden_size: int, layer_type: str, *, std: float, param_dtype,
               rngs: nnx.Rngs):
    self.qkv_proj = CCAProjection(cfg, hidden_size, std=std, param_dtype=param_dtype, rngs=rngs)
    self.qk_norm = QKNorm(cfg.num_kv_heads, param_dtype=param_dtype)
    self.o_proj = Linear(cfg.num_heads * cfg.head_dim, hidden_size, bias=cfg.use_bias, std=std,
                         param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.layer_type = layer_type

  def __call__(self, h_BTD, segment_ids_BT, positions_BT):
    cfg = self.cfg
    q_BTHE, k_BTKE, v_BTKE = self.qkv_proj(h_BTD, segment_ids_BT)
    q_BTHE, k_BTKE = self.qk_norm(q_BTHE, k_BTKE)
    theta, rotary_dim = cfg.rope(self.layer_type)
    cos, sin = rope_tables(positions_BT, theta, rotary_dim, h_BTD.dtype)
    q_BTHE, k_BTKE = apply_rope(q_BTHE, cos, sin), apply_rope(k_BTKE, cos, sin)
    window = cfg.sliding_window if self.layer_type == "hybrid_sliding" else None
    out_BTHE = attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, sliding_window=window, backend=cfg.backend)
    B, T = h_BTD.shape[:2]
    return self.o_proj(out_BTHE.reshape(B, T, cfg.num_heads * cfg.head_dim))
