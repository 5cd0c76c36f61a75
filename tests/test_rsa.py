"""The Markovian RSA sampler (zaya_jax.infer.rsa) with scripted decoders, plus answer extraction and voting.

N population, C candidates per prompt, T tail tokens (τ), M new tokens per call, L prompt capacity, K trials,
B decoder batch (= N), A answer values. Scripted decoders are pure JAX functions of (key, prompts, lengths, max_new).
Token ids: 0 pad, 1..8 chat/template pieces, 200+i candidate headers, 20..29 question, 50..96 filler output,
60/61 a toy end-of-thinking marker, 98 a stop token (EOS), 99 "no answer", 100+a answer a, >= 1000 counting tokens
(Delethink test).
Module-level configs and jitted decoders so that every program compiles once and is reused across tests; many
independent rounds run under `lax.map` (vmapping over keys compiles the random-bit generation several times slower).
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya_jax.infer import answers as ans
from zaya_jax.infer import rsa
from zaya_jax.infer.rsa import PromptPieces, RSAConfig

PAD, EOS, NONE, ANS, FILLER = 0, 98, 99, 100, 50
QUESTION = [21, 22, 23]


def pieces_for(c: int) -> PromptPieces:
  heads = ((6, 200), *((200 + i,) for i in range(1, c)))
  return PromptPieces(initial=((1, 2), (3,)), prefix=(4, 5), heads=heads, suffix=(7, 8))


# ------------------------------------------------------------------------------------------------- scripted decoders


@functools.partial(jax.jit, static_argnums=3)
def random_decoder(key, prompts_BL, plen_B, max_new):
  """Random lengths in [1, max_new] and random filler tokens; the first token hashes the prompt, so that any
  difference in prompt building shows up in the pool."""
  B, L = prompts_BL.shape
  k_len, k_tok = jax.random.split(key)
  len_B = jax.random.randint(k_len, (B,), 1, max_new + 1)
  tokens_BM = jax.random.randint(k_tok, (B, max_new), FILLER, 90)
  valid_BL = jnp.arange(L)[None, :] < plen_B[:, None]
  digest_B = (jnp.where(valid_BL, prompts_BL, 0) * (jnp.arange(L) % 5 + 1)).sum(1) % 7
  return tokens_BM.at[:, 0].set(90 + digest_B), len_B


@functools.partial(jax.jit, static_argnums=3)
def full_decoder(key, prompts_BL, plen_B, max_new):
  """As random_decoder, but every output uses the whole budget."""
  tokens_BM, _ = random_decoder(key, prompts_BL, plen_B, max_new)
  return tokens_BM, jnp.full((prompts_BL.shape[0],), max_new, jnp.int32)


NUM_ANS = 16


@functools.partial(jax.jit, static_argnums=3)
def plurality_decoder(key, prompts_BL, plen_B, max_new):
  """Copies the plurality answer token among the prompt's answer tokens (ties: the one appearing first), written as
  the last output token; NONE when the prompt shows no answer."""
  B, L = prompts_BL.shape
  valid_BL = jnp.arange(L)[None, :] < plen_B[:, None]
  hit_BLA = (prompts_BL[:, :, None] == ANS + jnp.arange(NUM_ANS)) & valid_BL[:, :, None]
  count_BA = hit_BLA.sum(1)
  first_BA = jnp.where(hit_BLA.any(1), jnp.argmax(hit_BLA, axis=1), L)
  win_B = jnp.argmax(count_BA * (L + 1) - first_BA, axis=1)
  answer_B = jnp.where(count_BA.max(1) > 0, ANS + win_B, NONE)
  tokens_BM = jnp.full((B, max_new), FILLER, jnp.int32).at[:, -1].set(answer_B)
  return tokens_BM, jnp.full((B,), max_new, jnp.int32)


@functools.partial(jax.jit, static_argnums=3)
def count_decoder(key, prompts_BL, plen_B, max_new):
  """Continues counting from the largest counting token (>= 1000) in the prompt; a prompt without one starts row b
  at 1000·(b+1). A trace that continues its own tail therefore counts on without a gap."""
  B, L = prompts_BL.shape
  valid_BL = jnp.arange(L)[None, :] < plen_B[:, None]
  last_B = jnp.max(jnp.where(valid_BL & (prompts_BL >= 1000), prompts_BL, -1), axis=1)
  start_B = jnp.where(last_B >= 0, last_B + 1, 1000 * (jnp.arange(B) + 1))
  return start_B[:, None] + jnp.arange(max_new), jnp.full((B,), max_new, jnp.int32)


class Recorder:
  """Wraps a decoder for run_loop: keeps every call's inputs and outputs on the host."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, key, prompts, plen, max_new):
    tokens, lens = self.fn(key, prompts, plen, max_new)
    self.calls.append(dict(prompts=np.asarray(prompts), plen=np.asarray(plen), max_new=max_new,
                           tokens=np.asarray(tokens), lens=np.asarray(lens), key=np.asarray(jax.random.key_data(key))))
    return tokens, lens


def assert_states_equal(a: rsa.RSAState, b: rsa.RSAState):
  for name, x, y in zip(a._fields, a, b):
    if name == "key":
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def segments(prompt, plen, pieces: PromptPieces):
  """Splits an aggregation prompt (test pieces) into its candidate tails, using the header ids as markers."""
  row = list(prompt[:plen])
  assert row[: len(pieces.prefix)] == list(pieces.prefix)
  assert row[len(pieces.prefix) : len(pieces.prefix) + len(QUESTION)] == QUESTION
  assert row[len(row) - len(pieces.suffix) :] == list(pieces.suffix)
  body = row[len(pieces.prefix) + len(QUESTION) : len(row) - len(pieces.suffix)]
  out, i = [], 0
  for c, head in enumerate(pieces.heads):
    assert body[i : i + len(head)] == list(head), f"header {c} missing"
    i += len(head)
    j = body.index(pieces.heads[c + 1][0], i) if c + 1 < len(pieces.heads) else len(body)
    out.append(body[i:j])
    i = j
  return out


# -------------------------------------------------------------------------------------------- drivers, accounting

CFG = RSAConfig(n=6, c=3, t=3, tau=5, beta=8, beta_final=11, q_max=8)
PIECES = pieces_for(3)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def loop_run():
  rec = Recorder(random_decoder)
  compiled = rsa._absorb_jit._cache_size()
  state = rsa.run_loop(CFG, PIECES, rec, QUESTION, KEY)
  # One state-update program per budget (beta, beta_final), round 0's included.
  assert rsa._absorb_jit._cache_size() - compiled <= len({CFG.beta, CFG.beta_final})
  return state, rec.calls


