"""The synthetic task: chains of single-digit operations modulo 10, solved left to right with a chain of thought.

  question   "7+5*3-4"                       start digit, then (operator, digit) pairs, evaluated left to right
  solution   "..2*3-4\n......6-4\n........2\n\\boxed{2}" (after "Q:7+5*3-4\nA:")

The chain of thought rewrites the expression after each step, the leftmost operation replaced by its result (mod 10)
and the used characters by dots, so every line (the "Q:" and "A:" lines included) has the same width: the operands
a step needs sit exactly one line above, at a fixed distance. That makes the task learnable in minutes by a
two-layer model with relative (RoPE) positions, while sampling still makes slips on the way: room for majority
voting and aggregation to help. Answers are checked with `zaya_jax.infer.answers` (\boxed extraction).

Documents (one training example each; char-level tokens, so characters are tokens and τ counts either):
  plain        "Q:" + question + "\\nA:" + solution
  aggregation  "Agg Q:" + question + "\\n#1:" + tail_1 + ... + "\\n#C:" + tail_C + "\\nA:" + solution

An aggregation example follows the ZAYA1 SFT recipe (MARKOVIAN_RSA.md §3.3) with a perfect teacher: C candidate
solutions of the problem, each wrong with a probability drawn per example (an arithmetic slip at one step, carried
forward as a model's own error would be), reduced to their last τ characters (Markovian RSA) or kept whole (RSA);
the target is the correct solution. The evaluation builds exactly these prompts on device from `prompt_pieces`.

Everything is a pure function of a seed (`random.Random`, stable across Python versions and platforms).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence

from zaya_jax.infer import answers
from zaya_jax.infer.rsa import PromptPieces

OPS = "+-*"
QUESTION_PREFIX = "Q:"
ANSWER_MARK = "\nA:"
AGG_PREFIX = "Agg Q:"
DOC_SEPARATOR = "\n\u241e\n"  # between documents in a corpus file (DataConfig.doc_separator); never in a document


def candidate_head(i: int) -> str:
  """The piece before candidate i (0-based): a line of its own, numbered from 1."""
  return f"\n#{i + 1}:"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  min_ops: int = 5  # operations per question, drawn uniformly in [min_ops, max_ops] (equal: one line width)
  max_ops: int = 5
  modulus: int = 10
  c: int = 4  # candidates per aggregation example (RSAConfig.c at evaluation)
  tau: int = 24  # characters (= tokens) of a Markovian tail
  whole_fraction: float = 0.5  # aggregation examples whose candidates are whole solutions (RSA's τ = β)
  p_wrong: tuple[float, float] = (0.0, 1.0)  # per example, each candidate is wrong with p ~ U(p_wrong)

  def __post_init__(self):
    if not 1 <= self.min_ops <= self.max_ops:
      raise ValueError(f"TaskConfig: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
    if not 2 <= self.modulus <= 10:
      raise ValueError(f"TaskConfig.modulus: single digits only (2..10), got {self.modulus}")
    if self.c < 1 or self.tau < 1:
      raise ValueError(f"TaskConfig: c and tau must be >= 1, got {self.c}, {self.tau}")
    if not 0.0 <= self.whole_fraction <= 1.0:
      raise ValueError(f"TaskConfig.whole_fraction: must be in [0, 1], got {self.whole_fraction}")
    lo, hi = self.p_wrong
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"TaskConfig.p_wrong: need 0 <= lo <= hi <= 1, got {self.p_wrong}")

  @property
  def max_solution_chars(self) -> int:
    """Longest correct solution: k lines of the question's width, newlines, and "\\boxed{d}"."""
    k = self.max_ops
    return (2 * k + 1) + (k - 1) * (2 * k + 4) + 1 + len(boxed("0"))

  @property
  def max_question_chars(self) -> int:
    return 1 + 2 * self.max_ops


@dataclasses.dataclass(frozen=True)
class Problem:
  start: int
  ops: tuple[tuple[str, int], ...]  # (operator, operand digit)
  modulus: int = 10

  @property
  def question(self) -> str:
    return str(self.start) + "".join(f"{op}{d}" for op, d in self.ops)

  def values(self) -> list[int]:
    """The running value after each step (correct arithmetic)."""
    out, v = [], self.start
    for op, d in self.ops:
      v = apply(op, v, d, self.modulus)
      out.append(v)
    return out

  @property
  def answer(self) -> str:
    return str(self.values()[-1])


def apply(op: str, a: int, b: int, modulus: int) -> int:
  if op == "+":
    return (a + b) % modulus
  if op == "-":
    return (a - b) % modulus
  if op == "*":
    return (a * b) % modulus
  raise ValueError(f"unknown operator {op!r}")


def boxed(answer: str) -> str:
  return "\\boxed{" + answer + "}"


def make_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
  k = rng.randint(cfg.min_ops, cfg.max_ops)
  # Operands 1..m-1: a 0 operand would make "*0" collapse every chain to the same answer.
  ops = tuple((rng.choice(OPS), rng.randint(1, cfg.modulus - 1)) for _ in range(k))
  return Problem(rng.randint(0, cfg.modulus - 1), ops, cfg.modulus)


