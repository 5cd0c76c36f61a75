"""Answer extraction, normalisation, voting and the population metrics (host side, plain Python).

The sampler produces token pools; the caller detokenises them and uses these helpers:
  extract_boxed(text)        the content of the last complete, non-empty `\\boxed{...}` (nested braces allowed)
  normalize_answer(s)        a light LaTeX/number normaliser, so that `\\dfrac{1}{2}` and `\\frac{1}{2}.` vote together
  majority_vote(answers)     plurality over normalised answers; ties go to the answer seen first
  mean_correct / pass_at_n / majority_at_n   the report's metric (mean over the final N), any-correct, vote-correct

This is not a symbolic equivalence checker (no sympy): `0.5` and `\\frac{1}{2}` stay different answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, open_at: int) -> str | None:
  """The content of the brace group opening at text[open_at] == '{', or None when it never closes (truncated)."""
  depth = 0
  for i in range(open_at, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[open_at + 1 : i]
  return None


def _box_at(text: str, start: int, command: str) -> tuple[bool, str | None]:
  """(braced, content) of the box command at text[start]; content None when there is none (truncated, another
  macro)."""
  i = start + len(command)
  spaces = len(text[i:]) - len(text[i:].lstrip(" "))
  if text[i + spaces:i + spaces + 1] == "{":  # `\boxed{7}`, and `\boxed {7}` as TeX reads it
    return True, _braced(text, i + spaces)
  if spaces:  # `\boxed 5$`: the brace-less form some models write; the answer runs to the next `$` or whitespace
    m = re.match(r" +([^\s$]+)", text[i:])
    return False, m.group(1) if m else None
  return False, None  # e.g. `\boxedfoo` is another macro


def extract_boxed(text: str | None) -> str | None:
  """The content of the last complete, non-empty `\\boxed{...}` (or `\\fbox{...}`) in text, nested braces kept.

  An unclosed box (output truncated at the budget) and an empty `\\boxed{}` (the format hint echoed from the
  prompt after the answer; also one holding only markup, `\\boxed{\\text{}}`) are passed over for the previous
  box: the model's last committed answer. The brace-less `\\boxed 5` counts only when no braced box has an answer
  (prose such as "in \\boxed so that" would otherwise win).
  Returns "" when the only boxes are empty, so that the caller can tell "no box" (None) from "empty box";
  `majority_vote` ignores both (spec P10).
  """
  if not text:
    return None
  positions = sorted((m.start(), cmd) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd), text))
  braceless, empty = None, False
  for start, cmd in reversed(positions):
    braced, content = _box_at(text, start, cmd)
    if content is None:
      continue
    if not braced:
      braceless = braceless if braceless is not None else content
    elif normalize_answer(content) is not None:  # `\boxed{\text{}}` is as empty as `\boxed{}`
      return content
    else:
      empty = True
  if braceless is not None:
    return braceless
  return "" if empty else None


_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
# One-character arguments without braces, as TeX reads them: `\frac12`, `\frac1{2}`, `\sqrt2`.
_FRAC_SHORT = re.compile(r"\\frac(\w|\{[^{}]*\})(\w|\{[^{}]*\})")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")


def _braces(arg: str) -> str:
  return arg if arg.startswith("{") else "{" + arg + "}"


def normalize_answer(answer: str | None) -> str | None:
  """Canonical form for comparing and voting; None/empty stay None.

  Steps, each chosen because it only removes presentation: strip `$` and `\\$`, spacing macros,
  `\\left`/`\\right`, text wrappers (`\\text{cm}` -> `cm`), degree marks and `%`; `\\dfrac`/`\\tfrac` ->
  `\\frac`, `\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`; drop whitespace and a trailing period;
  `x = 5` -> `5` for a single-letter left side; a choice `(A)` -> `A`; braces around the whole answer dropped
  (`{7}` -> `7`); numbers: `1,000` and `1{,}000` -> `1000`, `+5` -> `5`, `.5` -> `0.5`,
  `0.50` -> `0.5`, `5.00` -> `5`, `007` -> `7`.
  """
  if answer is None:
    return None
  # To a fixed point: a vote's winner (already normalised) is compared with the gold answer by normalising both, so
  # normalising twice must change nothing ("x = y = 3" -> "y=3" once, "3" twice, before this loop).
  s = answer
  for _ in range(8):
    previous, s = s, _normalize_once(s)
    if s is None or s == previous:
      return s
  return s


def _normalize_once(answer: str) -> str | None:
  s = answer.strip().rstrip(".").strip().replace("\\$", "").strip("$").strip()
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("{,}", ",")
  s = _SPACING.sub("", s)
  for _ in range(3):  # nested wrappers, innermost first
    s = _WRAPPERS.sub(r"\1", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _FRAC_SHORT.sub(lambda m: "\\frac" + _braces(m.group(1)) + _braces(m.group(2)), s)
  s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
  s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").replace("%", "")
  s = re.sub(r"\s+", "", s).rstrip(".")
  s = re.sub(r"^[a-zA-Z]=", "", s)
  s = re.sub(r"^\(([A-Z])\)$", r"\1", s)
  if re.fullmatch(r"\{[^{}]*\}", s):  # a grouping brace around the whole answer: \boxed{{7}}
    s = s[1:-1]
  if _THOUSANDS.match(s):
    s = s.replace(",", "")
  leading_zeros = re.fullmatch(r"(-?)0+(\d+(?:\.\d+)?)", s)  # AIME's 007
  if leading_zeros:
    s = leading_zeros.group(1) + leading_zeros.group(2)
  if re.fullmatch(r"\+\d*\.?\d+", s):
    s = s[1:]
  if re.fullmatch(r"-?\.\d+", s):
    s = s.replace(".", "0.", 1)
  if re.fullmatch(r"-?\d+\.\d*?0+", s):
    s = s.rstrip("0").rstrip(".")
  return s or None


def is_equiv(answer: str | None, gold: str | None, normalize: Callable[[str | None], str | None] = normalize_answer):
  """Normalised string equality; a missing answer is never correct."""
  a, g = normalize(answer), normalize(gold)
  return a is not None and a == g


@dataclass(frozen=True)
class Vote:
  answer: str  # normalised winning answer
  count: int  # votes for it
  index: int  # representative candidate: the first finished one with this answer, else the first one
  valid: int  # candidates that had an answer at all


def majority_vote(
  answers: Sequence[str | None],
  finished: Sequence[bool] | None = None,
  normalize: Callable[[str | None], str | None] = normalize_answer,
) -> Vote | None:
  """Plurality over normalised answers; None when no candidate has an answer.

  Missing and empty answers (an echoed `\\boxed{}`) do not vote. Ties go to the answer whose first occurrence
  comes earliest in `answers` — deterministic, and the rule of Zyphra's `rsa/` package. `finished` (EOS seen
  rather than cut at the budget) only picks the representative candidate, not the answer (spec P10).
  """
  counts: dict[str, int] = {}
  first: dict[str, int] = {}
  for i, a in enumerate(answers):
    key = normalize(a)
    if key is None:
      continue
    counts[key] = counts.get(key, 0) + 1
    first.setdefault(key, i)
  if not counts:
    return None
  winner = min(counts, key=lambda k: (-counts[k], first[k]))
  members = [i for i, a in enumerate(answers) if normalize(a) == winner]
  index = members[0]
  if finished is not None:
    if len(finished) != len(answers):
      raise ValueError(f"finished has {len(finished)} entries, answers has {len(answers)}")
    index = next((i for i in members if finished[i]), members[0])
  return Vote(winner, counts[winner], index, sum(counts.values()))


def mean_correct(answers: Sequence[str | None], gold: str) -> float:
  """Fraction of candidates that are correct: the report's metric (the expected accuracy of a uniform pick)."""
  if not answers:
    raise ValueError("mean_correct needs at least one answer")
  return sum(is_equiv(a, gold) for a in answers) / len(answers)


def pass_at_n(answers: Sequence[str | None], gold: str) -> float:
  """1.0 when any candidate is correct (pass@N with N = len(answers))."""
  return float(any(is_equiv(a, gold) for a in answers))


def majority_at_n(answers: Sequence[str | None], gold: str) -> float:
  """1.0 when the plurality answer is correct; no answer at all counts as wrong."""
  vote = majority_vote(answers)
  return float(vote is not None and is_equiv(vote.answer, gold))


def answer_entropy(answers: Sequence[str | None]) -> float:
  """Shannon entropy (nats) of the normalised answer distribution, missing answers as one class: a population's
  diversity, which RSA rounds drive towards zero (spec P13)."""
  counts: dict[str | None, int] = {}
  for a in answers:
    key = normalize_answer(a)
    counts[key] = counts.get(key, 0) + 1
  total = sum(counts.values())
  # 0.0 - (...): a single class sums to 0.0, whose negation would print as -0.0.
  return 0.0 - sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