def test_the_token_bound_is_the_reports_arithmetic():
  # Spec §5.7: extra-high (t = 8, N = 32, C = 4, β = 32K) decodes at most 9 stages x 32 traces x 32K tokens, which
  # holds the report's ~5.5M a problem; its main setting (t = 2, N = 16, β = 16K, final 40K) 16 x (2 x 16K + 40K).
  extra_high = RSAConfig(n=32, c=4, t=8, tau=4096, beta=32768)
  assert extra_high.max_generated == 9 * 32 * 32768 >= 5.5e6
  assert RSAConfig(n=16, c=4, t=2, tau=4096, beta=16384, beta_final=40960).max_generated == 16 * (2 * 16384 + 40960)
  assert RSAConfig(n=4, c=1, t=2, tau=4, beta=8, beta_first=12).max_generated == 4 * (12 + 8 + 8)
  assert RSAConfig(n=4, c=1, t=0, tau=4, beta=8, beta_final=5).max_generated == 4 * 5  # round 0 is the last


def test_scan_and_host_loop_agree_and_count_every_token(loop_run):
  state_loop, calls = loop_run
  state_jit = rsa.run(CFG, PIECES, random_decoder, QUESTION, KEY)
  assert_states_equal(state_jit, state_loop)
  # t aggregation rounds after round 0 (the report's T): t + 1 calls, β before the last, β_final in it.
  assert [c["max_new"] for c in calls] == [CFG.beta] * CFG.t + [CFG.beta_final]
  assert len({c["key"].tobytes() for c in calls}) == len(calls)  # each round draws with a key of its own
  gen = [int(c["lens"].sum()) for c in calls]
  pre = [int(c["plen"].sum()) for c in calls]
  np.testing.assert_array_equal(state_jit.generated_R, gen)
  np.testing.assert_array_equal(state_jit.prefilled_R, pre)
  assert int(state_jit.generated) == sum(gen) <= CFG.max_generated == CFG.n * (CFG.beta * CFG.t + CFG.beta_final)
  assert int(state_jit.prefilled) == sum(pre)
  final = calls[-1]
  np.testing.assert_array_equal(state_jit.pool_len_N, final["lens"])
  np.testing.assert_array_equal(state_jit.finished_N, final["lens"] < CFG.beta_final)
  for i, row in enumerate(rsa.pool_sequences(state_jit)):
    assert row == final["tokens"][i, : final["lens"][i]].tolist()


def test_every_call_fits_the_context_bound(loop_run):
  state, calls = loop_run
  L = rsa.prompt_capacity(CFG, PIECES)
  assert L == PIECES.template_len + CFG.q_max + CFG.c * CFG.tau
  for r, c in enumerate(calls):
    assert c["prompts"].shape == (CFG.n, L)  # one static shape: one decoder compile for every round
    fixed = PIECES.initial_len if r == 0 else PIECES.template_len + CFG.c * CFG.tau
    context = int((c["plen"] + c["lens"]).max())
    assert context <= fixed + len(QUESTION) + CFG.budget(r)
    assert int(state.max_context_R[r]) == context
    assert int(state.max_prompt_R[r]) == int(c["plen"].max())
    assert all((c["prompts"][i, c["plen"][i] :] == PAD).all() for i in range(CFG.n))  # right-padded
  assert int(state.max_context) <= rsa.context_bound(CFG, PIECES)
  assert rsa.context_bound(CFG, PIECES) == L + max(CFG.beta, CFG.beta_final)  # the largest budget, not β's


def test_aggregation_prompts_hold_tails_of_the_previous_round_only(loop_run):
  _, calls = loop_run
  for prev, cur in itertools.pairwise(calls):
    tails = [tuple(prev["tokens"][i, : prev["lens"][i]][-CFG.tau :]) for i in range(CFG.n)]
    for i in range(CFG.n):
      segs = [tuple(s) for s in segments(cur["prompts"][i], cur["plen"][i], PIECES)]
      assert len(segs) == CFG.c
      assert all(s in tails for s in segs)
      assert len({tails.index(s) for s in segs}) == CFG.c  # distinct candidates


def test_same_key_same_state_other_key_other_pool():
  a = rsa.run(CFG, PIECES, random_decoder, QUESTION, KEY)
  assert_states_equal(a, rsa.run(CFG, PIECES, random_decoder, QUESTION, KEY))
  c = rsa.run(CFG, PIECES, random_decoder, QUESTION, jax.random.key(8))
  assert not np.array_equal(a.pool_NG, c.pool_NG)


def test_seed_is_data_not_a_recompile():
  rsa.run(CFG, PIECES, random_decoder, QUESTION, KEY)
  before = rsa._run_jit._cache_size()
  a = rsa.run(dataclasses.replace(CFG, seed=3), PIECES, random_decoder, QUESTION)  # key=None: key(cfg.seed)
  assert rsa._run_jit._cache_size() == before
  assert_states_equal(a, rsa.run(CFG, PIECES, random_decoder, QUESTION, jax.random.key(3)))


def test_final_round_can_use_its_own_decoder():
  rec_main, rec_final = Recorder(random_decoder), Recorder(full_decoder)
  state = rsa.run_loop(CFG, PIECES, rec_main, QUESTION, KEY, final_decode_fn=rec_final)
  assert len(rec_main.calls) == CFG.t and len(rec_final.calls) == 1
  assert (np.asarray(state.pool_len_N) == CFG.beta_final).all()


# ------------------------------------------------------------------------------------------ subset distribution

SUB_N, SUB_C, SUB_K = 8, 3, 20000


def chi2_crit(df: int, z: float = 4.5) -> float:
  """Upper chi-square quantile at a normal deviate z (Wilson–Hilferty): z = 4.5 is p ~ 3e-6."""
  a = 2 / (9 * df)
  return df * (1 - a + z * math.sqrt(a)) ** 3


