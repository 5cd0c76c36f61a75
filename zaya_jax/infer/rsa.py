"""Markovian RSA as pure functions: static-shape state, device-built prompts, one injected batched decoder.

Dimension letters: N population (traces per round), C candidates per aggregation prompt, T tail tokens (τ),
G pool width = max(β, β_final), M new tokens of one decode call (β, or β_final in the last round), L prompt
capacity (static), Q question capacity (q_max), R rounds = t + 1.

Algorithm (ZAYA1-8B report §VI-A; MARKOVIAN_RSA.md §3.1): round 0 decodes N rollouts of the question; each of the
t aggregation rounds gives every one of its N new traces C distinct candidates drawn uniformly without replacement
from the previous round only, splices their last τ tokens with the question into an aggregation prompt and decodes
it. The last round (round t; round 0 when t = 0) has its own budget β_final. Special cases: τ = β is full-chain RSA
(`RSAConfig.rsa`), C = 1 with self-continuation is the parallel Delethink-like baseline (`RSAConfig.delethink`),
t = 0 is plain parallel sampling.

The model enters only through `decode_fn(key, prompts[B, L] int32, prompt_lens[B] int32, max_new: int) ->
(tokens[B, max_new] int32, lengths[B] int32)`, B = N, prompts right-padded with `pad_id`. Tokens past a row's length
are ignored (scrubbed to pad_id); lengths are clipped to [0, max_new]. A row counts as finished (rather than cut at
the budget) when it is shorter than max_new or ends in one of `RSAConfig.stop_ids`; a final stop token stays in the
pool and in the token counts (the decoder generated it) but is no part of the trace's text, so tails end before it.
With `keep_finished` (true Delethink: c = 1, self-continuation), a finished trace is done: later rounds keep it as
it is (its row is still decoded, for static shapes, and the result discarded and left out of the accounting), as
Delethink stops a trace at EOS. Otherwise every round builds every new trace from its candidates, finished or not
(the ZAYA report's C = 1 baseline refines a finished trace too).

Two drivers give identical states for the same key: `run` (one jit: round 0, `lax.scan` over the middle rounds,
final round) and `run_loop` (a host loop over jitted prompt building and state updates, calling decode_fn on the
host; use it for decoders that cannot be traced, or to look at every round). Round r draws from
`fold_in(key, r)` (spec §5.5), so its randomness does not depend on the driver.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DecodeFn = Callable[[jax.Array, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]
TAIL_SOURCES = ("reasoning", "all", "pacore_hybrid")


def _is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclass(frozen=True)
class RSAConfig:
  """Static sampler settings (hashable: it is a jit static argument). Validated at construction.

  t counts aggregation rounds after round 0 (the ZAYA report's T); RSA's `--loops` is t + 1 and Zyphra's `rsa/`
  package's t is t + 1 as well (spec P1). Sampling temperature etc. belong to decode_fn (pass a separate
  `final_decode_fn` for the last round's sampling, spec P16).
  """

  n: int = 16  # population N
  c: int = 4  # candidates per aggregation prompt C (<= n)
  t: int = 2  # aggregation rounds after round 0
  tau: int = 4096  # tail length τ in tokens (<= beta)
  beta: int = 16384  # new-token budget of rounds 0..t-1
  beta_final: int | None = None  # budget of the last round (None: beta); the report uses 40,960
  beta_first: int | None = None  # budget of round 0 (None: beta); Delethink's first chunk C = beta + tau
  # "all": tails are the whole output's last τ tokens; "reasoning": they end at the end-of-thinking marker when
  # present; "pacore_hybrid" (the report's PaCoRe hybrid, Zyphra's proxy in PaCoRe mode): a trace with an answer
  # after its last marker carries (the last τ tokens of) that answer, any other its reasoning. As the proxy does, a
  # trace cut at its budget after the marker carries its partial answer (the spec's table says "if finished").
  tail_source: str = "all"
  end_think: tuple[int, ...] = ()  # token ids of the end-of-thinking marker (a sequence, e.g. (id of </think>,))
  stop_ids: tuple[int, ...] = ()  # the decoder's stop tokens (EOS, end of turn): a trace ending in one is finished
  self_continue: bool = True  # with c == 1, trace i aggregates its own previous trace i (no draw)
  # With self-continuation: a finished trace (ending in a stop id) stays as it is in later rounds, as true Delethink
  # stops a chain at EOS (use with prompts.DELETHINK). False: every trace is refined every round, as the ZAYA report's
  # C = 1 baseline with an aggregation template does (Zyphra's proxy rebuilds every row each iteration).
  keep_finished: bool = False
  q_max: int = 2048  # question capacity Q (static shape of the question buffer)
  max_context: int | None = None  # if set, prompt capacity + max budget must fit (the decoder's cache length)
  pad_id: int = 0
  seed: int = 0  # used when a driver is called with key=None; not part of the compiled program

  def __post_init__(self):
    for name in ("n", "c", "tau", "beta", "q_max"):
      v = getattr(self, name)
      if not _is_int(v) or v <= 0:
        raise ValueError(f"RSAConfig.{name} must be a positive int, got {v!r}")
    if not _is_int(self.t) or self.t < 0:
      raise ValueError(f"RSAConfig.t (aggregation rounds after round 0) must be an int >= 0, got {self.t!r}")
    for name in ("beta_final", "beta_first"):
      v = getattr(self, name)
      if v is not None and (not _is_int(v) or v <= 0):
        raise ValueError(f"RSAConfig.{name} must be a positive int or None, got {v!r}")
    if self.t == 0 and self.beta_first is not None:
      raise ValueError(
        f"RSAConfig.beta_first = {self.beta_first} is unused with t = 0: round 0 is then the final round, whose "
        "budget is beta_final (or beta)"
      )
    if self.max_context is not None and (not _is_int(self.max_context) or self.max_context <= 0):
      raise ValueError(f"RSAConfig.max_context must be a positive int or None, got {self.max_context!r}")
    if not _is_int(self.pad_id) or self.pad_id < 0:
      raise ValueError(f"RSAConfig.pad_id must be an int >= 0, got {self.pad_id!r}")
    if not _is_int(self.seed):
      raise ValueError(f"RSAConfig.seed must be an int, got {self.seed!r}")
    if self.t > 0 and self.c > self.n:  # t = 0 (parallel sampling) never aggregates: c and tau are unused
      raise ValueError(
        f"RSAConfig.c = {self.c} > RSAConfig.n = {self.n}: each aggregation draws c distinct candidates from the "
        "previous round's n traces (without replacement)"
      )
    if self.t > 0 and self.tau > self.beta:
      raise ValueError(
        f"RSAConfig.tau = {self.tau} > RSAConfig.beta = {self.beta}: a tail is at most one call's output "
        "(tau = beta is full-chain RSA)"
      )
    if self.tail_source not in TAIL_SOURCES:
      raise ValueError(f"RSAConfig.tail_source must be one of {TAIL_SOURCES}, got {self.tail_source!r}")
    for name in ("end_think", "stop_ids"):  # one id or a sequence; a tuple of ints (a list would break hashing)
      value = getattr(self, name)
      ids = (value,) if _is_int(value) else tuple(value)
      if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"RSAConfig.{name} must be token ids >= 0, got {value!r}")
      object.__setattr__(self, name, tuple(int(i) for i in ids))
    if self.keep_finished and not (self.c == 1 and self.self_continue):
      raise ValueError(
        f"RSAConfig.keep_finished needs self-continuation (c = 1, self_continue): with c = {self.c} a new trace "
        "aggregates drawn candidates and is not the continuation of a finished one"
      )
    if self.tail_source in ("reasoning", "pacore_hybrid") and not self.end_think:
      raise ValueError(
        f"RSAConfig.tail_source = {self.tail_source!r} needs the end-of-thinking marker ids in RSAConfig.end_think; "
        "use tail_source='all' for a model without one"
      )

  @property
  def final_budget(self) -> int:
    return self.beta if self.beta_final is None else self.beta_final

  @property
  def pool_width(self) -> int:
    """G: the pool holds any round's output (the largest round budget)."""
    return max(self.budget(r) for r in {0, min(1, self.t), self.t})

  @property
  def rounds(self) -> int:
    """R = t + 1 decode calls per run (RSA's `--loops`)."""
    return self.t + 1

  @property
  def max_generated(self) -> int:
    """The most new tokens one run decodes: N x each round's budget, summed (the report's test-time-compute cost;
    its extra-high setting, t = 8, N = 32, β = 32K: 9 x 32 x 32K = 9.4M, against the ~5.5M a problem took)."""
    return self.n * sum(self.budget(r) for r in range(self.rounds))

  def budget(self, r: int) -> int:
    """New-token budget of round r: beta_final in the last round (round 0 when t = 0), else beta_first in round 0,
    beta in between."""
    if r == self.t:
      return self.final_budget
    return self.beta if r or self.beta_first is None else self.beta_first

  @classmethod
  def markovian(cls, **kw) -> RSAConfig:
    """The report's recommended deployment: (N, C, T) = (16, 4, 2), τ = 4K, β = 16K, final budget 40K."""
    return cls(**{"n": 16, "c": 4, "t": 2, "tau": 4096, "beta": 16384, "beta_final": 40960, **kw})

  @classmethod
  def rsa(cls, n: int = 16, c: int = 4, t: int = 9, beta: int = 8192, **kw) -> RSAConfig:
    """Plain (full-chain) RSA: tails are whole outputs, τ = β. RSA's `--loops 10` is t = 9 here."""
    return cls(n=n, c=c, t=t, tau=beta, beta=beta, **kw)

  @classmethod
  def delethink(cls, n: int = 16, t: int = 4, beta: int = 8192, tau: int = 4096, **kw) -> RSAConfig:
    """C = 1 self-continuation: trace i continues from the last τ tokens of its own previous chunk. The defaults
    are the ZAYA report's parallel Delethink-like baseline (β = 8K, τ = 4K, an aggregation template). True
    Delethink (the Markovian Thinker, spec §2.1) uses `prompts.DELETHINK`, where the tail is the assistant's own
    prefix, with chunk size C and carry m: the first chunk gets C new tokens, later ones C - m, so
    `delethink(beta=C - m, tau=m, beta_first=C, keep_finished=True)`, e.g. C = 8192, m = 4096: a chain that ended
    in EOS is not continued. (Its folding of chunk 1's first 100 tokens into the question is not modelled, nor a
    carry m > C - m taken across several chunks.)"""
    return cls(n=n, c=1, t=t, tau=tau, beta=beta, self_continue=True, **kw)


def _check_ids(name: str, ids) -> tuple[int, ...]:
  ids = tuple(ids)
  if not all(_is_int(i) and i >= 0 for i in ids):
    raise ValueError(f"PromptPieces.{name} must be token ids >= 0, got {ids!r}")
  return tuple(int(i) for i in ids)


@dataclass(frozen=True)
class PromptPieces:
  """Token ids of a prompt's fixed pieces (hashable; baked into the compiled program). Built by
  `prompts.encode_pieces` from a template and a tokenizer, or written by hand in tests.

  Round 0:      initial[0] + question + initial[1]
  Aggregation:  prefix + question + heads[0] + tail_1 + heads[1] + tail_2 + ... + heads[C-1] + tail_C + suffix
  """

  initial: tuple[tuple[int, ...], tuple[int, ...]]
  prefix: tuple[int, ...]
  heads: tuple[tuple[int, ...], ...]  # one per candidate; heads[i] sits between (question or tail i) and tail i+1
  suffix: tuple[int, ...]
  # The prompt ends inside the assistant's own response (Delethink): a round's new tokens continue the trace, whose
  # text is every round's chunk joined, not the newest chunk that the pool holds.
  continuation: bool = False

  def __post_init__(self):
    if len(self.initial) != 2:
      raise ValueError(f"PromptPieces.initial must be (before question, after question), got {len(self.initial)}")
    object.__setattr__(
      self, "initial", (_check_ids("initial", self.initial[0]), _check_ids("initial", self.initial[1]))
    )
    object.__setattr__(self, "prefix", _check_ids("prefix", self.prefix))
    object.__setattr__(self, "heads", tuple(_check_ids(f"heads[{i}]", h) for i, h in enumerate(self.heads)))
    object.__setattr__(self, "suffix", _check_ids("suffix", self.suffix))
    if not self.heads:
      raise ValueError("PromptPieces.heads must hold one piece per candidate, got none")
    if self.continuation and len(self.heads) != 1:
      raise ValueError(f"PromptPieces.continuation carries one tail (C = 1), got {len(self.heads)} heads")

  @property
  def c(self) -> int:
    return len(self.heads)

  @property
  def initial_len(self) -> int:
    """Fixed tokens of the round-0 prompt (chat template around the question)."""
    return len(self.initial[0]) + len(self.initial[1])

  @property
  def template_len(self) -> int:
    """Fixed tokens of an aggregation prompt: |template| in the bound |template| + |q| + C·τ + β."""
    return len(self.prefix) + sum(len(h) for h in self.heads) + len(self.suffix)


def prompt_capacity(cfg: RSAConfig, pieces: PromptPieces) -> int:
  """L: the static prompt length, large enough for round 0 and for any aggregation prompt, so that one compiled
  decoder serves every round and no splice index is ever clamped (round 0 alone when t = 0)."""
  initial = pieces.initial_len + cfg.q_max
  return initial if cfg.t == 0 else max(initial, pieces.template_len + cfg.q_max + cfg.c * cfg.tau)


def context_bound(cfg: RSAConfig, pieces: PromptPieces) -> int:
  """Static bound on prompt + generated tokens of any decode call: L + the largest round budget."""
  return prompt_capacity(cfg, pieces) + cfg.pool_width


def check_pieces(cfg: RSAConfig, pieces: PromptPieces) -> None:
  """Raises ValueError when pieces and config disagree or the prompts cannot fit `cfg.max_context`."""
  if not isinstance(pieces, PromptPieces):
    raise TypeError(f"pieces must be a PromptPieces, got {type(pieces).__name__}")
  if cfg.t > 0 and pieces.c != cfg.c:
    raise ValueError(f"PromptPieces were built for {pieces.c} candidates, RSAConfig.c = {cfg.c}")
  if cfg.max_context is not None and context_bound(cfg, pieces) > cfg.max_context:
    raise ValueError(
      f"prompt capacity {prompt_capacity(cfg, pieces)} (template {pieces.template_len} + q_max {cfg.q_max} + "
      f"c·tau {cfg.c}·{cfg.tau}) + max budget {cfg.pool_width} = {context_bound(cfg, pieces)} exceeds "
      f"RSAConfig.max_context = {cfg.max_context}"
    )


class RSAState(NamedTuple):
  """Everything a round needs and the accounting; every leaf has a static shape (a pytree)."""

  key: jax.Array  # base key; round r uses fold_in(key, r)
  rounds_done: jax.Array  # int32[]: rounds decoded so far; the pool is round rounds_done - 1's output
  pool_NG: jax.Array  # int32 [N, G] current population, right-padded with pad_id
  pool_len_N: jax.Array  # int32 [N]
  tail_start_N: jax.Array  # int32 [N] where each trace's tail may start at the earliest (pacore_hybrid's answer)
  tail_end_N: jax.Array  # int32 [N] where each trace's tail ends (the end-of-thinking marker, or its text's end)
  finished_N: jax.Array  # bool [N] the decoder stopped (a stop token, or short of the budget) rather than cut at it
  generated_R: jax.Array  # int32 [R] new tokens per round (sum of output lengths): D(q) = generated_R.sum()
  prefilled_R: jax.Array  # int32 [R] prompt tokens sent per round (sum of prompt lengths)
  max_prompt_R: jax.Array  # int32 [R] longest prompt per round
  max_context_R: jax.Array  # int32 [R] largest prompt + output length of any call per round

  @property
  def generated(self):
    return self.generated_R.sum()

  @property
  def prefilled(self):
    return self.prefilled_R.sum()

  @property
  def max_context(self):
    return self.max_context_R.max()


def init_state(cfg: RSAConfig, key: jax.Array) -> RSAState:
  """An empty state before round 0."""
  zeros_R = jnp.zeros((cfg.rounds,), jnp.int32)
  return RSAState(
    key=key,
    rounds_done=jnp.zeros((), jnp.int32),
    pool_NG=jnp.full((cfg.n, cfg.pool_width), cfg.pad_id, jnp.int32),
    pool_len_N=jnp.zeros((cfg.n,), jnp.int32),
    tail_start_N=jnp.zeros((cfg.n,), jnp.int32),
    tail_end_N=jnp.zeros((cfg.n,), jnp.int32),
    finished_N=jnp.zeros((cfg.n,), bool),
    generated_R=zeros_R,
    prefilled_R=zeros_R,
    max_prompt_R=zeros_R,
    max_context_R=zeros_R,
  )


# ---------------------------------------------------------------------------------------------------------------
# Pure building blocks (all jittable, shapes static given the config).


def sample_subsets(key: jax.Array, n: int, c: int) -> jax.Array:
  """int32 [n, c]: row i is c distinct indices of range(n), a uniformly random ordered sample (as Python's
  `random.sample`); rows independent, so one candidate may appear in many rows or in none (spec P5).

  Each row sorts n random 32-bit keys, which is how `jax.random.permutation` shuffles small arrays (one sort
  round); drawing the [n, n] keys at once compiles ~3x faster than vmapping `permutation` over n split keys. Equal
  keys (probability < n^2 / 2^33 per row) keep index order, a bias far below any sampling error.
  """
  if c > n:
    raise ValueError(f"cannot draw c = {c} distinct candidates from n = {n}")
  bits_NN = jax.random.bits(key, (n, n), jnp.uint32)
  return jnp.argsort(bits_NN, axis=1, stable=True)[:, :c].astype(jnp.int32)


def reasoning_end(tokens_NM: jax.Array, len_N: jax.Array, marker: Sequence[int], last: bool = False) -> jax.Array:
  """int32 [N]: index of the first (`last`: the last) occurrence of the token sequence `marker` inside each row's
  first len tokens (the end of the reasoning), or len when absent (a trace cut at the budget is all reasoning)."""
  marker = tuple(marker)
  k, m_len = len(marker), tokens_NM.shape[1]
  if k == 0 or k > m_len:
    return len_N.astype(jnp.int32)
  starts = jnp.arange(m_len - k + 1, dtype=jnp.int32)
  hit_NS = starts[None, :] + k <= len_N[:, None]
  for j, tok in enumerate(marker):
    hit_NS = hit_NS & (tokens_NM[:, j : m_len - k + 1 + j] == tok)
  if last:
    found_N = (m_len - k - jnp.argmax(hit_NS[:, ::-1], axis=1)).astype(jnp.int32)
  else:
    found_N = jnp.argmax(hit_NS, axis=1).astype(jnp.int32)
  return jnp.where(hit_NS.any(axis=1), found_N, len_N).astype(jnp.int32)


def tail_span(tokens_NM: jax.Array, text_len_N: jax.Array, cfg: RSAConfig) -> tuple[jax.Array, jax.Array]:
  """(start_N, end_N): the part of each output a tail is cut from, by `cfg.tail_source` (see RSAConfig)."""
  zeros_N = jnp.zeros_like(text_len_N)
  if cfg.tail_source == "reasoning":
    return zeros_N, reasoning_end(tokens_NM, text_len_N, cfg.end_think)
  if cfg.tail_source == "pacore_hybrid":
    # An empty answer (the marker last) carries the reasoning before it, as the proxy falls back to the reasoning
    # when the content is empty; without a marker, marker_N == text_len_N: the whole text is reasoning.
    marker_N = reasoning_end(tokens_NM, text_len_N, cfg.end_think, last=True)
    answered_N = marker_N + len(cfg.end_think) < text_len_N
    start_N = jnp.where(answered_N, marker_N + len(cfg.end_think), 0).astype(jnp.int32)
    return start_N, jnp.where(answered_N, text_len_N, marker_N).astype(jnp.int32)
  return zeros_N, text_len_N


def extract_tails(pool_NG: jax.Array, end_N: jax.Array, tau: int, pad_id: int = 0,
                  floor_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The last τ tokens before end_N of each row, starting no earlier than floor_N (default 0), left-aligned:
  (tails_NT int32 [N, τ], tail_len_N = min(end - floor, τ)). Slots past a tail's length hold pad_id."""
  start_N = jnp.maximum(end_N - tau, 0 if floor_N is None else floor_N)
  idx_NT = start_N[:, None] + jnp.arange(tau, dtype=jnp.int32)[None, :]
  valid_NT = idx_NT < end_N[:, None]
  gathered = jnp.take_along_axis(pool_NG, jnp.clip(idx_NT, 0, pool_NG.shape[1] - 1), axis=1)
  return jnp.where(valid_NT, gathered, pad_id).astype(jnp.int32), (end_N - start_N).astype(jnp.int32)


def _splice(parts, capacity: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Concatenates parts (a tuple of ids = fixed piece, or (padded array, length) = variable piece) into a
  right-padded [capacity] buffer: one gather from the parts laid end to end. Output position p belongs to the
  first part whose running end exceeds p; it reads that part at p - (the part's running start). No index is
  clamped as long as capacity >= the sum of the parts' static widths (prompt_capacity guarantees it). A gather
  rather than sequential dynamic_update_slices: under vmap those become scatters, and compile several times slower.
  """
  sources, lengths = [], []
  for part in parts:
    if isinstance(part, tuple) and (not part or _is_int(part[0])):
      sources.append(np.asarray(part, np.int32).reshape(-1))
      lengths.append(jnp.asarray(len(part), jnp.int32))
    else:
      ids, length = part
      sources.append(ids.astype(jnp.int32))
      lengths.append(jnp.asarray(length, jnp.int32))
  widths = [int(src.shape[0]) for src in sources]
  if sum(widths) > capacity:
    raise ValueError(f"prompt pieces need {sum(widths)} slots, more than the capacity {capacity}")
  base_S = jnp.asarray(np.cumsum([0, *widths[:-1]]), jnp.int32)  # where each part starts in `flat`
  flat = jnp.concatenate([jnp.asarray(src) for src in sources])
  end_S = jnp.cumsum(jnp.stack(lengths))
  start_S = end_S - jnp.stack(lengths)
  pos_P = jnp.arange(capacity, dtype=jnp.int32)
  part_P = jnp.sum(pos_P[:, None] >= end_S[None, :], axis=1)
  inside_P = part_P < len(sources)
  part_P = jnp.minimum(part_P, len(sources) - 1)
  out_P = flat[base_S[part_P] + pos_P - start_S[part_P]]
  return jnp.where(inside_P, out_P, pad_id).astype(jnp.int32), end_S[-1]


def build_initial_prompt(pieces: PromptPieces, q_Q, q_len, capacity: int, pad_id: int = 0):
  """Round-0 prompt: (int32 [capacity], length)."""
  return _splice((pieces.initial[0], (q_Q, q_len), pieces.initial[1]), capacity, pad_id)


def build_aggregation_prompt(pieces: PromptPieces, q_Q, q_len, tails_CT, tail_len_C, capacity: int, pad_id: int = 0):
  """Aggregation prompt for one trace: (int32 [capacity], length); capacity >= template + Q + C·T."""
  parts = [pieces.prefix, (q_Q, q_len)]
  for i, head in enumerate(pieces.heads):
    parts += [head, (tails_CT[i], tail_len_C[i])]
  parts.append(pieces.suffix)
  return _splice(tuple(parts), capacity, pad_id)


def _round_keys(state: RSAState, r):
  k_sub, k_dec = jax.random.split(jax.random.fold_in(state.key, r))
  return k_sub, k_dec


def prepare_initial(cfg: RSAConfig, pieces: PromptPieces, state: RSAState, q_Q, q_len):
  """Round 0's decode inputs: (k_dec, prompts_NL, prompt_len_N) — N copies of the templated question."""
  _, k_dec = _round_keys(state, state.rounds_done)
  prompt_L, length = build_initial_prompt(pieces, q_Q, q_len, prompt_capacity(cfg, pieces), cfg.pad_id)
  return k_dec, jnp.broadcast_to(prompt_L, (cfg.n, prompt_L.shape[0])), jnp.full((cfg.n,), length, jnp.int32)


def candidate_subsets(cfg: RSAConfig, k_sub: jax.Array) -> jax.Array:
  """int32 [N, C]: the previous-round traces each new trace aggregates (identity for C = 1 self-continuation)."""
  if cfg.c == 1 and cfg.self_continue:
    return jnp.arange(cfg.n, dtype=jnp.int32)[:, None]
  return sample_subsets(k_sub, cfg.n, cfg.c)


def prepare_aggregation(cfg: RSAConfig, pieces: PromptPieces, state: RSAState, q_Q, q_len):
  """An aggregation round's decode inputs (k_dec, prompts_NL, prompt_len_N) from the current pool only."""
  k_sub, k_dec = _round_keys(state, state.rounds_done)
  tails_NT, tail_len_N = extract_tails(state.pool_NG, state.tail_end_N, cfg.tau, cfg.pad_id, state.tail_start_N)
  subsets_NC = candidate_subsets(cfg, k_sub)
  build = functools.partial(build_aggregation_prompt, pieces, capacity=prompt_capacity(cfg, pieces), pad_id=cfg.pad_id)
  prompts_NL, prompt_len_N = jax.vmap(lambda t, tl: build(q_Q, q_len, t, tl))(
    tails_NT[subsets_NC], tail_len_N[subsets_NC]
  )
  return k_dec, prompts_NL, prompt_len_N


def frozen_rows(cfg: RSAConfig, state: RSAState) -> jax.Array:
  """bool [N]: the traces an aggregation round keeps as they are: with `keep_finished` (true Delethink), those already
  finished; none otherwise."""
  if cfg.keep_finished:
    return state.finished_N
  return jnp.zeros((cfg.n,), bool)


def ends_in_stop(tokens_NM: jax.Array, len_N: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
  """bool [N]: whether each row's last token (of its first len) is one of stop_ids."""
  if not stop_ids:
    return jnp.zeros(len_N.shape, bool)
  last_N = jnp.take_along_axis(tokens_NM, jnp.maximum(len_N - 1, 0)[:, None], axis=1)[:, 0]
  return (len_N > 0) & jnp.isin(last_N, jnp.asarray(stop_ids, jnp.int32))


def absorb(cfg: RSAConfig, state: RSAState, prompt_len_N, tokens_NM, len_N, max_new: int,
           frozen_N: jax.Array | None = None) -> RSAState:
  """The state after a round whose prompts had prompt_len_N tokens and whose decoder, asked for max_new tokens,
  returned (tokens_NM, len_N). Rows where frozen_N is True keep their previous trace; their decode is discarded
  and counted nowhere."""
  shape, len_shape = tuple(getattr(tokens_NM, "shape", ())), tuple(getattr(len_N, "shape", ()))
  if shape != (cfg.n, max_new) or len_shape != (cfg.n,):
    raise ValueError(
      f"decode_fn must return (tokens [N, max_new], lengths [N]) with N = RSAConfig.n = {cfg.n} and "
      f"max_new = {max_new}, got shapes {shape} and {len_shape}"
    )
  if max_new > cfg.pool_width:
    raise ValueError(f"max_new = {max_new} is more than the pool width {cfg.pool_width} (the largest round budget)")
  m = max_new
  len_N = jnp.clip(len_N.astype(jnp.int32), 0, m)
  tokens_NM = jnp.where(jnp.arange(m)[None, :] < len_N[:, None], tokens_NM.astype(jnp.int32), cfg.pad_id)
  pool_NG = jnp.pad(tokens_NM, ((0, 0), (0, cfg.pool_width - m)), constant_values=cfg.pad_id)
  stopped_N = ends_in_stop(tokens_NM, len_N, cfg.stop_ids)
  text_len_N = len_N - stopped_N.astype(jnp.int32)  # a final stop token is no part of the text: tails end before it
  tail_start_N, tail_end_N = tail_span(tokens_NM, text_len_N, cfg)
  finished_N = stopped_N | (len_N < m)
  prompt_len_N = prompt_len_N.astype(jnp.int32)
  frozen_N = jnp.zeros((cfg.n,), bool) if frozen_N is None else frozen_N
  r = state.rounds_done
  new_len_N = jnp.where(frozen_N, 0, len_N)
  new_prompt_N = jnp.where(frozen_N, 0, prompt_len_N)
  return RSAState(
    key=state.key,
    rounds_done=r + 1,
    pool_NG=jnp.where(frozen_N[:, None], state.pool_NG, pool_NG),
    pool_len_N=jnp.where(frozen_N, state.pool_len_N, len_N),
    tail_start_N=jnp.where(frozen_N, state.tail_start_N, tail_start_N),
    tail_end_N=jnp.where(frozen_N, state.tail_end_N, tail_end_N),
    finished_N=finished_N | frozen_N,
    generated_R=state.generated_R.at[r].set(new_len_N.sum()),
    prefilled_R=state.prefilled_R.at[r].set(new_prompt_N.sum()),
    max_prompt_R=state.max_prompt_R.at[r].set(new_prompt_N.max()),
    max_context_R=state.max_context_R.at[r].set((new_prompt_N + new_len_N).max()),
  )


def initial_round(cfg, pieces, decode_fn: DecodeFn, state: RSAState, q_Q, q_len, max_new: int) -> RSAState:
  k_dec, prompts_NL, prompt_len_N = prepare_initial(cfg, pieces, state, q_Q, q_len)
  tokens_NM, len_N = decode_fn(k_dec, prompts_NL, prompt_len_N, max_new)
  return absorb(cfg, state, prompt_len_N, tokens_NM, len_N, max_new)


def aggregation_round(cfg, pieces, decode_fn: DecodeFn, state: RSAState, q_Q, q_len, max_new: int) -> RSAState:
  """One Markovian round: tails of the current pool -> subsets -> prompts -> decode -> the new pool."""
  k_dec, prompts_NL, prompt_len_N = prepare_aggregation(cfg, pieces, state, q_Q, q_len)
  frozen_N = frozen_rows(cfg, state)
  tokens_NM, len_N = decode_fn(k_dec, prompts_NL, skip_frozen(decode_fn, prompt_len_N, frozen_N), max_new)
  return absorb(cfg, state, prompt_len_N, tokens_NM, len_N, max_new, frozen_N)


def skip_frozen(decode_fn: DecodeFn, prompt_len_N, frozen_N):
  """The prompt lengths handed to decode_fn: 0 for frozen rows (whose decode is discarded) when decode_fn declares
  `skips_empty_prompts` (make_decode_fn's does: such rows generate nothing and never keep its loop going); else
  unchanged, so that other decoders never see an empty prompt."""
  if getattr(decode_fn, "skips_empty_prompts", False):
    return jnp.where(frozen_N, 0, prompt_len_N)
  return prompt_len_N


def state_from_population(cfg: RSAConfig, key: jax.Array, tokens_NM, len_N, rounds_done: int = 1) -> RSAState:
  """A state whose pool is a given population, as if round rounds_done - 1 had produced it: aggregate external
  rollouts (e.g. to build round-1 training prompts) or test one round on a fixed population."""
  tokens_NM, len_N = jnp.asarray(tokens_NM, jnp.int32), jnp.asarray(len_N, jnp.int32)
  if not 1 <= rounds_done <= cfg.t:
    raise ValueError(f"rounds_done = {rounds_done} must be in [1, RSAConfig.t = {cfg.t}] so a round remains")
  state = init_state(cfg, key)._replace(rounds_done=jnp.asarray(rounds_done - 1, jnp.int32))
  return absorb(cfg, state, jnp.zeros((cfg.n,), jnp.int32), tokens_NM, len_N, tokens_NM.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Drivers.


def _static(cfg: RSAConfig) -> RSAConfig:
  return dataclasses.replace(cfg, seed=0)  # the seed is data: changing it must not recompile


def _question(cfg: RSAConfig, pieces: PromptPieces, question) -> tuple[jax.Array, jax.Array]:
  """Validates on the host (before any jit) and pads the question ids to q_max."""
  check_pieces(cfg, pieces)
  q = np.asarray(question)
  if q.ndim != 1 or q.size == 0 or not np.issubdtype(q.dtype, np.integer):
    raise ValueError(f"question must be a non-empty 1-D sequence of token ids, got shape {q.shape} dtype {q.dtype}")
  if (q < 0).any():
    raise ValueError(f"question token ids must be >= 0, got min {q.min()}")
  if q.size > cfg.q_max:
    raise ValueError(
      f"question has {q.size} tokens, more than RSAConfig.q_max = {cfg.q_max}; raise q_max "
      f"(prompt capacity becomes template + q_max + c·tau)"
    )
  padded = np.full((cfg.q_max,), cfg.pad_id, np.int32)
  padded[: q.size] = q
  return jnp.asarray(padded), jnp.asarray(q.size, jnp.int32)


def _key(cfg: RSAConfig, key):
  return jax.random.key(cfg.seed) if key is None else key


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run_jit(cfg, pieces, decode_fn, final_decode_fn, key, q_Q, q_len):
  state = init_state(cfg, key)
  first = final_decode_fn if cfg.t == 0 else decode_fn
  state = initial_round(cfg, pieces, first, state, q_Q, q_len, cfg.budget(0))
  # The last round differs only in budget and decoder; when neither differs it joins the scan (one body to compile).
  separate_final = cfg.final_budget != cfg.beta or final_decode_fn is not decode_fn
  scanned = cfg.t - 1 if separate_final else cfg.t
  if scanned > 0:
    body = lambda s, _: (aggregation_round(cfg, pieces, decode_fn, s, q_Q, q_len, cfg.beta), None)
    state, _ = jax.lax.scan(body, state, None, length=scanned)
  if cfg.t > 0 and separate_final:
    state = aggregation_round(cfg, pieces, final_decode_fn, state, q_Q, q_len, cfg.final_budget)
  return state


def run(
  cfg: RSAConfig,
  pieces: PromptPieces,
  decode_fn: DecodeFn,
  question: Sequence[int],
  key: jax.Array | None = None,
  final_decode_fn: DecodeFn | None = None,
) -> RSAState:
  """The whole run in one jit: round 0, `lax.scan` over rounds 1..t-1, the final round. decode_fn (and
  final_decode_fn, default decode_fn) must be traceable; keep them the same objects across calls to reuse the
  compiled program. Inputs are validated here, before tracing."""
  q_Q, q_len = _question(cfg, pieces, question)
  return _run_jit(_static(cfg), pieces, decode_fn, final_decode_fn or decode_fn, _key(cfg, key), q_Q, q_len)


_prepare_initial_jit = jax.jit(prepare_initial, static_argnums=(0, 1))
_prepare_aggregation_jit = jax.jit(prepare_aggregation, static_argnums=(0, 1))
_absorb_jit = jax.jit(absorb, static_argnums=(0, 5))


def run_loop(
  cfg: RSAConfig,
  pieces: PromptPieces,
  decode_fn: DecodeFn,
  question: Sequence[int],
  key: jax.Array | None = None,
  final_decode_fn: DecodeFn | None = None,
  on_round: Callable[[int, RSAState], None] | None = None,
) -> RSAState:
  """The same run as `run`, rounds looped on the host: prompt building and state updates are jitted, decode_fn is
  called on the host with concrete arrays (it may be any function, jitted or not). on_round(r, state) sees the
  state after every round (e.g. to detokenise and log answers). Same key -> the same state as `run`."""
  q_Q, q_len = _question(cfg, pieces, question)
  static, state = _static(cfg), init_state(cfg, _key(cfg, key))
  final_decode_fn = final_decode_fn or decode_fn
  for r in range(cfg.rounds):
    prepare = _prepare_initial_jit if r == 0 else _prepare_aggregation_jit
    k_dec, prompts_NL, prompt_len_N = prepare(static, pieces, state, q_Q, q_len)
    fn = final_decode_fn if r == cfg.t else decode_fn
    # Round 0 freezes nothing (no trace has finished yet); passing the array there too keeps one absorb program
    # per budget, where None would compile a second one.
    frozen_N = frozen_rows(static, state)
    tokens_NM, len_N = fn(k_dec, prompts_NL, skip_frozen(fn, prompt_len_N, frozen_N), cfg.budget(r))
    state = _absorb_jit(static, state, prompt_len_N, jnp.asarray(tokens_NM), jnp.asarray(len_N), cfg.budget(r),
                        frozen_N)
    if on_round is not None:
      on_round(r, state)
  return state


def pool_sequences(state: RSAState) -> list[list[int]]:
  """The current population as host lists of token ids (each row cut at its length), for detokenising. With
  continuation pieces a row is its trace's newest chunk (`rsa_eval.solve_problem` joins the chunks)."""
  pool, lens = np.asarray(state.pool_NG), np.asarray(state.pool_len_N)
  return [pool[i, : lens[i]].tolist() for i in range(pool.shape[0])]
