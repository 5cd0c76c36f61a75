"""Partial NeoX rotary embedding: only the first `rotary_dim` of each head rotate, halves split.

B batch, T sequence, N heads, E head dim, R rotary dim.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def inverse_frequencies(theta: float, rotary_dim: int) -> np.ndarray:
  """fp32 [R / 2]: 1 / theta^(2i / R), a constant as close to torch's table as numpy gets. The exponent is divided
  in fp32 on the host (XLA:CPU's division is not correctly rounded: 10 / 12 -> 0.8333334), the power taken in fp64
  and rounded; torch's vectorised fp32 pow still differs in ~1% of entries over R <= 256 (none for ZAYA1-8B's
  tables), against ~25% for the same formula in jnp."""
  exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
  return np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def rope_tables(positions_BT, theta: float, rotary_dim: int, dtype):
  """cos, sin [B, T, R], computed in fp32 and rounded to the compute dtype as the reference does."""
  inv_freq = jnp.asarray(inverse_frequencies(theta, rotary_dim))
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