def subset_problems(sub_KC: np.ndarray, n: int) -> list[str]:
  """Every way sub_KC departs from 'uniform ordered sample without replacement'; [] when none does."""
  K, C = sub_KC.shape
  bad = []
  if sub_KC.min() < 0 or sub_KC.max() >= n:
    bad.append("index out of range")
  if any(len(set(row)) < C for row in sub_KC.tolist()):
    bad.append("duplicate within a subset")
  # Element at each position: p = 1/n per cell (uniform marginals and a uniformly random order).
  table = np.stack([np.bincount(sub_KC[:, j], minlength=n)[:n] for j in range(C)])
  chi_pos = ((table - K / n) ** 2 / (K / n)).sum()
  if chi_pos > chi2_crit(C * (n - 1)):
    bad.append(f"position x element chi2 {chi_pos:.1f}")
  # Unordered pair inclusion: p = C(C-1) / (n(n-1)) for every pair; binomial 4.5-sigma bound per pair.
  p_pair = C * (C - 1) / (n * (n - 1))
  members = np.zeros((K, n), bool)
  members[np.arange(K)[:, None], np.clip(sub_KC, 0, n - 1)] = True
  sd = math.sqrt(p_pair * (1 - p_pair) / K)
  for a, b in itertools.combinations(range(n), 2):
    freq = (members[:, a] & members[:, b]).mean()
    if abs(freq - p_pair) > 4.5 * sd:
      bad.append(f"pair ({a},{b}) frequency {freq:.4f} vs {p_pair:.4f}")
      break
  return bad