def problems(seed: int, count: int, cfg: TaskConfig, exclude: Iterable[str] = ()) -> list[Problem]:
  """`count` problems from `seed`, distinct questions, none in `exclude` (keeps evaluation questions out of
  training)."""
  rng, seen, out = random.Random(seed), set(exclude), []
  tries = 0
  while len(out) < count:
    tries += 1
    if tries > 100 * count + 1000:
      raise ValueError(f"cannot draw {count} distinct problems with {cfg}: the question space is too small")
    p = make_problem(rng, cfg)
    if p.question not in seen:
      seen.add(p.question)
      out.append(p)
  return out


def solution(problem: Problem, slip: tuple[int, int] | None = None) -> str:
  """The chain of thought and boxed answer. slip=(step, wrong value): that step writes a wrong result and every
  later step computes on from it (a wrong answer unless the operations happen to absorb the error)."""
  lines, v = [], problem.start
  for i, (op, d) in enumerate(problem.ops):
    v = apply(op, v, d, problem.modulus)
    if slip is not None and slip[0] == i:
      v = slip[1]
    rest = "".join(f"{o}{x}" for o, x in problem.ops[i + 1:])
    # The first line follows "A:" (two characters); the others start with two dots in their place.
    lines.append(("" if i == 0 else "..") + "." * (2 * i + 2) + str(v) + rest)
  return "\n".join(lines) + "\n" + boxed(str(v))


def wrong_solution(rng: random.Random, problem: Problem) -> str:
  """A solution with one slip at a random step (its result replaced by another digit)."""
  step = rng.randrange(len(problem.ops))
  right = problem.values()[step]
  wrong = rng.choice([d for d in range(problem.modulus) if d != right])
  return solution(problem, (step, wrong))


def is_correct(text: str, problem: Problem) -> bool:
  """Whether the last \\boxed{} of `text` is the problem's answer."""
  return answers.is_equiv(answers.extract_boxed(text), problem.answer)


def plain_prompt(question: str) -> str:
  return QUESTION_PREFIX + question + ANSWER_MARK


def plain_document(problem: Problem) -> str:
  return plain_prompt(problem.question) + solution(problem)


def aggregation_prompt(question: str, tails: Sequence[str]) -> str:
  """The aggregation prompt text; `prompt_pieces` splices the same characters on device."""
  return AGG_PREFIX + question + "".join(candidate_head(i) + t for i, t in enumerate(tails)) + ANSWER_MARK


def tail(text: str, tau: int | None) -> str:
  """The last τ characters (None: all), as Markovian RSA keeps the last τ tokens of a trace."""
  return text if tau is None or len(text) <= tau else text[-tau:]


@dataclasses.dataclass(frozen=True)
class AggregationExample:
  problem: Problem
  candidates: tuple[str, ...]  # whole candidate solutions
  wrong: tuple[bool, ...]  # whether each candidate's answer is wrong
  tau: int | None  # tail length in characters, None = whole candidates (RSA)

  @property
  def tails(self) -> tuple[str, ...]:
    return tuple(tail(c, self.tau) for c in self.candidates)

  @property
  def prompt(self) -> str:
    return aggregation_prompt(self.problem.question, self.tails)

  @property
  def target(self) -> str:
    """The corrected solution: the problem's correct solution whatever the candidates say (a perfect teacher)."""
    return solution(self.problem)

  @property
  def document(self) -> str:
    return self.prompt + self.target


def aggregation_example(rng: random.Random, problem: Problem, cfg: TaskConfig) -> AggregationExample:
  p = rng.uniform(*cfg.p_wrong)
  candidates = tuple(wrong_solution(rng, problem) if rng.random() < p else solution(problem) for _ in range(cfg.c))
  wrong = tuple(not is_correct(c, problem) for c in candidates)
  tau = None if rng.random() < cfg.whole_fraction else cfg.tau
  return AggregationExample(problem, candidates, wrong, tau)


def training_documents(seed: int, count: int, cfg: TaskConfig, aggregation_fraction: float,
                       exclude: Iterable[str] = ()) -> list[str]:
  """`count` documents: plain solutions, and a fraction `aggregation_fraction` of aggregation examples (of
  problems of their own). Deterministic in the seed; no question in `exclude`."""
  if not 0.0 <= aggregation_fraction <= 1.0:
    raise ValueError(f"aggregation_fraction must be in [0, 1], got {aggregation_fraction}")
  rng = random.Random(seed)
  docs = []
  for problem in problems(rng.randrange(2**31), count, cfg, exclude):
    if rng.random() < aggregation_fraction:
      docs.append(aggregation_example(rng, problem, cfg).document)
    else:
      docs.append(plain_document(problem))
  return docs


def write_corpus(path: str, docs: Sequence[str]) -> None:
  """One file, documents joined by DOC_SEPARATOR (data.make_data splits it back with doc_separator)."""
  if any(DOC_SEPARATOR in d for d in docs):
    raise ValueError("a document contains the document separator")
  with open(path, "w", encoding="utf-8") as f:
    f.write(DOC_SEPARATOR.join(docs))


def prompt_pieces(encode: Callable[[str], Sequence[int]], c: int) -> PromptPieces:
  """The token pieces of the round-0 and aggregation prompts for `rsa` (built by hand: the formats are fixed strings;
  with a character-level tokenizer every piece boundary is a token boundary, which tests check)."""
  enc = lambda s: tuple(int(i) for i in encode(s))
  return PromptPieces(initial=(enc(QUESTION_PREFIX), enc(ANSWER_MARK)), prefix=enc(AGG_PREFIX),
                      heads=tuple(enc(candidate_head(i)) for i in range(c)), suffix=enc(ANSWER_MARK))
