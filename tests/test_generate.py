"""Batched generation (zaya_jax.infer.generate) and sampling (zaya_jax.infer.sampling).

B batch, L prompt width, N new tokens, V vocab, M draws. The model is test_decode's reference-saved tiny model (random
weights, a sliding-window layer shorter than the sequences, GQA 4:2) loaded through `load_hf` in fp32. Every
generate call below uses [B, L] = [3, 7], N = 8 and one stop id, so they share two compiles (greedy and sampled);
the memory test uses a one-layer model of its own to keep its compiles short.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import make_reference
from test_decode import CONFIG

import zaya_jax
from zaya_jax.figures import model_figures
from zaya_jax.infer import (
  GREEDY,
  SamplingConfig,
  decode_step,
  filter_logits,
  generate,
  init_state,
  lower_generate,
  make_decode_fn,
  pad_id,
  prefill,
  sample,
)
from zaya_jax.infer.generate import _jitted_generate
from zaya_jax.model.decoder import EXACT_ROUNDING

B, L, N = 3, 7, 8
PROMPT_LENS = np.array([7, 1, 4])  # ragged, with a one-token row
EOS = CONFIG["eos_token_id"]
SAMPLED = SamplingConfig(temperature=1.0)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  path = tmp_path_factory.mktemp("ref_generate")
  ref = make_reference(path, seed=3, **CONFIG)
  return ref, zaya_jax.load_hf(path), path


@pytest.fixture(scope="module")
def prompts_BL():
  """Right-padded with 7, not the pad id: whatever follows a prompt must not matter."""
  rng = np.random.default_rng(0)
  out = np.full((B, L), 7, np.int64)
  for b, n in enumerate(PROMPT_LENS):
    out[b, :n] = rng.integers(3, CONFIG["vocab_size"], n)
  return out


@pytest.fixture(scope="module")
def greedy(case, prompts_BL):
  _, model, _ = case
  out = generate(model, prompts_BL, PROMPT_LENS, key=jax.random.key(0), max_new_tokens=N, sampling=GREEDY,
                 stop_token_ids=(EOS,))
  return np.asarray(out.tokens_BN), np.asarray(out.lengths_B)


def test_greedy_generate_matches_transformers_generate(case, prompts_BL, greedy):
  ref, _, _ = case
  tokens_BN, lengths_B = greedy
  for b, n in enumerate(PROMPT_LENS):  # per row: the reference's own cache path without left-padding questions
    with torch.no_grad():
      seq = ref.generate(torch.as_tensor(prompts_BL[b:b + 1, :n]), max_new_tokens=N, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)
    ref_new = seq[0, n:].numpy()
    assert lengths_B[b] == len(ref_new), (b, lengths_B[b], ref_new)
    np.testing.assert_array_equal(tokens_BN[b, :lengths_B[b]], ref_new, err_msg=f"row {b}")
  assert len({tuple(row) for row in tokens_BN}) == B  # rows differ: the ragged prompts were not mixed up
  assert len(np.unique(tokens_BN)) > 2


def test_inactive_rows_generate_nothing_and_leave_the_others_alone(case, prompts_BL, greedy):
  _, model, _ = case
  lens = PROMPT_LENS.copy()
  lens[1] = 0  # a filler row of a fixed-shape batch
  out = generate(model, prompts_BL, lens, key=None, max_new_tokens=N, sampling=GREEDY, stop_token_ids=(EOS,))
  tokens_BN, lengths_B = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
  assert lengths_B[1] == 0 and (tokens_BN[1] == pad_id(model)).all()
  np.testing.assert_array_equal(tokens_BN[[0, 2]], greedy[0][[0, 2]])
  np.testing.assert_array_equal(lengths_B[[0, 2]], greedy[1][[0, 2]])
  # Done is decided by the active rows alone: both stop at their first token, and nothing more is generated.
  stops = (int(greedy[0][0, 0]), int(greedy[0][2, 0]))
  out = generate(model, prompts_BL, lens, key=None, max_new_tokens=N, sampling=GREEDY, stop_token_ids=stops)
  assert np.asarray(out.lengths_B).tolist() == [1, 0, 1]


def test_bf16_greedy_generate_matches_transformers_generate(tmp_path, prompts_BL):
  """bf16 weights and compute: the cached decode rounds as the reference's own cache path does, token for token."""
  ref = make_reference(tmp_path, seed=3, dtype=torch.bfloat16, **CONFIG)
  model = zaya_jax.load_hf(tmp_path)
  assert model.config.dtype == "bfloat16"
  n = 16
  out = generate(model, prompts_BL, PROMPT_LENS, key=None, max_new_tokens=n, sampling=GREEDY, stop_token_ids=(EOS,))
  tokens_BN, lengths_B = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
  for b, length in enumerate(PROMPT_LENS):
    with torch.no_grad():
      seq = ref.generate(torch.as_tensor(prompts_BL[b:b + 1, :length]), max_new_tokens=n, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)
    np.testing.assert_array_equal(tokens_BN[b, :lengths_B[b]], seq[0, length:].numpy(), err_msg=f"row {b}")
  assert lengths_B.max() == n and len(np.unique(tokens_BN)) > 2