@pytest.fixture(scope="module")
def subset_draws():
  keys = jax.random.split(jax.random.key(123), SUB_K // SUB_N)
  draw = jax.jit(lambda ks: jax.lax.map(lambda k: rsa.sample_subsets(k, SUB_N, SUB_C), ks))
  return np.asarray(draw(keys)).reshape(-1, SUB_C)  # [K, C]: every row of every draw is one trial


def test_subsets_are_uniform_without_replacement(subset_draws):
  assert subset_draws.shape == (SUB_K, SUB_C)
  assert subset_problems(subset_draws, SUB_N) == []
  marginal = np.bincount(subset_draws.ravel(), minlength=SUB_N) / SUB_K
  sd = math.sqrt(SUB_C / SUB_N * (1 - SUB_C / SUB_N) / SUB_K)
  assert np.abs(marginal - SUB_C / SUB_N).max() < 4.5 * sd


def test_subset_checks_reject_biased_samplers():
  """The statistics above have power: each classic mistake is caught."""
  rng = np.random.default_rng(0)
  start = rng.integers(0, SUB_N, SUB_K)
  window = (start[:, None] + np.arange(SUB_C)) % SUB_N  # uniform marginals, but neighbours always together
  assert any("pair" in p for p in subset_problems(window, SUB_N))
  ordered = np.sort(np.array([rng.permutation(SUB_N)[:SUB_C] for _ in range(SUB_K)]), axis=1)  # order not random
  assert any("position" in p for p in subset_problems(ordered, SUB_N))
  replaced = rng.integers(0, SUB_N, (SUB_K, SUB_C))  # with replacement
  assert "duplicate within a subset" in subset_problems(replaced, SUB_N)


def test_c1_subsets_are_self_continuation_or_uniform():
  key = jax.random.key(5)
  cont = RSAConfig(n=5, c=1, t=1, tau=2, beta=2, q_max=4)
  np.testing.assert_array_equal(rsa.candidate_subsets(cont, key)[:, 0], np.arange(5))
  drawn = jax.jit(functools.partial(rsa.candidate_subsets, dataclasses.replace(cont, self_continue=False)))
  rows = np.concatenate([np.asarray(drawn(k))[:, 0] for k in jax.random.split(key, 4)])
  assert (rows != np.tile(np.arange(5), 4)).any()  # drawn at random, not the trace's own


# --------------------------------------------------------------------------------- copy-the-plurality model

HYP = RSAConfig(n=16, c=4, t=1, tau=4, beta=4, q_max=4)
POPULATION = {7: 6, 3: 4, 5: 3, 9: 3}  # answer: copies (spec §5.7)
HYP_K = 1024  # rounds; each gives N independent outputs
Q_PADDED, Q_LEN = jnp.asarray([*QUESTION, 0], jnp.int32), jnp.int32(len(QUESTION))


def exact_plurality(weight) -> dict[int, float]:
  """P(output = a) for a copy-plurality aggregator over C draws, summing weight(counts) over compositions; ties
  are uniform (first occurrence in a uniformly ordered subset)."""
  vals, out = list(POPULATION), dict.fromkeys(POPULATION, 0.0)
  for ks in itertools.product(range(HYP.c + 1), repeat=len(vals)):
    if sum(ks) != HYP.c or (w := weight(ks)) == 0:
      continue
    top = [a for a, k in zip(vals, ks) if k == max(ks)]
    for a in top:
      out[a] += w / len(top)
  return out


def hypergeometric(ks):
  return math.prod(math.comb(POPULATION[a], k) for a, k in zip(POPULATION, ks)) / math.comb(HYP.n, HYP.c)


def with_replacement(ks):
  p = [POPULATION[a] / HYP.n for a in POPULATION]
  return math.factorial(HYP.c) / math.prod(map(math.factorial, ks)) * math.prod(q**k for q, k in zip(p, ks))


def plurality_population(cfg: RSAConfig, seed: int = 0):
  answers = np.random.default_rng(seed).permutation(np.repeat(list(POPULATION), list(POPULATION.values())))
  tokens = np.full((cfg.n, cfg.beta), FILLER, np.int32)
  tokens[:, -1] = ANS + answers
  return tokens, np.full((cfg.n,), cfg.beta, np.int32)


def test_copy_plurality_matches_the_exact_hypergeometric_probability():
  tokens, lens = plurality_population(HYP)
  state = rsa.state_from_population(HYP, jax.random.key(0), tokens, lens)
  one_round = jax.jit(lambda ks: jax.lax.map(lambda k: rsa.aggregation_round(
    HYP, pieces_for(4), plurality_decoder, state._replace(key=k), Q_PADDED, Q_LEN, HYP.beta), ks))
  out = np.asarray(one_round(jax.random.split(jax.random.key(11), HYP_K)).pool_NG[:, :, HYP.beta - 1])
  counts = np.array([(out == ANS + a).sum() for a in POPULATION])
  assert counts.sum() == out.size  # every output is one of the population's answers
  exact = exact_plurality(hypergeometric)
  expected = np.array([exact[a] for a in POPULATION]) * out.size
  assert abs(counts[0] / out.size - exact[7]) < 0.025  # spec §5.7's tolerance on P(7)
  assert ((counts - expected) ** 2 / expected).sum() < chi2_crit(len(POPULATION) - 1)
  # Power: drawing with replacement (exact probabilities differ by ~0.025) is rejected by the same statistic.
  wrong = np.array([exact_plurality(with_replacement)[a] for a in POPULATION]) * out.size
  assert ((counts - wrong) ** 2 / wrong).sum() > chi2_crit(len(POPULATION) - 1)


# --------------------------------------------------------------------------------------- Markovian truncation

TRUNC = RSAConfig(n=5, c=5, t=1, tau=4, beta=10, q_max=4)  # C = N: every prompt shows the whole population
_trunc_round = jax.jit(
  lambda state: rsa.aggregation_round(TRUNC, pieces_for(5), plurality_decoder, state, Q_PADDED, Q_LEN, TRUNC.beta)
)


def test_c_equal_n_reaches_consensus_in_one_round():
  tokens = np.full((TRUNC.n, TRUNC.beta), FILLER, np.int32)
  tokens[:, -1] = ANS + np.array([3, 7, 5, 7, 3])  # 7 and 3 tie: every prompt sees both; the first one shown wins
  state = rsa.state_from_population(TRUNC, jax.random.key(2), tokens, np.full((TRUNC.n,), TRUNC.beta))
  out = np.asarray(_trunc_round(state).pool_NG[:, TRUNC.beta - 1])
  assert len(set(out.tolist())) > 1 and set(out.tolist()) <= {ANS + 3, ANS + 7}  # ties split by candidate order
  tokens[2, -1] = ANS + 7  # a strict plurality: consensus on it in one round
  state = rsa.state_from_population(TRUNC, jax.random.key(2), tokens, np.full((TRUNC.n,), TRUNC.beta))
  assert (np.asarray(_trunc_round(state).pool_NG[:, TRUNC.beta - 1]) == ANS + 7).all()


@pytest.mark.parametrize("position, visible", [(5, False), (6, True), (0, False), (9, True)])
def test_an_answer_before_the_last_tau_tokens_is_invisible(position, visible):
  """Traces of 10 tokens, τ = 4: the tail is positions 6..9; an answer at position 5 cannot reach the next round."""
  tokens = np.full((TRUNC.n, TRUNC.beta), FILLER, np.int32)
  tokens[:, position] = ANS + 7
  state = rsa.state_from_population(TRUNC, jax.random.key(1), tokens, np.full((TRUNC.n,), TRUNC.beta))
  answers = np.asarray(_trunc_round(state).pool_NG[:, TRUNC.beta - 1])
  assert (answers == (ANS + 7 if visible else NONE)).all()


# ------------------------------------------------------------------------------------------- special cases

DELETHINK = RSAConfig.delethink(n=3, t=3, beta=6, tau=4, q_max=4, keep_finished=True)  # true Delethink
CONTINUE_PIECES = PromptPieces(initial=((1, 2), (3,)), prefix=(1, 2), heads=((3,),), suffix=())  # tail = own prefix


def test_delethink_continues_its_own_trace():
  state = rsa.run(DELETHINK, CONTINUE_PIECES, count_decoder, QUESTION, KEY)
  pool = np.asarray(state.pool_NG)
  for b in range(DELETHINK.n):  # row b counts on from where its own previous chunk stopped
    np.testing.assert_array_equal(pool[b], 1000 * (b + 1) + DELETHINK.t * DELETHINK.beta + np.arange(6))


def test_true_delethink_gives_the_first_chunk_its_own_budget():
  # Delethink (spec §2.1, P12): chunk 1 gets C new tokens, later chunks C - m after a carry of m: beta_first = C.
  cfg = dataclasses.replace(DELETHINK, beta_first=DELETHINK.beta + DELETHINK.tau)
  assert [cfg.budget(r) for r in range(cfg.rounds)] == [10, 6, 6, 6] and cfg.pool_width == 10
  recorder = Recorder(count_decoder)
  state = rsa.run_loop(cfg, CONTINUE_PIECES, recorder, QUESTION, KEY)
  assert_states_equal(state, rsa.run(cfg, CONTINUE_PIECES, count_decoder, QUESTION, KEY))
  assert [call["max_new"] for call in recorder.calls] == [10, 6, 6, 6]
  np.testing.assert_array_equal(state.generated_R, [cfg.n * 10] + [cfg.n * 6] * cfg.t)
  # Every chunk sees the same context, C + the fixed pieces (a later one: carry m + C - m new tokens).
  np.testing.assert_array_equal(state.max_context_R, [len(QUESTION) + 3 + 10] * cfg.rounds)
  pool = np.asarray(state.pool_NG)
  for b in range(cfg.n):  # chunk after chunk, each continuing where its own previous one stopped
    np.testing.assert_array_equal(pool[b, :6], 1000 * (b + 1) + 10 + cfg.t * 6 - 6 + np.arange(6))


@functools.partial(jax.jit, static_argnums=3)
def stop_row0_decoder(key, prompts_BL, plen_B, max_new):
  """count_decoder, except that row 0 writes EOS as its third token and stops there."""
  tokens_BM, len_B = count_decoder(key, prompts_BL, plen_B, max_new)
  return tokens_BM.at[0, 2].set(EOS), len_B.at[0].set(3)


def test_delethink_keeps_a_finished_trace_and_counts_only_live_ones():
  cfg = dataclasses.replace(DELETHINK, stop_ids=(EOS,))
  state = rsa.run(cfg, CONTINUE_PIECES, stop_row0_decoder, QUESTION, KEY)
  assert_states_equal(state, rsa.run_loop(cfg, CONTINUE_PIECES, stop_row0_decoder, QUESTION, KEY))
  pool = np.asarray(state.pool_NG)
  np.testing.assert_array_equal(pool[0], [1000, 1001, EOS, PAD, PAD, PAD])  # round 0's trace: not continued past EOS
  for b in (1, 2):
    np.testing.assert_array_equal(pool[b], 1000 * (b + 1) + cfg.t * cfg.beta + np.arange(6))
  assert state.finished_N.tolist() == [True, False, False]
  np.testing.assert_array_equal(state.pool_len_N, [3, 6, 6])
  # The kept trace's later decodes are discarded: not generated, not prefilled, not in the context witness.
  np.testing.assert_array_equal(state.generated_R, [3 + 2 * 6] + [2 * 6] * cfg.t)
  prompt = len(CONTINUE_PIECES.prefix) + len(QUESTION) + len(CONTINUE_PIECES.heads[0]) + cfg.tau
  np.testing.assert_array_equal(state.prefilled_R[1:], [2 * prompt] * cfg.t)


def test_c1_aggregation_refines_a_finished_trace_too():
  """The report's C = 1 baseline (an aggregation template, keep_finished off): a trace that ended is still refined
  in every round, as Zyphra's proxy rebuilds every row each iteration; only true Delethink keeps it."""
  cfg = dataclasses.replace(DELETHINK, stop_ids=(EOS,), keep_finished=False)
  state = rsa.run(cfg, CONTINUE_PIECES, stop_row0_decoder, QUESTION, KEY)
  assert_states_equal(state, rsa.run_loop(cfg, CONTINUE_PIECES, stop_row0_decoder, QUESTION, KEY))
  np.testing.assert_array_equal(state.generated_R, [3 + 2 * 6] * cfg.rounds)  # row 0 decoded (3 tokens) each round
  # Row 0 holds its last round's output, a continuation (kept, it would still be round 0's [1000, 1001, EOS]).
  row0 = np.asarray(state.pool_NG)[0, :3].tolist()
  assert row0[2] == EOS and row0[:2] != [1000, 1001] and int(state.pool_len_N[0]) == 3, row0
  with pytest.raises(ValueError, match="keep_finished needs self-continuation"):
    RSAConfig(n=4, c=2, t=1, tau=2, beta=4, keep_finished=True)


def test_a_decoder_that_skips_empty_prompts_gets_none_for_frozen_rows():
  cfg = dataclasses.replace(DELETHINK, stop_ids=(EOS,))
  seen = []

  def skipping(key, prompts_BL, plen_B, max_new):  # host loop: concrete lengths
    seen.append(np.asarray(plen_B).tolist())
    tokens_BM, len_B = stop_row0_decoder(key, prompts_BL, plen_B, max_new)
    return tokens_BM, jnp.where(plen_B > 0, len_B, 0)  # an inactive row generates nothing

  skipping.skips_empty_prompts = True
  state = rsa.run_loop(cfg, CONTINUE_PIECES, skipping, QUESTION, KEY)
  # Row 0 finished in round 0: every later round hands it an empty prompt; the others keep theirs.
  assert [p[0] for p in seen] == [seen[0][0]] + [0] * cfg.t and all(min(p[1:]) > 0 for p in seen)
  # Nothing else changes: the frozen row's decode was discarded anyway.
  assert_states_equal(state, rsa.run_loop(cfg, CONTINUE_PIECES, stop_row0_decoder, QUESTION, KEY))
  assert not hasattr(stop_row0_decoder, "skips_empty_prompts")  # other decoders never see an empty prompt

  seen_traced = []

  def traced(key, prompts_BL, plen_B, max_new):  # the same inside run's single jit
    jax.debug.callback(lambda p: seen_traced.append(np.asarray(p).tolist()), plen_B, ordered=True)
    tokens_BM, len_B = stop_row0_decoder(key, prompts_BL, plen_B, max_new)
    return tokens_BM, jnp.where(plen_B > 0, len_B, 0)

  traced.skips_empty_prompts = True
  assert_states_equal(rsa.run(cfg, CONTINUE_PIECES, traced, QUESTION, KEY), state)
  assert seen_traced == seen


def test_a_final_stop_token_is_not_in_the_tail_and_marks_the_trace_finished():
  cfg = RSAConfig(n=3, c=2, t=1, tau=3, beta=5, q_max=4, stop_ids=EOS)
  assert cfg.stop_ids == (EOS,)
  tokens = np.array([[50, 51, 107, EOS, PAD],  # stopped early
                     [50, 51, 52, 107, EOS],  # the stop token in its last allowed slot: finished, not cut
                     [50, 51, 52, 53, EOS + 1]], np.int32)  # cut at the budget
  lens = np.array([4, 5, 5])
  for stop_ids, finished, tails in [
      ((EOS,), [True, True, False], [[50, 51, 107], [51, 52, 107], [52, 53, EOS + 1]]),
      ((), [True, False, False], [[51, 107, EOS], [52, 107, EOS], [52, 53, EOS + 1]])]:  # without: EOS carried
    state = rsa.state_from_population(dataclasses.replace(cfg, stop_ids=stop_ids), KEY, tokens, lens)
    assert state.finished_N.tolist() == finished
    np.testing.assert_array_equal(state.pool_len_N, lens)  # the stop token was generated: it stays counted
    tails_NT, _ = rsa.extract_tails(state.pool_NG, state.tail_end_N, cfg.tau, PAD)
    np.testing.assert_array_equal(tails_NT, tails)


def test_parallel_sampling_ignores_the_aggregation_settings():
  cfg = RSAConfig(n=2, c=4, t=0, tau=9, beta=4, q_max=4)  # c > n and tau > beta: nothing aggregates when t = 0
  assert rsa.prompt_capacity(cfg, pieces_for(1)) == pieces_for(1).initial_len + cfg.q_max
  state = rsa.run(cfg, pieces_for(1), full_decoder, QUESTION, KEY)
  assert int(state.generated) == cfg.n * cfg.beta


def test_full_chain_rsa_carries_whole_outputs():
  cfg = RSAConfig.rsa(n=4, c=2, t=2, beta=6, q_max=4)
  assert cfg.tau == cfg.beta and cfg.rounds == 3
  rec = Recorder(random_decoder)
  rsa.run_loop(cfg, pieces_for(2), rec, QUESTION, KEY)
  for prev, cur in itertools.pairwise(rec.calls):
    outputs = [tuple(prev["tokens"][i, : prev["lens"][i]]) for i in range(cfg.n)]
    for i in range(cfg.n):
      assert all(tuple(s) in outputs for s in segments(cur["prompts"][i], cur["plen"][i], pieces_for(2)))


@pytest.mark.parametrize(
  "cfg",
  [
    RSAConfig(n=3, c=2, t=0, tau=3, beta=4, beta_final=7, q_max=4),  # plain parallel sampling
    RSAConfig(n=1, c=1, t=3, tau=3, beta=4, q_max=4),
  ],
  ids=["t0", "n1c1t3"],
)
def test_special_cases_run(cfg):
  pieces = pieces_for(cfg.c)
  state = rsa.run(cfg, pieces, full_decoder, QUESTION, KEY)
  assert int(state.rounds_done) == cfg.t + 1
  # Full-length outputs make each round's budget visible: β before the last round, β_final in it.
  np.testing.assert_array_equal(state.generated_R, [cfg.n * cfg.beta] * cfg.t + [cfg.n * cfg.final_budget])
  # ... and reach the context bound exactly: no tail token is dropped or duplicated by the splice.
  full_prompt = pieces.template_len + len(QUESTION) + cfg.c * cfg.tau
  np.testing.assert_array_equal(state.max_prompt_R[1:], [full_prompt] * cfg.t)
  assert int(state.max_context) == (full_prompt if cfg.t else pieces.initial_len + len(QUESTION)) + cfg.final_budget


# ----------------------------------------------------------------------------------------------------- tails


def test_extract_tails_edge_cases():
  pool = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), (3, 1))  # rows 1..8
  tails, lens = rsa.extract_tails(pool, jnp.array([8, 2, 0]), 3, pad_id=PAD)  # len > τ, len < τ, len = 0
  np.testing.assert_array_equal(tails, [[6, 7, 8], [1, 2, PAD], [PAD, PAD, PAD]])
  np.testing.assert_array_equal(lens, [3, 2, 0])


