"""Cached decoding (zaya_jax.infer) equals the full forward, and greedy decoding equals `transformers` generate.

B batch, T tokens, V vocab. A reference-saved tiny model (every parameter random: temperatures ~3, so attention is far
from uniform) with a sliding-window layer whose window is shorter than the sequences, GQA 4:2, a 3-column conv
context and biased attention projections, loaded through `load_hf` in fp32.
"""

import dataclasses

import numpy as np
import pytest
import torch
from reference import make_reference

import zaya_jax
from zaya_jax.infer import decode_step, init_state, prefill

CONFIG = dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, moe_intermediate_size=40, num_experts=4, router_hidden_size=12,
              layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=5, cca_time0=3, cca_time1=2,
              attention_bias=True, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)
MAX_LEN = 16
B, T = 3, 7  # every test prefills [B, T] and steps [B]: one compile of each (~4 s apiece on CPU)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  path = tmp_path_factory.mktemp("ref_decode")
  ref = make_reference(path, seed=3, **CONFIG)
  return ref, zaya_jax.load_hf(path), path


def right_padded(rows, pad=7):
  """[B, T] with row b = rows[b] then `pad` (not the pad id: padding must not leak whatever it holds)."""
  out = np.full((B, T), pad, np.int64)
  for b, row in enumerate(rows):
    out[b, :len(row)] = row
  return out


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_ragged_prefill_and_decode_steps_match_full_forward(case, backend):
  # "pallas": each one-token step's attention runs the flash-decoding kernel (interpret mode here) over the cache.
  _, model, path = case
  if backend == "pallas":
    attention = dataclasses.replace(model.config.attention, backend="pallas")
    model = zaya_jax.load_hf(path, attention=attention)
  rng = np.random.default_rng(0)
  prompt_lens = np.array([7, 1, 4])  # ragged, with a one-token row; 7 + 6 steps run past the window of 5
  steps = 6
  seqs = [rng.integers(3, CONFIG["vocab_size"], n + steps) for n in prompt_lens]  # prompt, then the fed tokens
  # Uncached reference: all rows right-padded in one causal forward (padding after a token cannot reach it).
  full = np.zeros((B, T + steps), np.int64)
  for b, s in enumerate(seqs):
    full[b, :len(s)] = s
  full_BTV = np.asarray(zaya_jax.forward(model, full).logits_BTV)

  state = init_state(model.config, B, MAX_LEN)
  logits_BV, state = prefill(model, state, right_padded([s[:n] for s, n in zip(seqs, prompt_lens)]), prompt_lens)
  errors = [np.abs(np.asarray(logits_BV) - full_BTV[np.arange(B), prompt_lens - 1]).max()]
  for i in range(steps):
    tokens_B = np.array([s[n + i] for s, n in zip(seqs, prompt_lens)])
    logits_BV, state = decode_step(model, state, tokens_B)
    errors.append(np.abs(np.asarray(logits_BV) - full_BTV[np.arange(B), prompt_lens + i]).max())
  np.testing.assert_array_equal(np.asarray(state.lengths_B), prompt_lens + steps)
  assert max(errors) <= 1e-5, errors
  assert np.abs(full_BTV).max() > 1.0  # non-trivial logits