def test_greedy_needs_no_key_and_sampling_refuses_none(case, prompts_BL, greedy):
  _, model, _ = case
  # Padding after a prompt is ignored, even ids outside the vocabulary.
  padded = np.where(np.arange(L)[None] < PROMPT_LENS[:, None], prompts_BL, -1)
  out = generate(model, padded, PROMPT_LENS, key=None, max_new_tokens=N, sampling=GREEDY, stop_token_ids=(EOS,))
  np.testing.assert_array_equal(np.asarray(out.tokens_BN), greedy[0])
  decode_fn = make_decode_fn(model, sampling=GREEDY, stop_token_ids=(EOS,))
  np.testing.assert_array_equal(np.asarray(decode_fn(None, prompts_BL, PROMPT_LENS, N)[0]), greedy[0])
  assert lower_generate(model, prompts_BL, PROMPT_LENS, key=None, max_new_tokens=N, sampling=GREEDY) is not None
  with pytest.raises(ValueError, match=r"key=None: sampling .* needs a PRNG key"):
    generate(model, prompts_BL, PROMPT_LENS, key=None, max_new_tokens=N, sampling=SamplingConfig(temperature=1.0))
  with pytest.raises(ValueError, match=r"key=None: sampling .* needs a PRNG key"):
    lower_generate(model, prompts_BL, PROMPT_LENS, key=None, max_new_tokens=N, sampling=SAMPLED)
  # A decode function traced under jit cannot check its prompts, but the shapes alone overflow the context here.
  with pytest.raises(ValueError, match=r"need a cache of 257 positions, more than the model's context"):
    jax.jit(lambda p, n: make_decode_fn(model, sampling=GREEDY)(None, p, n, 251))(prompts_BL, PROMPT_LENS)
  with pytest.raises(ValueError, match=r"pad_token_id: 101 is not a token id below vocab_size=101"):
    dataclasses.replace(model.config, pad_token_id=101)  # generation would write it after each row's end