def test_reasoning_tails_end_at_the_marker():
  cfg = RSAConfig(n=4, c=2, t=1, tau=3, beta=9, q_max=4, tail_source="reasoning", end_think=[60, 61])
  assert cfg.end_think == (60, 61) and hash(cfg)
  tokens = np.array(
    [
      [50, 51, 52, 53, 54, 60, 61, 107, 0],  # marker at 5: tail 52..54; the answer after it is not carried
      [50, 51, 52, 53, 54, 55, 56, 57, 58],  # no marker (cut at the budget): all reasoning
      [50, 51, 52, 60, 53, 54, 55, 56, 60],  # half markers only
      [50, 51, 52, 53, 54, 55, 56, 60, 61],  # a marker reaching past the length (8) does not count
    ],
    np.int32,
  )
  lens = np.array([8, 9, 9, 8])
  state = rsa.state_from_population(cfg, jax.random.key(0), tokens, lens)
  np.testing.assert_array_equal(state.tail_end_N, [5, 9, 9, 8])
  tails, _ = rsa.extract_tails(state.pool_NG, state.tail_end_N, cfg.tau)
  np.testing.assert_array_equal(tails[0], [52, 53, 54])
  np.testing.assert_array_equal(tails[3], [55, 56, 60])
  everything = dataclasses.replace(cfg, tail_source="all")
  np.testing.assert_array_equal(rsa.state_from_population(everything, jax.random.key(0), tokens, lens).tail_end_N, lens)


