"""The attention kinds a ZAYA1 layer can hold: CCA (ZAYA1's own) and, for ablations, plain GQA/MHA and MLA.

B batch, T sequence, D hidden, H query heads, K kv heads, E head dim, S decode cache length, N = R + Er: an MLA
cache row (R latent width, Er rotary dim).

All kinds share the layer around them (norms, residual merges, the MoE), the attention core (`ops.attention`, so
the same backends and masks), RoPE, and the decode-cache writes; only how q, k and v are made and what a decode
step caches differ:
  cca  CCACache: post-RoPE k [B, K, E, S] and v [B, K, S, E], a constant conv and delayed-value state (model.cca)
  gqa  KVCache:  post-RoPE k [B, K, E, S] and v [B, K, S, E]; multi-head attention when num_kv_heads == num_heads
  mla  MLACache: the normalised latent and the shared post-RoPE key [B, S, R + Er]; k and v are re-expanded from it
       at every step (the "absorbed" form that skips the expansion is a speed optimisation left out).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.config import AttentionConfig
from zaya_jax.model.cca import AttentionBlock, CCACache, CCAttention, key_value_zeros, write_rows
from zaya_jax.model.layers import Linear, RMSNorm
from zaya_jax.model.rope import apply_rope, rope_tables


class KVCache(NamedTuple):
  k_BKES: jax.Array  # post-RoPE keys, compute dtype; laid out as CCACache's
  v_BKSE: jax.Array

  @property
  def max_len(self) -> int:
    return self.v_BKSE.shape[2]

  @classmethod
  def zeros(cls, cfg: AttentionConfig, batch: int, max_len: int, dtype) -> KVCache:
    return cls(*key_value_zeros(cfg, batch, max_len, dtype))


class GQAttention(AttentionBlock):
  """Llama-style grouped-query attention: q, k, v projections, partial RoPE as configured, 1/sqrt(E) scores."""

  def __init__(self, cfg: AttentionConfig, hidden_size: int, layer_type: str, *, std: float, param_dtype,
               rngs: nnx.Rngs):
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(bias=cfg.use_bias, std=std, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(hidden_size, H * E, axes=("heads", "embed"), **kw)
    self.k_proj = Linear(hidden_size, K * E, axes=("kv", "embed"), **kw)
    self.v_proj = Linear(hidden_size, K * E, axes=("kv", "embed"), **kw)
    self.o_proj = Linear(H * E, hidden_size, axes=("embed", "heads"), **kw)
    self.cfg = cfg
    self.layer_type = layer_type

  def queries_keys_values(self, h_BTD, segment_ids_BT, positions_BT):
    B, T, _ = h_BTD.shape
    H, K, E = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
    theta, rotary_dim = self.cfg.rope(self.layer_type)
    cos, sin = rope_tables(positions_BT, theta, rotary_dim, h_BTD.dtype)
    q_BTHE = apply_rope(self.q_proj(h_BTD).reshape(B, T, H, E), cos, sin)
    k_BTKE = apply_rope(self.k_proj(h_BTD).reshape(B, T, K, E), cos, sin)
    return q_BTHE, k_BTKE, self.v_proj(h_BTD).reshape(B, T, K, E), None

  def extend(self, h_BTD, positions_BT, num_new_B, cache: KVCache, fresh: bool = False):
    q_BTHE, k_BTKE, v_BTKE, _ = self.queries_keys_values(h_BTD, None, positions_BT)
    k_BKES = write_rows(cache.k_BKES, k_BTKE, positions_BT, num_new_B, seq_axis=3)
    v_BKSE = write_rows(cache.v_BKSE, v_BTKE, positions_BT, num_new_B, seq_axis=2)
    out_BTHE = self.attend_cache(q_BTHE, k_BTKE, v_BTKE, k_BKES, v_BKSE, positions_BT, fresh)
    return self.output(out_BTHE), KVCache(k_BKES, v_BKSE)


class MLACache(NamedTuple):
  latent_BSN: jax.Array  # [normalised latent (R) | shared post-RoPE key (Er)], compute dtype

  @property
  def max_len(self) -> int:
    return self.latent_BSN.shape[1]

  @classmethod
  def zeros(cls, cfg: AttentionConfig, batch: int, max_len: int, dtype) -> MLACache:
    _, rotary_dim = cfg.rope("hybrid")
    return cls(jnp.zeros((batch, max_len, cfg.mla_kv_rank + rotary_dim), dtype))


class MLAttention(AttentionBlock):
  """Multi-head latent attention (DeepSeek-V2) with decoupled RoPE, without the query compression.

  Each head's first Er = rotary_dim dims carry position: a per-head rotated query part against one rotated key
  shared by all heads; the other E - Er dims of keys and all E of values come from the latent (K heads of them).
  """

  def __init__(self, cfg: AttentionConfig, hidden_size: int, layer_type: str, *, std: float, param_dtype,
               rngs: nnx.Rngs):
    H, K, E, R = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mla_kv_rank
    _, Er = cfg.rope(layer_type)
    kw = dict(std=std, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(hidden_size, H * E, bias=cfg.use_bias, axes=("heads", "embed"), **kw)
    self.kv_a_proj = Linear(hidden_size, R + Er, bias=cfg.use_bias, axes=("latent", "embed"), **kw)
    self.kv_a_norm = RMSNorm(R, eps=1e-6, param_dtype=param_dtype, axis="latent")  # DeepSeek-V2's epsilon
    # Keys and values from the latent as two projections, so that a tensor split of their rows splits whole heads.
    self.k_b_proj = Linear(R, K * (E - Er), bias=False, axes=("kv", "latent"), **kw)
    self.v_b_proj = Linear(R, K * E, bias=False, axes=("kv", "latent"), **kw)
    self.o_proj = Linear(H * E, hidden_size, bias=cfg.use_bias, axes=("embed", "heads"), **kw)
    self.cfg = cfg
    self.layer_type = layer_type

  def _rope(self, positions_BT, dtype):
    theta, rotary_dim = self.cfg.rope(self.layer_type)
    return rope_tables(positions_BT, theta, rotary_dim, dtype)

  def queries_and_latent(self, h_BTD, positions_BT):
    """Rotated queries [B, T, H, E] and the cache rows [B, T, R + Er] of these tokens."""
    B, T, _ = h_BTD.shape
    R = self.cfg.mla_kv_rank
    cos, sin = self._rope(positions_BT, h_BTD.dtype)
    q_BTHE = apply_rope(self.q_proj(h_BTD).reshape(B, T, self.cfg.num_heads, self.cfg.head_dim), cos, sin)
    a_BTN = self.kv_a_proj(h_BTD)
    k_rope_BTE = apply_rope(a_BTN[:, :, None, R:], cos, sin)[:, :, 0]
    return q_BTHE, jnp.concatenate([self.kv_a_norm(a_BTN[..., :R]), k_rope_BTE], axis=-1)

  def expand(self, latent_BSN):
    """Keys and values [B, S, K, E] from cache rows."""
    B, S, _ = latent_BSN.shape
    K, E, R = self.cfg.num_kv_heads, self.cfg.head_dim, self.cfg.mla_kv_rank
    Er = latent_BSN.shape[-1] - R
    latent_BSR = latent_BSN[..., :R]
    k_nope_BSKE = self.k_b_proj(latent_BSR).reshape(B, S, K, E - Er)
    k_rope_BSKE = jnp.broadcast_to(latent_BSN[:, :, None, R:], (B, S, K, Er))
    return jnp.concatenate([k_rope_BSKE, k_nope_BSKE], axis=-1), self.v_b_proj(latent_BSR).reshape(B, S, K, E)

  def queries_keys_values(self, h_BTD, segment_ids_BT, positions_BT):
    q_BTHE, latent_BTN = self.queries_and_latent(h_BTD, positions_BT)
    return q_BTHE, *self.expand(latent_BTN), None

  def extend(self, h_BTD, positions_BT, num_new_B, cache: MLACache, fresh: bool = False):
    q_BTHE, latent_BTN = self.queries_and_latent(h_BTD, positions_BT)
    latent_BSN = write_rows(cache.latent_BSN, latent_BTN, positions_BT, num_new_B)
    if fresh:  # the chunk sees only itself: expand its own rows, not the whole cache
      out_BTHE = self.attend_cache(q_BTHE, *self.expand(latent_BTN), None, None, positions_BT, fresh)
    else:
      k_BSKE, v_BSKE = self.expand(latent_BSN)
      out_BTHE = self.attend_cache(q_BTHE, None, None, k_BSKE.transpose(0, 2, 3, 1), v_BSKE.transpose(0, 2, 1, 3),
                                   positions_BT, fresh)
    return self.output(out_BTHE), MLACache(latent_BSN)


_KINDS = {"cca": (CCAttention, CCACache), "gqa": (GQAttention, KVCache), "mla": (MLAttention, MLACache)}


def attention_module(cfg: AttentionConfig, hidden_size: int, layer_type: str, *, std: float, param_dtype,
                     rngs: nnx.Rngs) -> AttentionBlock:
  return _KINDS[cfg.kind][0](cfg, hidden_size, layer_type, std=std, param_dtype=param_dtype, rngs=rngs)


def empty_cache(cfg: AttentionConfig, batch: int, max_len: int, dtype):
  """One layer's decode state before any token."""
  return _KINDS[cfg.kind][1].zeros(cfg, batch, max_len, dtype)