def test_stop_tokens_end_rows_with_the_stop_token_then_pad(case, prompts_BL, greedy):
  _, model, path = case
  tokens_BN, lengths_B = greedy
  assert (lengths_B == N).all(), "precondition: no row of the greedy run stops at EOS"
  stop = int(tokens_BN[-1, 2])  # ends the last row after 3 tokens at the latest; other rows wherever it occurs
  first = [np.flatnonzero(row == stop) for row in tokens_BN]
  expected_lengths = np.array([f[0] + 1 if len(f) else N for f in first])
  compiles = _jitted_generate._cache_size()
  out = generate(model, prompts_BL, PROMPT_LENS, key=jax.random.key(0), max_new_tokens=N, sampling=GREEDY,
                 stop_token_ids=(stop,))
  assert _jitted_generate._cache_size() == compiles  # stop ids are traced: same count, no new compile
  got, lengths = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
  np.testing.assert_array_equal(lengths, expected_lengths)
  assert lengths.min() < N
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(got[b, :n], tokens_BN[b, :n])  # the stop token included
    assert (got[b, n:] == pad_id(model)).all()
  assert got.dtype == lengths.dtype == np.int32
  # The config's pad id fills what follows a row's end, and all of an inactive row (the configs above use 0).
  model5 = zaya_jax.load_hf(path, pad_token_id=5)
  lens = PROMPT_LENS.copy()
  lens[1] = 0
  out = generate(model5, prompts_BL, lens, key=None, max_new_tokens=N, sampling=GREEDY, stop_token_ids=(stop,))
  got5 = np.asarray(out.tokens_BN)
  assert pad_id(model5) == 5 and (got5[1] == 5).all()
  for b in (0, 2):
    np.testing.assert_array_equal(got5[b], np.where(np.arange(N) < lengths[b], got[b], 5))


def test_generate_checks_inputs_on_the_host(case, prompts_BL):
  _, model, _ = case
  kw = dict(key=jax.random.key(0), sampling=GREEDY)
  with pytest.raises(ValueError, match=r"row 0: a 7-token prompt and max_new_tokens=8 need 14 .*max_len=10"):
    generate(model, prompts_BL, PROMPT_LENS, max_new_tokens=N, max_len=10, **kw)
  with pytest.raises(ValueError, match="max_len=300 exceeds the model's context max_position_embeddings=256"):
    generate(model, prompts_BL, PROMPT_LENS, max_new_tokens=N, max_len=300, **kw)
  with pytest.raises(ValueError, match=r"need 257 positions, more than the model's context 256"):
    generate(model, prompts_BL, PROMPT_LENS, max_new_tokens=251, **kw)
  with pytest.raises(ValueError, match=r"prompt_lens must lie in \[0, 7\]"):
    generate(model, prompts_BL, np.array([7, -1, 4]), max_new_tokens=N, **kw)
  with pytest.raises(ValueError, match=r"prompt_lens must lie in \[0, 7\]"):
    generate(model, prompts_BL, np.array([8, 1, 4]), max_new_tokens=N, **kw)
  with pytest.raises(ValueError, match="prompt_lens must be 3 integers"):
    generate(model, prompts_BL, np.array([7, 1]), max_new_tokens=N, **kw)
  bad = prompts_BL.copy()
  bad[2, 3] = 101  # the last token of row 2's prompt
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 101\)"):
    generate(model, bad, PROMPT_LENS, max_new_tokens=N, **kw)
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 101\)"):
    make_decode_fn(model, sampling=GREEDY)(None, bad, PROMPT_LENS, N)  # concrete prompts: checked there too
  with pytest.raises(ValueError, match=r"prompts must be \[batch >= 1"):
    generate(model, prompts_BL[:0], PROMPT_LENS[:0], max_new_tokens=N, **kw)
  with pytest.raises(ValueError, match=r"stop_token_ids: .*outside the vocabulary"):
    generate(model, prompts_BL, PROMPT_LENS, max_new_tokens=N, stop_token_ids=(-1,), **kw)
  with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
    generate(model, prompts_BL, PROMPT_LENS, max_new_tokens=0, **kw)
  with pytest.raises(TypeError, match="sampling must be a SamplingConfig"):
    generate(model, prompts_BL, PROMPT_LENS, max_new_tokens=N, key=jax.random.key(0), sampling=None)


# -- sampling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,kw", [("temperature", dict(temperature=-0.5)),
                                      ("temperature", dict(temperature=np.inf)),
                                      ("top_k", dict(top_k=0)), ("top_k", dict(top_k=2.0)), ("top_p", dict(top_p=0.0)),
                                      ("top_p", dict(top_p=1.5))])