def test_pacore_hybrid_tails_carry_the_answer_when_there_is_one():
  cfg = RSAConfig(n=4, c=2, t=1, tau=3, beta=9, q_max=4, tail_source="pacore_hybrid", end_think=[60, 61],
                  stop_ids=(99,))
  tokens = np.array(
    [
      [50, 51, 52, 60, 61, 70, 71, 72, 73],  # answered: the last 3 of the answer 70..73
      [50, 60, 61, 51, 60, 61, 70, 99, 0],  # two markers: the answer after the last one, without the stop token
      [50, 51, 52, 53, 54, 55, 56, 57, 58],  # no marker (cut at the budget): the reasoning's tail, as "all" has it
      [50, 51, 52, 53, 54, 55, 60, 61, 0],  # the marker last: an empty answer, the reasoning before it is carried
    ],
    np.int32,
  )
  lens = np.array([9, 8, 9, 8])
  state = rsa.state_from_population(cfg, jax.random.key(0), tokens, lens)
  np.testing.assert_array_equal(state.tail_start_N, [5, 6, 0, 0])
  np.testing.assert_array_equal(state.tail_end_N, [9, 7, 9, 6])
  tails, tail_lens = rsa.extract_tails(state.pool_NG, state.tail_end_N, cfg.tau, PAD, state.tail_start_N)
  np.testing.assert_array_equal(tails, [[71, 72, 73], [70, PAD, PAD], [56, 57, 58], [53, 54, 55]])
  np.testing.assert_array_equal(tail_lens, [3, 1, 3, 3])
  # The aggregation prompts splice exactly those tails (prefix, question, head, tail, head, tail, suffix).
  pieces = rsa.PromptPieces(initial=((1,), (2,)), prefix=(3,), heads=((4,), (5,)), suffix=(6,))
  _, prompts_NL, lens_N = rsa.prepare_aggregation(cfg, pieces, state, jnp.array([40, 41, 0, 0]), jnp.int32(2))
  subsets = np.asarray(rsa.candidate_subsets(cfg, rsa._round_keys(state, state.rounds_done)[0]))
  carried = {0: [71, 72, 73], 1: [70], 2: [56, 57, 58], 3: [53, 54, 55]}
  for row in range(cfg.n):
    a, b = subsets[row]
    want = [3, 40, 41, 4, *carried[a], 5, *carried[b], 6]
    assert np.asarray(prompts_NL[row, : int(lens_N[row])]).tolist() == want


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  "kw, words",
  [
    (dict(n=4, c=5), ["c = 5", "n = 4"]),
    (dict(tau=9, beta=8), ["tau = 9", "beta = 8"]),
    (dict(n=0), ["RSAConfig.n", "0"]),
    (dict(t=-1), ["RSAConfig.t", "-1"]),
    (dict(beta_final=0), ["RSAConfig.beta_final"]),
    (dict(q_max=True), ["RSAConfig.q_max"]),
    (dict(tail_source="answer"), ["tail_source", "answer"]),
    (dict(tail_source="reasoning"), ["end_think"]),
    (dict(tail_source="pacore_hybrid"), ["pacore_hybrid", "end_think"]),
    (dict(end_think=(-1,)), ["end_think"]),
    (dict(max_context=0), ["max_context"]),
  ],
)
def test_bad_config_names_the_field(kw, words):
  base = dict(n=4, c=2, t=1, tau=4, beta=8, q_max=8)
  with pytest.raises(ValueError) as e:
    RSAConfig(**{**base, **kw})
  assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_run_inputs_raise_before_jit():
  rsa.run(CFG, PIECES, random_decoder, QUESTION, KEY)
  before = rsa._run_jit._cache_size()
  with pytest.raises(ValueError, match=r"9 tokens, more than RSAConfig.q_max = 8"):
    rsa.run(CFG, PIECES, random_decoder, list(range(20, 29)), KEY)
  too_small = dataclasses.replace(CFG, max_context=rsa.context_bound(CFG, PIECES) - 1)
  with pytest.raises(ValueError, match="max_context"):
    rsa.run(too_small, PIECES, random_decoder, QUESTION, KEY)
  rsa.check_pieces(dataclasses.replace(CFG, max_context=rsa.context_bound(CFG, PIECES)), PIECES)  # exactly fits
  with pytest.raises(ValueError, match=r"built for 2 candidates, RSAConfig\.c = 3"):
    rsa.run(CFG, pieces_for(2), random_decoder, QUESTION, KEY)
  with pytest.raises(ValueError, match="question"):
    rsa.run(CFG, PIECES, random_decoder, [], KEY)
  assert rsa._run_jit._cache_size() == before  # nothing was traced
  with pytest.raises(ValueError, match=r"PromptPieces.prefix"):
    PromptPieces(initial=((), ()), prefix=(-3,), heads=((1,),), suffix=())
  with pytest.raises(ValueError, match=r"PromptPieces.continuation carries one tail \(C = 1\), got 2 heads"):
    PromptPieces(initial=((), ()), prefix=(3,), heads=((1,), (2,)), suffix=(), continuation=True)


