"""Cached decoding: a static-shape decode state, ragged right-padded prefill, one-token decode steps, all jitted.

B batch, T new tokens per row in a call, S = max_len cache length, D hidden, V vocab, L layers.

Per layer the state keeps what the reference's cache keeps (ZAYA_ARCH.md §2.10): post-RoPE keys ([B, K, E, S]) and
values ([B, K, S, E]), the last conv_context raw [q|k] columns (fp32) and the delayed value of the last token
(the ablations' attention kinds keep their own caches: model/attention_kinds.py); `lengths_B` is shared by all layers.
Prefill and decode step are the same function (each layer's attention `extend`, e.g. `CCAttention.extend`): row b
appends its first n_b new tokens at positions lengths_B[b] + t, attends to cache entries at or before each token's
position, and moves its length by n_b. The router's EDA state flows through depth per token and is not cached.

Both entry points compile once per shape (prefill: per [B, T]; decode: per B) with `forward()`'s exact rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.config import ZayaConfig
from zaya_jax.model.attention_kinds import empty_cache
from zaya_jax.model.decoder import EXACT_ROUNDING, ZayaForCausalLM, check_token_ids


class DecodeState(NamedTuple):
  layers: tuple  # one cache per layer, of its attention kind (CCACache for ZAYA1; see model/attention_kinds.py)
  lengths_B: jax.Array  # int32 tokens seen per row (the next token's position)

  @property
  def max_len(self) -> int:
    return self.layers[0].max_len


def init_state(cfg: ZayaConfig, batch: int, max_len: int) -> DecodeState:
  """An empty state: zero caches (a fresh row's conv context is zeros, as the reference pads it), lengths 0."""
  if not (isinstance(batch, int) and batch > 0 and isinstance(max_len, int) and max_len > 0):
    raise ValueError(f"batch and max_len must be positive ints, got {batch!r}, {max_len!r}")
  layers = tuple(empty_cache(cfg.attention, batch, max_len, cfg.compute_dtype) for _ in range(cfg.num_layers))
  return DecodeState(layers, jnp.zeros((batch,), jnp.int32))


def _extend(model: ZayaForCausalLM, state: DecodeState, tokens_BT, num_new_B, fresh: bool = False):
  """Appends tokens_BT[b, :num_new_B[b]] to row b: (logits of each row's last new token [B, V], new state).

  `fresh` (static) promises an empty state (every length 0): the chunk's attention then runs over the chunk alone
  (`AttentionBlock.attend_cache`), as training's does, instead of over the whole cache.
  """
  T = tokens_BT.shape[1]
  positions_BT = state.lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)
  x_BTD = model.model.embed(tokens_BT)
  router_state_BTR = None
  caches = []
  for layer, cache in zip(model.model.layers, state.layers, strict=True):
    x_BTD, router_state_BTR, _, cache = layer.extend(x_BTD, router_state_BTR, positions_BT, num_new_B, cache, fresh)
    caches.append(cache)
  # Norm and head act per token: only each row's last real token needs them.
  x_BD = jnp.take_along_axis(x_BTD, (num_new_B - 1)[:, None, None], axis=1)[:, 0]
  logits_BV = model.logits(model.model.norm(x_BD.astype(model.config.compute_dtype)))
  lengths_B = state.lengths_B + num_new_B
  # A row past the cache had its writes dropped: NaN logits make that visible without a host sync per step.
  logits_BV = jnp.where((lengths_B <= state.max_len)[:, None], logits_BV, jnp.nan)
  return logits_BV, DecodeState(tuple(caches), lengths_B)


_jitted_extend = jax.jit(_extend, compiler_options=EXACT_ROUNDING, static_argnames="fresh")
# Donating the state lets XLA write the caches in place instead of copying them every step; the old state is invalid.
_jitted_extend_donated = jax.jit(_extend, compiler_options=EXACT_ROUNDING, static_argnames="fresh", donate_argnums=1)


def _run(model, state, tokens_BT, num_new_B, donate_state: bool, fresh: bool = False):
  return (_jitted_extend_donated if donate_state else _jitted_extend)(model, state, tokens_BT, num_new_B,
                                                                       fresh=fresh)


def prefill(model: ZayaForCausalLM, state: DecodeState, tokens_BT, lengths_B, *, donate_state: bool = False):
  """Appends right-padded ragged prompts: row b's tokens are tokens_BT[b, :lengths_B[b]] (0 <= lengths_B[b] <= T;
  a row given 0 tokens, in a chunked prefill, is left as it was and its logits are meaningless).

  Usually `state` is fresh (`init_state`): the prompts then attend among themselves only (O(T) memory with the flash
  kernel). A non-empty state continues each row (chunked prefill), its chunk attending to the whole cache.
  Returns (logits of each row's last real token [B, V] in the compute dtype, state). Padding never reaches the
  state: convolution and delayed-value states are taken at each row's last real token, cache entries past a row's
  length are not written. Raises ValueError, before compiling, when a row would not fit in max_len.
  """
  raw_BT = np.asarray(tokens_BT)
  if not np.issubdtype(raw_BT.dtype, np.integer):
    check_token_ids(raw_BT, model.config.vocab_size)  # names the dtype
  lengths = np.asarray(lengths_B)
  if raw_BT.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq], got shape {raw_BT.shape}")
  B, T = raw_BT.shape
  if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"lengths must be {B} integers (one per row), got {lengths.dtype} of shape {lengths.shape}")
  if state.lengths_B.shape != (B,):
    raise ValueError(f"the state holds {state.lengths_B.shape[0]} rows, the tokens {B}")
  if lengths.min() < 0 or lengths.max() > T:
    raise ValueError(f"lengths must lie in [0, {T}] (0 leaves a row as it is), got {lengths.tolist()}")
  in_prompt_BT = np.arange(T)[None] < lengths[:, None]
  check_token_ids(raw_BT[in_prompt_BT], model.config.vocab_size)  # the padding after a row's tokens is ignored
  tokens_BT = np.where(in_prompt_BT, raw_BT, 0).astype(np.int32)
  cached = np.asarray(state.lengths_B)
  total = cached + lengths
  if total.max() > state.max_len:
    b = int(total.argmax())
    raise ValueError(f"row {b}: {int(lengths[b])} prompt tokens after {int(total[b] - lengths[b])} cached ones "
                     f"exceed the cache's max_len={state.max_len}; build the state with a larger max_len")
  return _run(model, state, tokens_BT, jnp.asarray(lengths, jnp.int32), donate_state, fresh=not cached.any())


def decode_step(model: ZayaForCausalLM, state: DecodeState, tokens_B, *, donate_state: bool = False):
  """Appends one token per row at position lengths_B: (logits [B, V], state with lengths + 1).

  Not checked on the host (that would sync every step): ids given as host arrays are checked, device arrays (e.g.
  the argmax of the previous step) are trusted; a row already at max_len gets NaN logits.
  """
  if not isinstance(tokens_B, jax.Array):
    check_token_ids(tokens_B, model.config.vocab_size)
  tokens_B = jnp.asarray(tokens_B, jnp.int32)
  if tokens_B.shape != state.lengths_B.shape:
    raise ValueError(f"tokens must be [batch] = {state.lengths_B.shape}, got shape {tokens_B.shape}")
  return _run(model, state, tokens_B[:, None], jnp.ones_like(tokens_B), donate_state)


__all__ = ["DecodeState", "decode_step", "init_state", "prefill"]