def test_sampling_config_validates_fields(field, kw):
  with pytest.raises(ValueError, match=f"SamplingConfig.{field} must"):
    SamplingConfig(**kw)


def test_sampling_config_takes_numpy_scalars_and_refuses_overflowing_temperatures():
  cfg = SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9))
  assert cfg == SamplingConfig(temperature=0.5, top_k=5, top_p=0.9) and type(cfg.top_k) is int
  assert hash(cfg) == hash(SamplingConfig(temperature=0.5, top_k=5, top_p=0.9))  # one compile for both
  with pytest.raises(ValueError, match="must be 0 \\(greedy\\) or a finite number >= 1e-06"):
    SamplingConfig(temperature=1e-39)  # sampled token 0 where the argmax was another
  # Greedy ignores top_k / top_p: every greedy config is the same static key, so one compile serves them all.
  assert SamplingConfig(temperature=0, top_k=5, top_p=0.5) == SamplingConfig(temperature=0)
  assert hash(SamplingConfig(temperature=0.0, top_p=0.9)) == hash(SamplingConfig(temperature=0))


def test_greedy_and_top_k_1_are_argmax_and_keys_matter():
  logits_BV = jax.random.normal(jax.random.key(1), (64, 50), jnp.float32)
  argmax_B = np.argmax(np.asarray(logits_BV), axis=-1)
  assert GREEDY.greedy and not SamplingConfig(temperature=0.5).greedy
  np.testing.assert_array_equal(sample(jax.random.key(0), logits_BV, GREEDY), argmax_B)
  bf16_BV = logits_BV.astype(jnp.bfloat16)  # ties are common: greedy takes the first maximum, as np.argmax does
  np.testing.assert_array_equal(sample(jax.random.key(0), bf16_BV, GREEDY), np.argmax(np.asarray(bf16_BV), -1))
  # Ties at the boundary: greedy takes the first maximum; top-k and top-p keep every token tied with the last kept.
  assert int(sample(jax.random.key(0), jnp.array([[1.0, 3.0, 3.0, 0.0]]), GREEDY)[0]) == 1
  assert np.isfinite(filter_logits(jnp.array([[3.0, 2.0, 2.0, 0.0]]), SamplingConfig(top_k=2))).tolist() == [
    [True, True, True, False]]
  halves = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))  # the first token alone holds p = 0.5: nothing else is needed
  assert np.isfinite(filter_logits(halves, SamplingConfig(top_p=0.5))).tolist() == [[True, False, False]]
  # With distinct logits one token survives (top-k and top-p keep ties at their boundary, as transformers does).
  for cfg in (SamplingConfig(top_k=1), SamplingConfig(temperature=3.0, top_p=1e-6)):  # a single survivor
    for seed in range(3):
      np.testing.assert_array_equal(sample(jax.random.key(seed), logits_BV, cfg), argmax_B)
  hot = SamplingConfig(temperature=2.0)
  a, b = (np.asarray(sample(jax.random.key(s), logits_BV, hot)) for s in (5, 6))
  np.testing.assert_array_equal(a, sample(jax.random.key(5), logits_BV, hot))
  assert (a != b).mean() > 0.5
  assert (a != argmax_B).mean() > 0.5


def reference_filter(logits_V, cfg: SamplingConfig):
  """numpy: the allowed set and its renormalized probabilities after temperature, top-k and top-p."""
  z = logits_V.astype(np.float64) / cfg.temperature
  if cfg.top_k is not None:
    z = np.where(z < np.sort(z)[::-1][cfg.top_k - 1], -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  allowed = np.zeros(len(p), bool)
  allowed[order[before < cfg.top_p]] = True
  p = np.where(allowed, p, 0)
  return allowed, p / p.sum()


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0.7, top_k=5, top_p=0.9),
                                 SamplingConfig(temperature=1.3, top_p=0.6), SamplingConfig(top_k=3)])