@pytest.mark.parametrize(
  "decoder",
  [
    lambda key, p, pl, m: (jnp.zeros((2, m), jnp.int32), pl),  # wrong batch
    lambda key, p, pl, m: (jnp.zeros((p.shape[0], m + 1), jnp.int32), pl),  # more tokens than asked for
  ],
  ids=["batch", "width"],
)
def test_decoder_with_wrong_shapes_is_named(decoder):
  with pytest.raises(ValueError, match=r"decode_fn must return .* N = RSAConfig.n = 6 and max_new = 8"):
    rsa.run_loop(CFG, PIECES, decoder, QUESTION, KEY)


# ------------------------------------------------------------------------------------------ answers and voting


def test_extract_boxed():
  assert ans.extract_boxed(r"so \boxed{\frac{1}{2}} then \boxed{x^{2}+1}.") == "x^{2}+1"
  assert ans.extract_boxed(r"\boxed{3} but finally \boxed{4") == "3"  # truncated box skipped
  assert ans.extract_boxed(r"\fbox{12}") == "12"
  assert ans.extract_boxed(r"$\boxed 5$") == "5"
  assert ans.extract_boxed(r"End with \boxed{}.") == ""
  assert ans.extract_boxed("no answer") is None and ans.extract_boxed(None) is None
  # A space before the brace is still a braced box (TeX reads it so), not the brace-less form with the braces kept.
  assert ans.extract_boxed(r"\boxed {7}") == "7"
  # Prose after the answer does not replace it: an echoed empty box, or the word after a bare \boxed.
  assert ans.extract_boxed(r"\boxed{42}. Put the final answer in \boxed{}.") == "42"
  assert ans.extract_boxed("\\boxed{42}\n\\boxed{\\text{}} \\boxed{$ $}") == "42"  # boxes of markup alone are empty
  assert ans.extract_boxed(r"\boxed{\text{ }}") == ""
  assert ans.extract_boxed(r"$\boxed 3$ then $\boxed 5$") == "5"  # the last brace-less box, as for braced ones
  assert ans.extract_boxed(r"\boxed{42}. (I wrote it in \boxed so that it is seen.)") == "42"
  vote = ans.majority_vote([ans.extract_boxed(t) for t in (r"\boxed {7}", r"\boxed{7}", r"\boxed{8}", r"\boxed {7}.")])
  assert (vote.answer, vote.count) == ("7", 3)


def test_normalize_answer():
  n = ans.normalize_answer
  assert n(r"$\dfrac{1}{2}$.") == n(r"\frac{1}{2}") == r"\frac{1}{2}"
  assert n(r"\text{5 cm}") == "5cm"
  assert n("x = 12") == "12" and n("1,000") == "1000" and n("5.00") == "5" and n(r"90^\circ") == "90"
  assert n("X = 5") == "5" and n("1234,567") != "1234567"  # a capital variable; no thousands group of four
  assert n("   ") is None and n(None) is None
  # Presentation variants of one answer (a review found each scored wrong against the plain form).
  for variants in ([r"\frac12", r"\dfrac12", r"\frac{1}{2}", r"\frac1{2}"], [r"\sqrt2", r"\sqrt{2}"],
                   ["1{,}000", "1000", "1,000"], ["1,234.5", "1234.5"], ["0.50", ".5", "0.5"], ["+5", "5", "5.0"],
                   [r"\$1000", "1000"], ["(A)", "A"], ["-.5", "-0.5"]):
    assert len({n(v) for v in variants}) == 1, variants
  # AIME's zero-padded integers, a grouping brace around the whole answer.
  for variants in (["007", "7", "7.0"], ["-007", "-7"], ["{7}", "7"], ["033", "33"], ["0", "00"]):
    assert len({n(v) for v in variants}) == 1, variants
  assert n("0.5") == "0.5" and n("100") == "100" and n(r"\{1,2\}") != n("12")
  assert n("(1,2)") == "(1,2)" and n(r"\frac{12}{5}") != n(r"\frac{1}{25}") and n("10") != n("1")
  assert n("12") != n("13")
  for raw in ("x = y = 3", r"$\text{\textbf{\mathrm{\text{5}}}}$", "5.00 .", "1,000", r"\dfrac12", "1{,}000.50",
              r"\text{(B)}", "+.250"):
    assert n(n(raw)) == n(raw), raw  # a vote's winner comes normalised and is normalised again when scored
  # ... else majority@N could exceed pass@N ("x = y = 3" voted as "y=3", then scored as "3").
  assert ans.majority_at_n(["x = y = 3"] * 3, "3") == ans.pass_at_n(["x = y = 3"] * 3, "3") == 1.0


