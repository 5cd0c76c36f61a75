"""Markovian RSA over a file of problems, as launch/rsa.py runs it: one problem solved and scored, its report, the
summary.

    cfg = rsa_config(n=16, c=4, t=2, tau=4096, beta=8192, ...)        # flag names in its errors
    report, texts = solve_problem(cfg, pieces, decode_fn, tokenizer, problem, key, stop_ids)
    summary = summarize([report])        # mean correct over final candidates, majority@N, pass@N, tokens per problem

`TEMPLATES` are the aggregation prompt templates --template chooses from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from zaya_jax.infer import answers as ans
from zaya_jax.infer import prompts as P
from zaya_jax.infer import rsa
from zaya_jax.infer.cli import decoded_text, stop_if_terminated
from zaya_jax.infer.cli_files import CLIError, Problem
from zaya_jax.tokenizer import Tokenizer

TEMPLATES: dict[str, P.AggregationTemplate] = {
  t.name: t for t in (P.RSA_REFERENCE, P.RSA_HARNESS, P.MARKOVIAN_ZAYA, P.PACORE_ZAYA, P.DELETHINK)
}


def rsa_config(*, n: int, c: int, t: int, tau: int, beta: int, beta_final: int | None, tail_source: str,
               end_think: Sequence[int], q_max: int, max_context: int, pad_id: int, seed: int,
               stop_ids: Sequence[int] = (), beta_first: int | None = None, keep_finished: bool = False
               ) -> rsa.RSAConfig:
  """RSAConfig from the flags; its validation message (C > N, τ > β, ...) with the flag names."""
  try:
    return rsa.RSAConfig(n=n, c=c, t=t, tau=tau, beta=beta, beta_final=beta_final, beta_first=beta_first,
                         tail_source=tail_source, keep_finished=keep_finished,
                         end_think=tuple(end_think), stop_ids=tuple(stop_ids), q_max=q_max, max_context=max_context,
                         pad_id=pad_id, seed=seed)
  except ValueError as e:
    raise CLIError(str(e).replace("RSAConfig.", "--")) from None


def check_rsa_context(cfg: rsa.RSAConfig, pieces: rsa.PromptPieces, context: int, longest_question: int) -> None:
  """Every decode call's prompt capacity + budget must fit the model's context: named in flags, not in fields."""
  bound = rsa.context_bound(cfg, pieces)
  if bound > context:
    prompt = (f"template {pieces.template_len} + question {cfg.q_max} (longest {longest_question} tokens) + --c × "
              f"--tau = {cfg.c} × {cfg.tau}" if cfg.t else
              f"round-0 template {pieces.initial_len} + question {cfg.q_max} (longest {longest_question} tokens)")
    raise CLIError(
      f"the RSA prompts do not fit the model's context of {context} (max_position_embeddings): {prompt} + "
      f"the largest budget (of --beta_first, --beta, --beta_final) {cfg.pool_width} makes {bound}; lower "
      + ("--tau, --c or the budgets" if cfg.t else "--beta or --beta_final"))


def _scores(answers: Sequence[str | None], majority: str | None, reference: str | None) -> dict:
  """correct (per candidate), mean_correct, majority_correct and pass against `reference`; all None without one."""
  if reference is None:
    return dict.fromkeys(("correct", "mean_correct", "majority_correct", "pass"))
  correct = tuple(bool(ans.is_equiv(a, reference)) for a in answers)
  return {"correct": correct, "mean_correct": sum(correct) / len(correct),
          "majority_correct": bool(ans.is_equiv(majority, reference)), "pass": any(correct)}


@dataclass(frozen=True)
class RoundReport:
  """One round's population, scored as the final one is (the RSA authors log these per loop): whether aggregation
  helps, and how fast the population agrees, show round by round."""

  answers: tuple[str | None, ...]  # in candidate order
  majority: str | None
  votes: int
  entropy: float  # of the normalised answers, missing ones as one class (answers.answer_entropy), nats
  generated: int  # new tokens this round
  prefilled: int  # prompt tokens this round
  max_context: int  # largest prompt + output of this round's calls

  def scores(self, reference: str | None) -> dict:
    """mean_correct, majority_correct and pass of this round against `reference` (None without one)."""
    scores = _scores(self.answers, self.majority, reference)
    del scores["correct"]  # a round's line stays short: its answers are there
    return scores

  def to_json(self, reference: str | None) -> dict:
    return {**dataclasses.asdict(self), **self.scores(reference)}

  @classmethod
  def from_json(cls, row: dict) -> RoundReport:
    fields = {f.name: row[f.name] for f in dataclasses.fields(cls)}
    return cls(**{**fields, "answers": tuple(fields["answers"])})


def score_round(texts: Sequence[str], finished: Sequence[bool], generated: int, prefilled: int, max_context: int,
                answer_after: str | None = None) -> RoundReport:
  """Answers (last \\boxed{} of each candidate's `answer_section`), their vote and entropy, and the round's tokens."""
  answers = tuple(ans.extract_boxed(answer_section(t, answer_after)) for t in texts)
  vote = ans.majority_vote(answers, finished)
  return RoundReport(answers, None if vote is None else vote.answer, 0 if vote is None else vote.count,
                     float(ans.answer_entropy(answers)), int(generated), int(prefilled), int(max_context))


@dataclass(frozen=True)
class ProblemReport:
  index: int
  problem: str
  reference: str | None
  answers: tuple[str | None, ...]  # extracted from the final population, in candidate order
  finished: tuple[bool, ...]  # the candidate stopped before its budget
  majority: str | None  # the normalised plurality answer (None: no candidate answered)
  votes: int
  generated: int  # newly decoded tokens over all rounds: D(q)
  prefilled: int  # prompt tokens sent over all rounds
  max_context: int  # largest prompt + output of any decode call
  rounds: tuple[RoundReport, ...] = ()  # every round's population, round 0 first (the last one is the final)

  @functools.cached_property
  def _scored(self) -> dict:  # once per report: each property below read it again (every answer's is_equiv)
    return _scores(self.answers, self.majority, self.reference)

  @property
  def correct(self) -> tuple[bool, ...] | None:
    return self._scored["correct"]

  @property
  def mean_correct(self) -> float | None:
    return self._scored["mean_correct"]

  @property
  def majority_correct(self) -> bool | None:
    return self._scored["majority_correct"]

  @property
  def passed(self) -> bool | None:
    return self._scored["pass"]

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "correct": self.correct, "mean_correct": self.mean_correct,
            "majority_correct": self.majority_correct, "pass": self.passed,
            "rounds": [r.to_json(self.reference) for r in self.rounds]}

  @classmethod
  def from_json(cls, row: dict) -> ProblemReport:
    """Inverse of to_json (its derived fields are recomputed): a report read back from a partial --output."""
    fields = {f.name: row[f.name] for f in dataclasses.fields(cls)}
    return cls(**{**fields, "answers": tuple(fields["answers"]), "finished": tuple(fields["finished"]),
                  "rounds": tuple(RoundReport.from_json(r) for r in fields["rounds"])})


def answer_section(text: str, after: str | None) -> str:
  """The part of a candidate scored for its answer: the whole text, or with `after` (the end-of-thinking marker) only
  what follows its last occurrence, empty without one (Delethink's rule: a trace cut inside its reasoning has no
  answer, however many tentative boxes it wrote)."""
  if after is None:
    return text
  _, marker, tail = text.rpartition(after)
  return tail if marker else ""


def report_problem(problem: Problem, texts: Sequence[str], finished: Sequence[bool], generated: int, prefilled: int,
                   max_context: int, answer_after: str | None = None, rounds: Sequence[RoundReport] = ()
                   ) -> ProblemReport:
  """Answers (last \\boxed{} of each candidate's `answer_section`), the vote and the accounting of one problem's final
  population; `rounds` the per-round reports."""
  final = score_round(texts, finished, generated, prefilled, max_context, answer_after)
  return ProblemReport(problem.index, problem.problem, problem.answer, final.answers, tuple(bool(f) for f in finished),
                       final.majority, final.votes, int(generated), int(prefilled), int(max_context), tuple(rounds))


def solve_problem(cfg: rsa.RSAConfig, pieces: rsa.PromptPieces, decode_fn: rsa.DecodeFn, tokenizer: Tokenizer,
                  problem: Problem, key: jax.Array, stop_ids: Sequence[int],
                  on_round: Callable[[int, RoundReport], None] | None = None, answer_after: str | None = None,
                  final_decode_fn: rsa.DecodeFn | None = None) -> tuple[ProblemReport, list[str]]:
  """Markovian RSA on one problem (host loop over rounds); (report, final texts). Every round's population is
  scored (`RoundReport`, passed to on_round as it finishes). `answer_after`: score only the text after this marker
  (see `answer_section`). `final_decode_fn`: the last round's decoder (its own sampling), default decode_fn."""
  question = P.encode_question(tokenizer.hf, problem.problem)
  rounds, texts = [], []
  traces = [[] for _ in range(cfg.n)]  # continuation pieces: each row's chunks so far, joined
  finished_N = np.zeros(cfg.n, bool)  # before the round being recorded

  def record(r: int, state: rsa.RSAState) -> None:
    sequences = rsa.pool_sequences(state)
    if pieces.continuation:
      # Delethink scores the whole trace, every chunk joined (spec §2.1): an answer that an earlier chunk wrote, or
      # that straddles a boundary, is the trace's. A row kept as it was this round (finished, keep_finished) adds
      # nothing; a finished chunk that is continued loses its stop token, which is no text.
      kept_N = finished_N & cfg.keep_finished
      for trace, chunk, kept in zip(traces, sequences, kept_N, strict=True):
        if kept:
          continue
        if trace and trace[-1] in stop_ids:
          trace.pop()
        trace.extend(chunk)
      finished_N[:] = np.asarray(state.finished_N)
      sequences = traces
    texts[:] = [decoded_text(tokenizer, seq, stop_ids)[0] for seq in sequences]
    rounds.append(score_round(texts, np.asarray(state.finished_N).tolist(), int(state.generated_R[r]),
                              int(state.prefilled_R[r]), int(state.max_context_R[r]), answer_after))
    if on_round is not None:
      on_round(r, rounds[-1])
    stop_if_terminated()

  state = rsa.run_loop(cfg, pieces, decode_fn, question, key=key, on_round=record, final_decode_fn=final_decode_fn)
  report = report_problem(problem, texts, np.asarray(state.finished_N).tolist(), int(state.generated),
                          int(state.prefilled), int(state.max_context), answer_after, rounds)
  return report, texts


def summarize(reports: Sequence[ProblemReport]) -> dict:
  """Means over problems: correctness over final candidates (the report's metric), majority@N and pass@N over the
  problems with a reference; tokens over all problems. `by_round`: the same per round (round 0 first), when every
  report has the same number of rounds."""
  scored = [r for r in reports if r.reference is not None]
  k = len(scored)

  def mean(values):
    return sum(values) / k if k else None

  count = max(len(reports), 1)
  summary = {
    "summary": True,
    "problems": len(reports),
    "scored": k,
    "n": len(reports[0].answers) if reports else 0,
    "mean_correct": mean([r.mean_correct for r in scored]),
    "majority_at_n": mean([float(r.majority_correct) for r in scored]),
    "pass_at_n": mean([float(r.passed) for r in scored]),
    "generated_per_problem": sum(r.generated for r in reports) / count,
    "prefilled_per_problem": sum(r.prefilled for r in reports) / count,
    "max_context": max((r.max_context for r in reports), default=0),
  }
  if reports and reports[0].rounds and len({len(r.rounds) for r in reports}) == 1:
    by_round = []
    for i in range(len(reports[0].rounds)):
      scores = [r.rounds[i].scores(r.reference) for r in scored]
      by_round.append({
        "mean_correct": mean([s["mean_correct"] for s in scores]),
        "majority_at_n": mean([float(s["majority_correct"]) for s in scores]),
        "pass_at_n": mean([float(s["pass"]) for s in scores]),
        "entropy": sum(r.rounds[i].entropy for r in reports) / count,
        "generated_per_problem": sum(r.rounds[i].generated for r in reports) / count,
      })
    summary["by_round"] = by_round
  return summary


def format_summary(s: dict) -> str:
  def num(x):
    return "n/a" if x is None else f"{x:.3f}"

  text = (f"summary over {s['problems']} problem(s), {s['scored']} with a reference: "
          f"mean correct {num(s['mean_correct'])}, "
          f"majority@{s['n']} {num(s['majority_at_n'])}, pass@{s['n']} {num(s['pass_at_n'])}, "
          f"{s['generated_per_problem']:.1f} generated and {s['prefilled_per_problem']:.1f} prefilled tokens per "
          f"problem, largest context {s['max_context']}")
  for r, row in enumerate(s.get("by_round", ())):
    text += (f"\n  round {r}: mean correct {num(row['mean_correct'])}, majority@{s['n']} {num(row['majority_at_n'])}, "
             f"pass@{s['n']} {num(row['pass_at_n'])}, answer entropy {row['entropy']:.3f} nats, "
             f"{row['generated_per_problem']:.1f} generated tokens per problem")
  return text