def test_top_k_top_p_sample_only_allowed_tokens_with_softmax_frequencies(cfg):
  probs_V = np.array([0.26, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.03, 0.01])
  logits_V = np.log(probs_V).astype(np.float32)
  allowed, p = reference_filter(logits_V, cfg)
  assert 1 < allowed.sum() < len(probs_V)  # the filter matters and leaves a choice
  finite = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits_V)[None], cfg))[0])
  np.testing.assert_array_equal(finite, allowed)
  M = 40_000
  draws = np.asarray(jax.jit(sample, static_argnums=2)(jax.random.key(7), jnp.broadcast_to(logits_V, (M, 9)), cfg))
  assert allowed[draws].all(), np.unique(draws[~allowed[draws]])
  freq = np.bincount(draws, minlength=len(p)) / M
  sigma = np.sqrt(p * (1 - p) / M)
  assert (np.abs(freq - p) <= 5 * sigma + 1e-12).all(), (freq, p)


def test_tiny_temperatures_sample_the_exact_softmax():
  # Logits near 300 at T = 1e-4: divided unshifted they are ~3e6, where fp32 steps are 0.25, and the draws came out
  # at 0.753 for a token of probability 0.714 (39 sigma). Shifted by the row's maximum first, they are exact.
  T, M = 1e-4, 200_000
  logits_V = (300 + T * np.log(np.array([0.7, 0.3]))).astype(np.float32)
  z = logits_V.astype(np.float64) / T
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # of the fp32 logits as given
  draws = np.asarray(jax.jit(sample, static_argnums=2)(jax.random.key(7), jnp.broadcast_to(logits_V, (M, 2)),
                                                        SamplingConfig(temperature=T)))
  freq = np.bincount(draws, minlength=2) / M
  assert abs(freq[0] - p[0]) <= 5 * np.sqrt(p[0] * (1 - p[0]) / M), (freq, p)
  # A row with no finite logit stays as it is (no NaN from the shift).
  assert np.isneginf(np.asarray(filter_logits(jnp.full((1, 3), -jnp.inf), SamplingConfig(temperature=0.5)))).all()


def test_sampled_generate_is_a_function_of_the_key(case, prompts_BL):
  _, model, _ = case
  run = lambda seed: generate(model, prompts_BL, PROMPT_LENS, key=jax.random.key(seed), max_new_tokens=N,
                              sampling=SAMPLED, stop_token_ids=(EOS,))
  a, a2, b = run(1), run(1), run(2)
  np.testing.assert_array_equal(a.tokens_BN, a2.tokens_BN)
  np.testing.assert_array_equal(a.lengths_B, a2.lengths_B)
  assert (np.asarray(a.tokens_BN) != np.asarray(b.tokens_BN)).any()
  # Token i is drawn with fold_in(key, i): the same draws, step by step on the host, give the same tokens.
  logits_BV, state = prefill(model, init_state(model.config, B, L + N - 1), prompts_BL, PROMPT_LENS)
  hand = []
  for i in range(N):
    hand.append(sample(jax.random.fold_in(jax.random.key(1), i), logits_BV, SAMPLED))
    logits_BV, state = decode_step(model, state, hand[-1])
  hand_BN, lengths_B = np.stack(hand, 1), np.asarray(a.lengths_B)
  for b, n in enumerate(lengths_B):
    np.testing.assert_array_equal(np.asarray(a.tokens_BN)[b, :n], hand_BN[b, :n])
  assert len(np.unique(hand_BN)) > N  # sampled, not one repeated token


