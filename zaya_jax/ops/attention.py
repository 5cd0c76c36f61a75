"""Attention core behind a backend switch. CCA hands it queries, keys and values in its latent space.

B batch, T query length, S key length, H query heads, K kv heads, G = H // K, E head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya_jax.config import ATTENTION_BACKENDS

F32 = jnp.float32


def causal_mask(segment_ids_BT, sliding_window: int | None = None):
  """[B, T, T] bool: query t sees key s iff s <= t, same segment, and t - s < sliding_window."""
  t = jnp.arange(segment_ids_BT.shape[1])
  visible_TS = t[:, None] >= t[None, :]
  if sliding_window is not None:
    visible_TS &= (t[:, None] - t[None, :]) < sliding_window
  same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return visible_TS[None] & same_segment_BTS


def xla_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """Eager-reference attention: scores rounded to the compute dtype, then scaled, softmax in fp32."""
  B, T, H, E = q_BTHE.shape
  K = k_BSKE.shape[2]
  dtype = q_BTHE.dtype
  q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
  scores_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=F32).astype(dtype)
  scores_BKGTS = scores_BKGTS.astype(F32) * (E ** -0.5)
  scores_BKGTS = scores_BKGTS.astype(dtype).astype(F32)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)
  out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE, preferred_element_type=F32).astype(dtype)
  return out_BTKGE.reshape(B, T, H, E)


_BACKENDS = {"xla": xla_attention}
assert set(_BACKENDS) == set(ATTENTION_BACKENDS)


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, backend: str = "xla"):
  return _BACKENDS[backend](q_BTHE, k_BSKE, v_BSKE, mask_BTS)