def test_chunked_prefill_equals_one_prefill(case):
  _, model, _ = case
  tokens = np.random.default_rng(1).integers(3, CONFIG["vocab_size"], (B, T))
  # Row 1 gets nothing in the first chunk: a state with some rows cached and one still empty continues every row.
  lengths_B, first_B = np.array([7, 5, 3]), np.array([4, 0, 2])
  one, _ = prefill(model, init_state(model.config, B, MAX_LEN), tokens, lengths_B)
  _, state = prefill(model, init_state(model.config, B, MAX_LEN), tokens, first_B)
  rest_BT = right_padded([t[f:n] for t, f, n in zip(tokens, first_B, lengths_B)])
  two, state = prefill(model, state, rest_BT, lengths_B - first_B)
  np.testing.assert_allclose(np.asarray(two), np.asarray(one), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(state.lengths_B), lengths_B)
  # Three chunks, rows skipping some (0 tokens leaves a row as it was): the same state, seen through a decode step.
  chunks_CB = np.array([[4, 1, 2], [2, 0, 1], [1, 4, 0]])
  state3, start_B = init_state(model.config, B, MAX_LEN), np.zeros(B, int)
  for n_B in chunks_CB:
    chunk_BT = right_padded([t[s:s + n] if n else t[:1] for t, s, n in zip(tokens, start_B, n_B)])
    _, state3 = prefill(model, state3, chunk_BT, n_B)
    start_B = start_B + n_B
  np.testing.assert_array_equal(np.asarray(state3.lengths_B), lengths_B)
  step_B = tokens[:, -1]
  want, _ = decode_step(model, state, step_B)
  got, _ = decode_step(model, state3, step_B)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_greedy_decoding_matches_transformers_generate(case):
  ref, model, _ = case
  prompt = np.random.default_rng(4).integers(3, CONFIG["vocab_size"], 6)
  new = 8
  with torch.no_grad():
    out = ref.generate(torch.as_tensor(prompt[None]), max_new_tokens=new, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
  ref_tokens = out.sequences[0, len(prompt):].numpy()
  ref_logits = np.stack([lg[0].float().numpy() for lg in out.logits])

  # Every row holds the same prompt (the batch shape of the other tests); rows must agree with the reference's one.
  logits_BV, state = prefill(model, init_state(model.config, B, MAX_LEN), right_padded([prompt] * B), [6] * B)
  tokens, logits = [], []
  for _ in range(new):
    logits.append(np.asarray(logits_BV))
    tokens.append(np.argmax(logits[-1], axis=-1))
    logits_BV, state = decode_step(model, state, tokens[-1])
  np.testing.assert_array_equal(np.stack(tokens, 1), np.broadcast_to(ref_tokens, (B, new)))
  assert np.abs(np.stack(logits, 1) - ref_logits).max() <= 1e-5
  assert len(set(ref_tokens.tolist())) > 1  # not a constant continuation


def test_bad_prompts_raise_before_jit_and_steps_past_max_len_turn_nan(case):
  _, model, _ = case
  state = init_state(model.config, 2, 4)
  with pytest.raises(ValueError, match="max_len=4"):
    prefill(model, state, np.ones((2, 6), np.int64), np.array([3, 5]))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, 6\]"):
    prefill(model, state, np.ones((2, 6), np.int64), np.array([-1, 2]))
  # Only each row's own tokens are checked against the vocabulary (as generate does): padding may hold anything.
  vocab = model.config.vocab_size
  with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {vocab}\)"):
    prefill(model, init_state(model.config, 2, 8), np.array([[5, vocab, 5], [5, 5, 5]]), np.array([3, 1]))
  with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {vocab}\)"):
    decode_step(model, init_state(model.config, 2, 8), np.array([5, vocab]))
  # The fit counts the tokens already cached, not only the new chunk ([B, T] shapes: compiled by the tests above).
  full_BT = np.full((B, T), 5)
  _, cached = prefill(model, init_state(model.config, B, MAX_LEN), full_BT, np.full(B, T))
  _, cached = prefill(model, cached, full_BT, np.array([T, T, 2]))  # lengths [14, 14, 9] of 16
  with pytest.raises(ValueError, match=f"row 1: 3 prompt tokens after {2 * T} cached ones exceed .* max_len={MAX_LEN}"):
    prefill(model, cached, full_BT, np.array([0, 3, 2]))
  # Decode steps past max_len drop their writes; such a row's logits turn NaN, the others' stay finite.
  finite = []
  for _ in range(3):
    logits_BV, cached = decode_step(model, cached, np.full(B, 5))
    finite.append(np.isfinite(np.asarray(logits_BV)).all(axis=-1).tolist())
  assert finite == [[True] * 3, [True] * 3, [False, False, True]], finite
  padded = np.array([[5, 6, 7], [5, -100, vocab + 7]])
  logits_BV, _ = prefill(model, init_state(model.config, 2, 8), padded, np.array([3, 1]))
  clean_BV, _ = prefill(model, init_state(model.config, 2, 8), np.array([[5, 6, 7], [5, 0, 0]]), np.array([3, 1]))
  np.testing.assert_array_equal(np.asarray(logits_BV), np.asarray(clean_BV))