def test_decode_fn_under_jit_and_scan_equals_generate(case, prompts_BL):
  _, model, _ = case
  keys = jax.random.split(jax.random.key(11), 3)
  expected = [generate(model, prompts_BL, PROMPT_LENS, key=k, max_new_tokens=N, sampling=SAMPLED,
                       stop_token_ids=(EOS,)) for k in keys]

  decode_fn = make_decode_fn(model, sampling=SAMPLED, stop_token_ids=(EOS,))
  tokens_BN, lengths_B = decode_fn(keys[0], prompts_BL, PROMPT_LENS, N)  # eager: generate's own program
  np.testing.assert_array_equal(tokens_BN, expected[0].tokens_BN)
  np.testing.assert_array_equal(lengths_B, expected[0].lengths_B)

  # The model enters the outer jit as an argument (captured, its weights would become constants of the program).
  def scanned(model, keys, prompts_BL, prompt_lens_B):
    fn = make_decode_fn(model, sampling=SAMPLED, stop_token_ids=(EOS,))
    def step(total, key):
      tokens_BN, lengths_B = fn(key, prompts_BL, prompt_lens_B, N)
      return total + lengths_B.sum(), (tokens_BN, lengths_B)
    return jax.lax.scan(step, jnp.int32(0), keys)

  prompts, lens = jnp.asarray(prompts_BL, jnp.int32), jnp.asarray(PROMPT_LENS, jnp.int32)  # traced in there
  total, (tokens_KBN, lengths_KB) = jax.jit(scanned, compiler_options=EXACT_ROUNDING)(model, keys, prompts, lens)
  for i, e in enumerate(expected):
    np.testing.assert_array_equal(tokens_KBN[i], e.tokens_BN)
    np.testing.assert_array_equal(lengths_KB[i], e.lengths_B)
  assert int(total) == sum(int(e.lengths_B.sum()) for e in expected)
  with pytest.raises(ValueError, match="prompt width 7 and max_new=8 need 14 cache positions, more than max_len=12"):
    make_decode_fn(model, sampling=SAMPLED, max_len=12)(keys[0], prompts_BL, PROMPT_LENS, N)


# -- memory --------------------------------------------------------------------------------------------------------


def kv_bytes(state) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for layer in state.layers for leaf in (layer.k_BKES, layer.v_BKSE))


def test_kv_cache_bytes_per_token_equal_the_figures(case):
  _, model, _ = case
  state = init_state(model.config, B, 16)
  assert kv_bytes(state) / 16 / B == model_figures(model.config).kv_cache_bytes_per_token
  cfg = zaya_jax.ZayaConfig.zaya1_8b()
  abstract = jax.eval_shape(lambda: init_state(cfg, 2, 4096))
  figures = model_figures(cfg)
  assert kv_bytes(abstract) / 4096 / 2 == figures.kv_cache_bytes_per_token == 40960
  assert figures.mha_kv_cache_bytes_per_token / (kv_bytes(abstract) / 4096 / 2) == 8


def test_compiled_generate_memory_does_not_grow_with_new_tokens(case, prompts_BL, greedy):
  _, model, _ = case
  max_len = L + N - 1  # the cache of the greedy fixture's call: that compile is reused for n = N
  mem = {}
  for n in (2, N):
    lowered = lower_generate(model, prompts_BL, PROMPT_LENS, key=jax.random.key(0), max_new_tokens=n,
                             sampling=GREEDY, stop_token_ids=(EOS,), max_len=max_len)
    mem[n] = lowered.compile().memory_analysis()
  output_growth = mem[N].output_size_in_bytes - mem[2].output_size_in_bytes
  assert output_growth == B * (N - 2) * 4  # tokens_BN int32
  assert mem[N].argument_size_in_bytes == mem[2].argument_size_in_bytes
  # At most the loop's own token buffer beside the output, plus buffer alignment (64 B); keeping anything per step,
  # e.g. one step's fp32 logits [B, V], would add B * V * 4 = 1212 B per step.
  temp_growth = mem[N].temp_size_in_bytes - mem[2].temp_size_in_bytes
  assert 0 <= temp_growth <= output_growth + 2 * 64, (temp_growth, output_growth)
  # The cache lives inside the program (not an argument or output) and is allocated once.
  assert mem[2].temp_size_in_bytes >= kv_bytes(init_state(model.config, B, max_len))
