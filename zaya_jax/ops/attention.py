"""Attention core behind a backend switch. CCA hands it queries, keys and values in its latent space.

B batch, T query length, S key length, H query heads, K kv heads, G = H // K, E head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya_jax.config import ATTENTION_BACKENDS

F32 = jnp.float32
QUERY_BLOCKS = 4  # of causal attention


def causal_mask(segment_ids_BT, sliding_window: int | None = None):
  """[B, T, T] bool: query t sees key s iff s <= t, same segment, and t - s < sliding_window."""
  t = jnp.arange(segment_ids_BT.shape[1])
  visible_TS = t[:, None] >= t[None, :]
  if sliding_window is not None:
    visible_TS &= (t[:, None] - t[None, :]) < sliding_window
  same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return visible_TS[None] & same_segment_BTS


def xla_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, *, causal: bool = False):
  """Eager-reference attention: scores rounded to the compute dtype, then scaled, softmax in fp32.

  Heads lead ([B, K, G, T, E]) so that both matmuls are plain batched matmuls over contiguous rows and the
  [T, S] scores need no transposes (XLA:CPU otherwise copies them to and from a [S, G*T] dot layout).
  `causal=True` promises that the mask hides every key after its query (S == T): query blocks then skip the
  keys after their last query. Those keys' probabilities are exactly zero, so the result is the same.
  """
  k_BKSE, v_BKSE = k_BSKE.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3)
  q_BKGTE = _queries_heads_major(q_BTHE, k_BKSE.shape[1])
  T = q_BKGTE.shape[3]
  if causal:
    # Up to QUERY_BLOCKS blocks whose lengths are multiples of 64 rows (vector-friendly reductions); 4 blocks skip
    # 3/8 of the T x T square.
    rows = -(-T // QUERY_BLOCKS // 64) * 64
    out_BKGTE = jnp.concatenate([
        _attend(q_BKGTE[:, :, :, t0:t0 + rows], k_BKSE[:, :, :t0 + rows], v_BKSE[:, :, :t0 + rows],
                mask_BTS[:, t0:t0 + rows, :t0 + rows])
        for t0 in range(0, T, rows)], axis=3)
  else:
    out_BKGTE = _attend(q_BKGTE, k_BKSE, v_BKSE, mask_BTS)
  return _queries_back(out_BKGTE)


def cached_attention(q_BTHE, k_BKES, v_BKSE, positions_BT, *, sliding_window: int | None = None,
                     backend: str = "auto"):
  """T new queries at positions_BT over a whole decode cache: query t sees the entries at or before its position
  (within the window), its row's past and the new tokens already written.

  Keys are stored transposed, [B, K, E, S], values heads-major [B, K, S, E]: both matmuls then contract over their
  operand's major dim. With keys [B, K, S, E] the scores contract over the keys' minor dim, which XLA:CPU ran ~3x
  slower at a decode step's shapes (16 rows, 2 kv heads of 64, 160-512 keys: 0.96 vs 0.29 ms).
  Backends: "xla" has the eager reference's numerics (masked entries get probability exactly zero, so they must only
  be finite, as the cache writes keep them); "pallas" runs a one-token step (T = 1) through the flash-decoding kernel
  (pallas_kernels.decode_attention, which reads the cache in place and only each row's visible entries; fp32 softmax
  without the reference's intermediate roundings) and a longer chunk (prefill) through the XLA path.
  """
  T = positions_BT.shape[1]
  S = v_BKSE.shape[2]
  if resolve_backend(backend) == "pallas" and T == 1:
    return _pallas_decode(q_BTHE[:, 0], k_BKES, v_BKSE, positions_BT[:, 0], sliding_window)[:, None]
  _check_backend(backend)
  s_S = jnp.arange(S)
  mask_BTS = s_S[None, None] <= positions_BT[..., None]
  if sliding_window is not None:
    mask_BTS &= (positions_BT[..., None] - s_S[None, None]) < sliding_window
  out_BKGTE = _attend(_queries_heads_major(q_BTHE, v_BKSE.shape[1]), k_BKES, v_BKSE, mask_BTS, keys="bkes")
  return _queries_back(out_BKGTE)


def _pallas_decode(q_BHE, k_BKES, v_BKSE, positions_B, sliding_window):
  from pallas_kernels import decode_attention as kernel  # imported on use: Triton-backend deprecation warnings

  block_k, num_splits, num_warps, num_stages = kernel.default_block_config()
  # A row past the cache (its write was dropped; decode marks its logits NaN) must not read past the cache's end.
  lengths_B = jnp.minimum(positions_B + 1, v_BKSE.shape[2])
  return kernel.decode_attention(q_BHE, k_BKES, v_BKSE, lengths_B, sliding_window=sliding_window, block_k=block_k,
                                 num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


def _queries_heads_major(q_BTHE, K: int):
  B, T, H, E = q_BTHE.shape
  return q_BTHE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)


def _queries_back(out_BKGTE):
  B, K, G, T, E = out_BKGTE.shape
  return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, E)


def _attend(q_BKGTE, k, v_BKSE, mask_BTS, *, keys: str = "bkse"):
  """`keys` names the layout of `k`: "bkse" (heads-major) or "bkes" (transposed, as the decode cache holds them)."""
  E = q_BKGTE.shape[-1]
  dtype = q_BKGTE.dtype
  scores_BKGTS = jnp.einsum(f"bkgte,{keys}->bkgts", q_BKGTE, k, preferred_element_type=F32).astype(dtype)
  scores_BKGTS = scores_BKGTS.astype(F32) * (E ** -0.5)
  scores_BKGTS = scores_BKGTS.astype(dtype).astype(F32)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bkse->bkgte", probs_BKGTS, v_BKSE, preferred_element_type=F32).astype(dtype)


def _pallas_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, sliding_window):
  from pallas_kernels import cca_attention  # imported on use: Triton-backend deprecation warnings

  block_q, block_k, num_warps, num_stages = cca_attention.default_block_config()
  return cca_attention.flash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, sliding_window=sliding_window,
                                       block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages)


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """"auto": the Pallas flash kernel on GPU (Triton: CUDA and ROCm); elsewhere the XLA path (on CPU, the
  eager-reference numerics). `platform` ("gpu", "cpu", ...): resolve for it instead of JAX's default backend."""
  if backend != "auto":
    return backend
  return "pallas" if (platform or jax.default_backend()) == "gpu" else "xla"


def _check_backend(backend: str) -> None:
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")


def attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, *, sliding_window: int | None = None, backend: str = "auto"):
  """Causal self-attention over packed rows (query t sees key s <= t of its segment, within the window)."""
  _check_backend(backend)
  if resolve_backend(backend) == "pallas":
    return _pallas_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, sliding_window)
  return xla_attention(q_BTHE, k_BSKE, v_BSKE, causal_mask(segment_ids_BT, sliding_window), causal=True)
