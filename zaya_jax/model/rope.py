"""Partial NeoX rotary embedding: only the first `rotary_dim` of each head rotate, halves split.

B batch, T sequence, N heads, E head dim, R rotary dim.
"""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32


def rope_tables(positions_BT, theta: float, rotary_dim: int, dtype):
  """cos, sin [B, T, R], computed in fp32 and rounded to the compute dtype as the reference does."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim))
  freqs_BTh = positions_BT.astype(F32)[..., None] * inv_freq
  emb_BTR = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.cos(emb_BTR).astype(dtype), jnp.sin(emb_BTR).astype(dtype)


def apply_rope(x_BTNE, cos_BTR, sin_BTR):
  rotary_dim = cos_BTR.shape[-1]
  x_rot, x_pass = x_BTNE[..., :rotary_dim], x_BTNE[..., rotary_dim:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
  return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