def test_majority_vote_rules():
  vote = ans.majority_vote(["3", "", None, "4", "4.0", "3", ""])
  assert (vote.answer, vote.count, vote.valid) == ("3", 2, 4)  # "4" and "4.0" tie with "3", seen first
  assert ans.majority_vote(["4", "3", "3", "4"]).answer == "4"
  assert ans.majority_vote(["1", "2", "2"]).answer == "2"
  fin = ans.majority_vote(["7", "8", "7"], finished=[False, True, True])
  assert fin.answer == "7" and fin.index == 2  # the representative prefers a finished candidate
  assert ans.majority_vote(["7", "8", "7"], finished=[False] * 3).index == 0  # none finished: the first one
  with pytest.raises(ValueError, match="finished has 2 entries, answers has 1"):
    ans.majority_vote(["1"], finished=[True, False])
  assert ans.majority_vote([None, ""]) is None


def test_population_metrics():
  answers = ["7", "7", "3", None]
  assert ans.mean_correct(answers, "7") == 0.5
  assert ans.pass_at_n(answers, "3") == 1.0 and ans.pass_at_n(answers, "9") == 0.0
  assert ans.majority_at_n(answers, "7") == 1.0 and ans.majority_at_n(answers, "3") == 0.0
  assert ans.majority_at_n(["\\dfrac{1}{2}", "\\frac12", "3"], "\\frac{1}{2}.") == 1.0  # the gold is normalised too
  assert ans.answer_entropy(["1"] * 4) == 0.0 and math.copysign(1, ans.answer_entropy([None] * 3)) == 1  # not -0.0
  assert abs(ans.answer_entropy(["1", "2"]) - math.log(2)) < 1e-12


def test_answer_after_think_scores_only_what_follows_the_reasoning():
  from zaya_jax.infer import cli_files, rsa_eval

  assert rsa_eval.answer_section("a </think> b </think> c", "</think>") == " c"
  assert rsa_eval.answer_section("x", None) == "x"
  texts = [r"<think>try \boxed{7}? hmm, let me recheck", r"<think>\boxed{8}</think>so \boxed{7}."]
  problem = cli_files.Problem(0, 0, "q", "7")
  whole = rsa_eval.report_problem(problem, texts, [False, True], 10, 10, 10)
  after = rsa_eval.report_problem(problem, texts, [False, True], 10, 10, 10, answer_after="</think>")
  assert whole.answers == ("7", "7") and whole.mean_correct == 1.0
  assert after.answers == (None, "7") and after.mean_correct == 0.5  # a box inside cut-off reasoning is no answer


# ------------------------------------------------------------------------------ Delethink rows, tails, t = 0 (audit)

FIRST = DELETHINK.beta + DELETHINK.tau  # round 0's budget: the only call with this max_new


@functools.partial(jax.jit, static_argnums=3)
def stop_first_chunk_decoder(key, prompts_BL, plen_B, max_new):
  """count_decoder; in round 0 (max_new == FIRST) every row writes EOS as its third token. Later calls never stop."""
  tokens_BM, len_B = count_decoder(key, prompts_BL, plen_B, max_new)
  if max_new == FIRST:
    return tokens_BM.at[:, 2].set(EOS), jnp.full_like(len_B, 3)
  return tokens_BM, len_B


def test_delethink_rows_that_finished_stay_finished_and_cost_nothing():
  # Every trace ends in round 0; their re-decodes (discarded) run to the budget. A kept trace must stay finished (not
  # be continued from round 2 on), and rounds with every row kept count no tokens, prompts or context.
  cfg = dataclasses.replace(DELETHINK, stop_ids=(EOS,), beta_first=FIRST)
  seen = []

  def plain(key, prompts_BL, plen_B, max_new):  # no skips_empty_prompts: must get every row's real prompt
    seen.append(np.asarray(plen_B).tolist())
    return stop_first_chunk_decoder(key, prompts_BL, plen_B, max_new)

  state = rsa.run_loop(cfg, CONTINUE_PIECES, plain, QUESTION, KEY)
  assert_states_equal(state, rsa.run(cfg, CONTINUE_PIECES, stop_first_chunk_decoder, QUESTION, KEY))
  assert state.finished_N.tolist() == [True] * cfg.n
  pool = np.asarray(state.pool_NG)
  for b in range(cfg.n):
    np.testing.assert_array_equal(pool[b], [1000 * (b + 1), 1000 * (b + 1) + 1, EOS] + [PAD] * (FIRST - 3))
  for name in ("generated_R", "prefilled_R", "max_prompt_R", "max_context_R"):
    np.testing.assert_array_equal(getattr(state, name)[1:], [0] * cfg.t, err_msg=name)
  assert len(seen) == cfg.rounds and all(min(p) > 0 for p in seen), seen


def test_reasoning_tails_end_at_the_first_marker():
  cfg = RSAConfig(n=2, c=2, t=1, tau=3, beta=9, q_max=4, tail_source="reasoning", end_think=[60, 61])
  tokens = np.array([[50, 51, 60, 61, 52, 53, 60, 61, 54], [50, 51, 52, 53, 60, 61, 70, 60, 61]], np.int32)
  state = rsa.state_from_population(cfg, jax.random.key(0), tokens, np.array([9, 9]))
  np.testing.assert_array_equal(state.tail_end_N, [2, 4])


@functools.partial(jax.jit, static_argnums=3)
def one_token_decoder(key, prompts_BL, plen_B, max_new):
  tokens_BM, _ = full_decoder(key, prompts_BL, plen_B, max_new)
  return tokens_BM, jnp.ones((prompts_BL.shape[0],), jnp.int32)


def test_parallel_sampling_decodes_round_0_with_the_final_decoder():
  cfg = RSAConfig(n=3, c=2, t=0, tau=3, beta=4, beta_final=7, q_max=4)
  for driver in (rsa.run, rsa.run_loop):
    state = driver(cfg, pieces_for(cfg.c), one_token_decoder, QUESTION, KEY, final_decode_fn=full_decoder)
    np.testing.assert_array_equal(state.pool_len_N, [cfg.final_budget] * cfg.n, err_msg=driver.__name__)


def test_normalize_answer_keeps_signs_and_drops_presentation():
  n = ans.normalize_answer
  for a, b in (("-5", "5"), (r"-\frac{1}{2}", r"\frac{1}{2}"), ("-0.5", "0.5"), ("-12", "12")):
    assert n(a) != n(b), (a, b)  # a sign is part of the answer, not presentation
  for variants in ([r"\left(1,2\right)", "(1,2)"], [r"\left[0,1\right)", "[0,1)"], [r"1\,000", "1000", r"1\!000"],
                   [r"5\ \text{cm}", r"5\quad\text{cm}", "5cm"], [r"50\%", "50%", "50"]):
    assert len({n(v) for v in variants}) == 1, variants
