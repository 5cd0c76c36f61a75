"""Batched generation: ragged prefill and a `lax.while_loop` of cached decode steps in one jitted program.

B batch, L prompt width (right-padded), N = max_new tokens generated per row, S = max_len cache length, V vocab,
Z number of stop token ids.

Row b's prompt is prompts_BL[b, :prompt_lens_B[b]]. The first new token is drawn from the prefill's logits, each later
one from a one-token `_extend` of the previous; step i draws with `fold_in(key, i)`, so a row's tokens depend on the
key, the step, the row's index in the batch and the logits only (not on the batch size or the other rows; equal rows
draw independently). A row is done when it emits a stop token (kept in the output and counted in its
length) or after N tokens; the loop ends when every row is done. Every position after a row's end holds `pad_id` =
the config's pad_token_id (0 when it has none). A done row keeps being fed (pad tokens, results discarded): in a batch
the step costs the same either way, and static shapes need no compaction.

The cache holds a row's prompt and the N - 1 tokens fed back (the last token is never fed), so S >= max(prompt
lengths) + N - 1; by default S = L + N - 1, at most the model's context. Shapes, N, S, the sampling config and the
pad id are static: one compile per (B, L, N, S, Z, sampling). Stop ids are traced values, so changing them (same
count) does not recompile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.infer.decode import _extend, init_state
from zaya_jax.infer.sampling import SamplingConfig, sample
from zaya_jax.model.decoder import EXACT_ROUNDING, ZayaForCausalLM, check_token_ids


class GenerateOutput(NamedTuple):
  tokens_BN: jax.Array  # int32 generated tokens; pad_id after each row's end
  lengths_B: jax.Array  # int32 tokens generated per row, a stop token included


def pad_id(model: ZayaForCausalLM) -> int:
  """The id written after a row's end: the config's pad_token_id, or 0 when it has none. `model` may be anything
  with the model's `.config` (cli.LoadedModel before its weights load). ZayaConfig refuses a pad id outside the
  vocabulary, which would be fed back to finished rows and returned as a token."""
  pad = model.config.pad_token_id
  return 0 if pad is None else int(pad)


def _generate(model: ZayaForCausalLM, prompts_BL, prompt_lens_B, key, stop_ids_Z, *, max_new: int, max_len: int,
              sampling: SamplingConfig, pad: int) -> GenerateOutput:
  """The traceable body: prefill, then decode steps until every row is done or has N tokens."""
  B, _ = prompts_BL.shape
  N = max_new
  prompts_BL = prompts_BL.astype(jnp.int32)
  prompt_lens_B = prompt_lens_B.astype(jnp.int32)
  stop_ids_Z = stop_ids_Z.astype(jnp.int32)

  def is_stop(tokens_B):
    return jnp.any(tokens_B[:, None] == stop_ids_Z[None], axis=-1)  # False everywhere when Z = 0

  logits_BV, state = _extend(model, init_state(model.config, B, max_len), prompts_BL, prompt_lens_B, fresh=True)
  # A row with no prompt is inactive: done from the start, it generates nothing and never keeps the loop going
  # (its share of each step is computed on garbage and discarded).
  active_B = prompt_lens_B > 0
  token_B = jnp.where(active_B, sample(jax.random.fold_in(key, 0), logits_BV, sampling), pad)
  tokens_BN = jnp.full((B, N), pad, jnp.int32).at[:, 0].set(token_B)
  done_B = ~active_B | is_stop(token_B)
  lengths_B = active_B.astype(jnp.int32)
  ones_B = jnp.ones((B,), jnp.int32)

  def cond(carry):
    i, _, done_B, *_ = carry
    return (i < N) & ~jnp.all(done_B)

  def body(carry):
    i, token_B, done_B, tokens_BN, lengths_B, state = carry
    logits_BV, state = _extend(model, state, token_B[:, None], ones_B)
    token_B = jnp.where(done_B, pad, sample(jax.random.fold_in(key, i), logits_BV, sampling))
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, token_B[:, None], (0, i))
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    return i + 1, token_B, done_B | is_stop(token_B), tokens_BN, lengths_B, state

  carry = (jnp.int32(1), token_B, done_B, tokens_BN, lengths_B, state)
  _, _, _, tokens_BN, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(tokens_BN, lengths_B)


_STATIC = ("max_new", "max_len", "sampling", "pad")
_jitted_generate = jax.jit(_generate, static_argnames=_STATIC, compiler_options=EXACT_ROUNDING)
# JAX refuses compiler options on a jit nested in another trace; there the outer program's options apply.
_nested_generate = jax.jit(_generate, static_argnames=_STATIC)


def _under_trace(*args) -> bool:
  """Whether the call happens inside a jax transformation (jit, scan, vmap, ...)."""
  try:
    from jax._src.core import trace_state_clean  # also sees a trace whose inputs are all constants
  except ImportError:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
  return not trace_state_clean()


def _check_static(model: ZayaForCausalLM, sampling, stop_token_ids, max_new, max_len) -> np.ndarray:
  """Checks what does not depend on the prompts; returns the stop ids as int32 [Z]."""
  if not isinstance(sampling, SamplingConfig):
    raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
  if isinstance(max_new, bool) or not isinstance(max_new, int | np.integer) or max_new < 1:
    raise ValueError(f"max_new_tokens must be a positive int (static: one compile per value), got {max_new!r}")
  context = model.config.max_position_embeddings
  if max_len is not None:
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 1:
      raise ValueError(f"max_len must be None or a positive int, got {max_len!r}")
    if max_len > context:
      raise ValueError(f"max_len={max_len} exceeds the model's context max_position_embeddings={context}")
  stop = np.asarray(tuple(stop_token_ids), np.int64).reshape(-1)
  try:
    check_token_ids(stop, model.config.vocab_size)
  except ValueError as e:
    raise ValueError(f"stop_token_ids: {e}") from None
  return stop.astype(np.int32)


def _cache_len(L: int, max_new: int, max_len: int | None) -> int:
  return L + max_new - 1 if max_len is None else int(max_len)


def _check_prompts(model: ZayaForCausalLM, prompts_BL, prompt_lens_B, max_new: int, max_len: int):
  """Host checks of concrete prompts; returns them as int32 numpy arrays, the padding after each prompt zeroed."""
  prompts = np.asarray(prompts_BL)
  if prompts.ndim != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
    raise ValueError(f"prompts must be [batch >= 1, prompt width >= 1], got shape {prompts.shape}")
  B, L = prompts.shape
  lens = np.asarray(prompt_lens_B)
  if lens.shape != (B,) or not np.issubdtype(lens.dtype, np.integer):
    raise ValueError(f"prompt_lens must be {B} integers (one per row), got {lens.dtype} of shape {lens.shape}")
  if lens.min() < 0 or lens.max() > L:
    raise ValueError(f"prompt_lens must lie in [0, {L}] (the prompt width; 0 marks an inactive row), "
                     f"got {lens.tolist()}")
  in_prompt_BL = np.arange(L)[None] < lens[:, None]
  check_token_ids(prompts[in_prompt_BL], model.config.vocab_size)  # the padding after a prompt is ignored
  prompts = np.where(in_prompt_BL, prompts, 0)
  context = model.config.max_position_embeddings
  need = lens + max_new - 1  # the prompt and every generated token but the last pass through the cache
  if need.max() > min(max_len, context):
    b = int(need.argmax())
    what = f"the cache max_len={max_len}" if max_len < context else f"the model's context {context}"
    raise ValueError(f"row {b}: a {int(lens[b])}-token prompt and max_new_tokens={max_new} need {int(need[b])} "
                     f"positions, more than {what}")
  return prompts.astype(np.int32), lens.astype(np.int32)


def _prepared(model, prompts_BL, prompt_lens_B, max_new_tokens, sampling, stop_token_ids, max_len):
  stop_Z = _check_static(model, sampling, stop_token_ids, max_new_tokens, max_len)
  max_new = int(max_new_tokens)
  S = _cache_len(np.shape(prompts_BL)[-1], max_new, max_len)
  if max_len is None:  # never more cache than the context: _check_prompts makes sure each row fits in it
    S = min(S, model.config.max_position_embeddings)
  prompts, lens = _check_prompts(model, prompts_BL, prompt_lens_B, max_new, S)
  static = dict(max_new=max_new, max_len=S, sampling=sampling, pad=pad_id(model))
  return (prompts, lens, stop_Z), static


def generate(model: ZayaForCausalLM, prompts_BL, prompt_lens_B, *, key, max_new_tokens: int,
             sampling: SamplingConfig, stop_token_ids: Sequence[int] = (), max_len: int | None = None
             ) -> GenerateOutput:
  """Generates up to max_new_tokens per row from right-padded ragged prompts, in one jitted call.

  prompts_BL: token ids, row b's prompt is prompts_BL[b, :prompt_lens_B[b]] (what follows is ignored). A length of 0
    marks an inactive row (a filler of a fixed-shape batch): it generates nothing (length 0, all pad) and does not
    keep the decode loop running.
  key: a jax PRNG key; None is accepted when sampling is greedy (which draws nothing), refused otherwise.
  max_len: the cache length (default L + max_new_tokens - 1).
  Returns GenerateOutput(tokens_BN [B, max_new_tokens] int32 with pad_id(model) after each row's end, lengths_B).
  Raises, before compiling, on ids outside the vocabulary, prompt lengths outside [0, L], or a row whose prompt
  plus generated tokens would not fit the cache or the model's context.
  """
  (prompts, lens, stop_Z), static = _prepared(model, prompts_BL, prompt_lens_B, max_new_tokens, sampling,
                                              stop_token_ids, max_len)
  return _jitted_generate(model, prompts, lens, _key(key, sampling), stop_Z, **static)


def _key(key, sampling: SamplingConfig):
  """The PRNG key; None is accepted for greedy decoding (which draws nothing), refused when sampling."""
  if key is not None:
    return key
  if not sampling.greedy:
    raise ValueError(f"key=None: sampling {sampling} draws tokens and needs a PRNG key")
  return jax.random.key(0)  # traced but never used by greedy steps


def lower_generate(model: ZayaForCausalLM, prompts_BL, prompt_lens_B, *, key, max_new_tokens: int,
                   sampling: SamplingConfig, stop_token_ids: Sequence[int] = (), max_len: int | None = None
                   ) -> jax.stages.Lowered:
  """`generate`'s program lowered, not run (same checks): `.compile().memory_analysis()`, `.cost_analysis()`."""
  (prompts, lens, stop_Z), static = _prepared(model, prompts_BL, prompt_lens_B, max_new_tokens, sampling,
                                              stop_token_ids, max_len)
  return _jitted_generate.lower(model, prompts, lens, _key(key, sampling), stop_Z, **static)


def make_decode_fn(model: ZayaForCausalLM, *, sampling: SamplingConfig, stop_token_ids: Sequence[int] = (),
                   max_len: int | None = None):
  """`decode_fn(key, prompts[B, L] int32, prompt_lens[B] int32, max_new: int) -> (tokens[B, max_new], lengths[B])`.

  The decoder interface of MARKOVIAN_RSA.md §5.3, closed over the model: the same program as `generate`. It is
  jax-traceable (call it inside jax.jit or lax.scan; `max_new` must be a Python int), so values are checked on the
  host only when they are concrete; traced prompts are trusted, and a traced row too long for the cache gets
  whatever its NaN logits sample to. Shapes are always checked: L + max_new - 1 must fit max_len (when given).
  Under an outer jit, compile it with `EXACT_ROUNDING` (zaya_jax.model.decoder) for results bitwise equal to
  `generate`: the compiler options of an inner jit do not apply to the outer program. Pass the model into the outer
  jit as an argument and call make_decode_fn inside it: a model captured from outside would have its weights baked
  into the outer program as constants.
  """
  stop_Z = _check_static(model, sampling, stop_token_ids, 1, max_len)
  pad = pad_id(model)

  def decode_fn(key, prompts_BL, prompt_lens_B, max_new: int):
    _check_static(model, sampling, (), max_new, max_len)
    if jnp.ndim(prompts_BL) != 2:
      raise ValueError(f"prompts must be [batch, prompt width], got shape {jnp.shape(prompts_BL)}")
    L = jnp.shape(prompts_BL)[1]
    S = _cache_len(L, int(max_new), max_len)
    if L + max_new - 1 > S:
      raise ValueError(f"prompt width {L} and max_new={max_new} need {L + max_new - 1} cache positions, more than "
                       f"max_len={S}")
    context = model.config.max_position_embeddings
    if S > context:  # known from the shapes, so refused under jit too, where the prompts cannot be checked
      raise ValueError(f"prompt width {L} and max_new={max_new} need a cache of {S} positions, more than the model's "
                       f"context max_position_embeddings={context}")
    if not any(isinstance(x, jax.core.Tracer) for x in (prompts_BL, prompt_lens_B)):
      _check_prompts(model, prompts_BL, prompt_lens_B, int(max_new), S)
    prompts = jnp.asarray(prompts_BL, jnp.int32)
    lens = jnp.asarray(prompt_lens_B, jnp.int32)
    run = _nested_generate if _under_trace(model, key, prompts_BL, prompt_lens_B) else _jitted_generate
    out = run(model, prompts, lens, _key(key, sampling), stop_Z, max_new=int(max_new), max_len=S, sampling=sampling,
              pad=pad)
    return out.tokens_BN, out.lengths_B

  decode_fn.skips_empty_prompts = True  # rsa.skip_frozen: a 0-length prompt is an inactive row here
  return decode_fn


__all__ = ["GenerateOutput", "generate", "lower_generate", "make_decode_fn", "pad_id"]
