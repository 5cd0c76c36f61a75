"""Aggregation prompts as data: text templates, a host string builder, chat rendering, and the token pieces the
device splices (`rsa.PromptPieces`).

Two layers (MARKOVIAN_RSA.md §5.6):
  1. `prompt_text(template, question, tails, chat)` builds the whole prompt string on the host, as the reference
     implementations do (`"\\n".join(parts)` rendered as one user message through the chat template).
  2. `encode_pieces(tokenizer, template, c, chat)` renders the same string with sentinels in place of the question
     and the tails, splits it there and tokenises each fixed piece once; the device then concatenates
     pieces, question ids and tail ids (`rsa.build_aggregation_prompt`).

Token-for-token equality of the two needs every piece boundary to be a boundary of the tokenizer's pre-tokens.
A byte-level BPE with the GPT-2 split regex does not merge across `x|\\n`, `\\n|x` or `x| y`, but it *does* treat
a run of whitespace differently at the end of a string than before text: alone, "Problem:\\n\\n" ends in one
pre-token "\\n\\n" (often one token); followed by a question it splits "\\n" + "\\n". So each piece is tokenised
in context — between probe texts standing for the question or a tail — and should come out the same for every probe.
A tokenizer whose merges cross such a boundary (a SentencePiece-style BPE without a pre-tokenizer split may merge
"?\n" or "\nSo"; Gemma's, ZAYA1's, could not be checked offline) has no such ids: the piece is then spliced as its
own ids and `encode_pieces` warns naming it; the prompt is still the host string's text, its ids may differ from that
string's tokenisation by a token at the boundary. Tails are token slices (the paper's unit), never re-tokenised: the
spliced form is canonical, and it equals the tokenised host string when the tail texts are whole tokenisations
that start and end with non-whitespace (the reference strips them; a token tail cannot be stripped).

The question is stripped once (`encode_question`) and shared by round 0 and the aggregation prompts.
Without a chat template, a prompt starts as the tokenizer's post-processor starts a text (Gemma's <bos>; nothing for
the project's trained BPE), as `launch/generate.py`'s plain prompts do; a rendered chat template holds its own.
Template text is filled by concatenation, never `str.format`: questions and tails contain `{}` (spec P9).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from zaya_jax.infer.rsa import PromptPieces


@dataclass(frozen=True)
class AggregationTemplate:
  """The text of an aggregation prompt. The user message is `joiner.join(parts)` with parts
  [intro, problem, question + "\\n", candidates, solution_1 + tail_1 + "\\n", ..., closing]; the `*_single` fields
  replace their namesakes when C = 1. In `solution`, "{i}" is replaced by the 1-based candidate number.

  `continuation=True` is Delethink: no aggregation text; the prompt is the chat-templated question followed by the
  single tail as the start of the assistant's own answer, which the model simply continues.
  """

  name: str
  intro: str = ""
  intro_single: str = ""
  problem: str = ""
  candidates: str = ""
  candidates_single: str = ""
  solution: str = ""
  solution_single: str = ""
  closing: str = ""
  closing_single: str = ""
  joiner: str = "\n"
  continuation: bool = False

  def user_text(self, question: str, tails: Sequence[str]) -> str:
    """The aggregation user message (not chat-rendered). Tails are inserted verbatim (see the module doc)."""
    if self.continuation:
      raise ValueError(f"template {self.name!r} is a continuation template: it has no aggregation message")
    if not tails:
      raise ValueError("an aggregation prompt needs at least one tail")
    one = len(tails) == 1
    parts = [
      self.intro_single if one else self.intro,
      self.problem,
      question + "\n",
      self.candidates_single if one else self.candidates,
    ]
    for i, tail in enumerate(tails, 1):
      header = self.solution_single if one else self.solution.replace("{i}", str(i))
      parts.append(header + tail + "\n")
    parts.append(self.closing_single if one else self.closing)
    return self.joiner.join(parts)


def rsa_template(problem_kind: str = "math problem", format_hint: str = "\\boxed{}", fix_typo: bool = False):
  """RSA's aggregation prompt (HyperPotatoNeo/RSA `eval_loop.py::aggregate_prompt`, spec §1.2), byte-exact,
  including the missing space in "strategy.End" unless fix_typo (rsa-llm/RSAHarness fixed it; spec P11)."""
  end = ". End" if fix_typo else ".End"
  return AggregationTemplate(
    name="rsa" + ("-harness" if fix_typo else ""),
    intro=(
      f"You are given a {problem_kind} and several candidate solutions. Some candidates may be incorrect or contain "
      "errors. Aggregate the useful ideas and produce a single, high-quality solution. Reason carefully; if "
      "candidates disagree, choose the correct path. If all are incorrect, then attempt a different strategy"
      f"{end} with the final result in {format_hint}.\n"
    ),
    intro_single=(
      f"You are given a {problem_kind} and a candidate solution. The candidate may be incomplete or contain errors. "
      "Refine this trajectory and produce an improved, higher-quality solution. If it is entirely wrong, attempt a "
      f"new strategy. End with the final result in {format_hint}.\n"
    ),
    problem="Problem:\n",
    candidates="Candidate solutions (may contain mistakes):\n",
    candidates_single="Candidate solution (may contain mistakes):\n",
    solution="---- Solution {i} ----\n",
    solution_single="---- Candidate ----\n",
    closing=(
      f"Now write a single improved solution. Provide clear reasoning and end with the final answer in {format_hint}."
    ),
    closing_single=(
      "Now refine the candidate into an improved solution. Provide clear reasoning and end with the final answer "
      f"in {format_hint}."
    ),
  )


# The default: the RSA authors' wording, as released.
RSA_REFERENCE = rsa_template()
RSA_HARNESS = rsa_template(fix_typo=True)

# Zyphra's Markovian RSA proxy (Zyphra/vllm examples/markovian_rsa/rsa_proxy_server.py::create_aggregation_prompt,
# spec §4.2a): the only Zyphra-authored wording; math/\boxed-specific. C = 1 uses RSA's single-candidate header.
MARKOVIAN_ZAYA = AggregationTemplate(
  name="markovian-zaya",
  intro=(
    "You are given a math problem and several candidate solutions. Some candidates may be incorrect or contain "
    "errors. Aggregate the useful ideas and produce a single, high-quality solution. Reason carefully; if candidates "
    "disagree, choose the correct path. If all are incorrect, then attempt a different strategy. Do not restate the "
    "problem or the candidate solutions."
  ),
  intro_single=RSA_REFERENCE.intro_single,
  problem="[[ Problem ]]:\n",
  candidates="[[ Candidate solutions (may contain mistakes) ]]:\n",
  candidates_single="[[ Candidate solutions (may contain mistakes) ]]\n",
  solution="---- Solution {i} ----\n",
  solution_single="---- Candidate ----\n",
  closing="Now write a single improved solution. Provide clear reasoning and end with the final answer in \\boxed{}.",
  closing_single=(
    "Now, based on the original problem and the reference response above, please provide your own comprehensive "
    "solution."
  ),
)

# Zyphra's proxy in PaCoRe mode (the same file, spec §4.2a): "reference responses", which that mode fills with each
# candidate's answer section when it has one (`RSAConfig(tail_source="pacore_hybrid")`). The proxy has no C = 1
# wording of its own: one candidate is "Reference 1".
_PACORE_INTRO = (
  "You are given a problem and a list of reference responses. Your job is to analyze these references and provide "
  "your own response. End with the final result in \\boxed{}.\n"
)
_PACORE_CLOSING = MARKOVIAN_ZAYA.closing  # the same words in both modes
PACORE_ZAYA = AggregationTemplate(
  name="pacore",
  intro=_PACORE_INTRO,
  intro_single=_PACORE_INTRO,
  problem="Original Problem:\n",
  candidates="Reference Responses:\n",
  candidates_single="Reference Responses:\n",
  solution="Reference {i} \n",
  solution_single="Reference 1 \n",
  closing=_PACORE_CLOSING,
  closing_single=_PACORE_CLOSING,
)

# Delethink (Markovian Thinker): the carried tail is the assistant's own prefix. (Its first-chunk head fold —
# the first 100 tokens of chunk 1 appended to the query — is not modelled.)
DELETHINK = AggregationTemplate(name="delethink", continuation=True)


# ---------------------------------------------------------------------------------------------------------------
# Chat templates.


def _raise_exception(message):
  from jinja2.exceptions import TemplateError

  raise TemplateError(message)


def _strftime_now(fmt):
  import datetime

  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template_str: str):
  # As transformers renders chat templates: a sandboxed, immutable environment; trim/lstrip blocks; loop controls.
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
    x, indent=indent, ensure_ascii=ensure_ascii
  )
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(template_str)


def render_chat(template_str: str, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
  """Renders a Hugging Face chat template (jinja2) over messages [{"role", "content"}, ...]; extra names
  (bos_token, eos_token, enable_thinking, ...) are passed to the template."""
  return _compile(template_str).render(
    messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **extra
  )


@dataclass(frozen=True)
class ChatFormat:
  """A chat template and the names it is rendered with (bos_token, ...)."""

  template: str
  extra: Mapping = field(default_factory=dict)

  def user(self, content: str) -> str:
    """One user message followed by the assistant's generation prompt."""
    return render_chat(self.template, [{"role": "user", "content": content}], True, **self.extra)


def _token_text(tok) -> str | None:
  return tok.get("content") if isinstance(tok, dict) else tok


def load_chat_template(path: str | os.PathLike, name: str = "default") -> ChatFormat:
  """The chat template of a tokenizer folder or `tokenizer_config.json`: `chat_template.jinja` if the folder has
  one, else the config's `chat_template` (a string, or a list of {name, template} from which `name` is taken).
  bos_token/eos_token/pad_token (strings or {"content": ...}) become render names; in a folder without
  `added_tokens_decoder` in its config, special_tokens_map.json's names win, as in transformers."""
  path = os.fspath(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else path
  config = {}
  if os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  jinja_path = os.path.join(folder, "chat_template.jinja")
  template = config.get("chat_template")
  if os.path.isdir(path) and os.path.exists(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      template = f.read()
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    if name not in named:
      raise ValueError(f"{config_path}: no chat template named {name!r}, have {sorted(map(str, named))}")
    template = named[name]
  if not isinstance(template, str) or not template:
    raise ValueError(f"{path}: no chat_template found (tokenizer_config.json or chat_template.jinja)")
  names = dict(config)
  legacy_path = os.path.join(folder, "special_tokens_map.json")
  if "added_tokens_decoder" not in config and os.path.exists(legacy_path):
    # A folder of the older layout: transformers merges this file over the config's names, so it wins.
    with open(legacy_path, encoding="utf-8") as f:
      names.update(json.load(f))
  extra = {k: _token_text(names[k]) for k in ("bos_token", "eos_token", "pad_token") if names.get(k) is not None}
  return ChatFormat(template, extra)


# ---------------------------------------------------------------------------------------------------------------
# Host strings and device pieces.

_Q = "\u27e6QUESTION\u27e7"  # sentinels: survive templates unchanged and never occur in real text


def _tail_sentinel(i: int) -> str:
  return f"\u27e6TAIL{i}\u27e7"


def _wrap(chat: ChatFormat | None, content: str) -> str:
  return content if chat is None else chat.user(content)


def prompt_text(
  template: AggregationTemplate,
  question: str,
  tails: Sequence[str] | None = None,
  chat: ChatFormat | None = None,
) -> str:
  """The whole prompt string: round 0 (tails None: the question as the user message) or an aggregation prompt.
  The question is stripped, as the reference does; tails are inserted verbatim."""
  question = question.strip()
  if tails is None:
    return _wrap(chat, question)
  if template.continuation:
    if len(tails) != 1:
      raise ValueError(f"continuation template {template.name!r} takes exactly one tail, got {len(tails)}")
    return _wrap(chat, question) + tails[0]
  return _wrap(chat, template.user_text(question, tails))


def _encode(tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text, add_special_tokens=False).ids


# Stand-ins for what surrounds a piece: a question or tail ends (left) and starts (right) with non-whitespace.
_LEFT_PROBES = ("x.", "7", "}")
_RIGHT_PROBES = ("A", "7", "\\")


def _encode_in_context(tokenizer, text: str, name: str, after_text: bool, before_text: bool) -> tuple[int, ...]:
  """The ids `text` has when spliced between variable texts. A tokenizer whose merges cross the boundary (a
  SentencePiece-style BPE without a pre-tokenizer split, which may merge "?\n" or "\nSo") gives no such ids: the
  piece's own ids are used then, with a warning. The spliced prompt still decodes to the host string; its ids may
  differ from that string's own tokenisation at this boundary."""
  if not text:
    return ()
  seen = set()
  for left in _LEFT_PROBES if after_text else ("",):
    for right in _RIGHT_PROBES if before_text else ("",):
      ids_l, ids_r, ids = _encode(tokenizer, left), _encode(tokenizer, right), _encode(tokenizer, left + text + right)
      inner = ids[len(ids_l) : len(ids) - len(ids_r)]
      if ids[: len(ids_l)] != ids_l or ids[len(ids) - len(ids_r) :] != ids_r:
        inner = None  # the piece merges with its neighbour
      seen.add(None if inner is None else tuple(inner))
  if len(seen) != 1 or None in seen:
    warnings.warn(
      f"template piece {name} ({text!r}) tokenises differently next to different text (this tokenizer merges "
      "across its boundary): it is spliced as its own ids, so an aggregation prompt may differ from the "
      "tokenisation of its text by a token at that boundary (the same text)", stacklevel=3)
    return tuple(_encode(tokenizer, text))
  return seen.pop()


def _split(text: str, sentinels: Sequence[str]) -> list[str]:
  pieces, rest = [], text
  for s in sentinels:
    if rest.count(s) != 1:
      raise ValueError(f"the rendered prompt must contain {s!r} exactly once, found {rest.count(s)}")
    head, rest = rest.split(s)
    pieces.append(head)
  return [*pieces, rest]


def encode_pieces(tokenizer, template: AggregationTemplate, c: int, chat: ChatFormat | None = None) -> PromptPieces:
  """Token pieces for RSAConfig.c = c: the host prompt with sentinels, split there, each piece tokenised in context.

  tokenizer: a `tokenizers.Tokenizer` (anything with `.encode(text, add_special_tokens=False).ids`).
  """
  if template.continuation and c != 1:
    raise ValueError(f"continuation template {template.name!r} carries one tail: c must be 1, got {c}")
  before, after = _split(prompt_text(template, _Q, None, chat), [_Q])
  start = () if chat is not None else leading_special_ids(tokenizer)  # a rendered chat template holds its own
  initial = (
    start + _encode_in_context(tokenizer, before, "initial[0]", False, True),
    _encode_in_context(tokenizer, after, "initial[1]", True, False),
  )
  tails = [_tail_sentinel(i) for i in range(c)]
  texts = _split(prompt_text(template, _Q, tails, chat), [_Q, *tails])
  prefix = start + _encode_in_context(tokenizer, texts[0], "prefix", False, True)
  heads = tuple(_encode_in_context(tokenizer, texts[1 + i], f"heads[{i}]", True, True) for i in range(c))
  suffix = _encode_in_context(tokenizer, texts[-1], "suffix", True, False)
  return PromptPieces(initial=initial, prefix=prefix, heads=heads, suffix=suffix, continuation=template.continuation)


def leading_special_ids(tokenizer) -> tuple[int, ...]:
  """The ids the tokenizer's post-processor puts before a text (Gemma's <bos>), () when it adds none; ids it
  appends after a text (an <eos>) are not a prompt's business."""
  plain = _encode(tokenizer, "x")
  full = tokenizer.encode("x", add_special_tokens=True).ids
  for k in range(len(full) - len(plain) + 1):
    if full[k : k + len(plain)] == plain:
      return tuple(full[:k])
  raise ValueError(f"the tokenizer's post-processor changes the text's own ids ({plain} -> {full})")


def encode_question(tokenizer, question: str) -> list[int]:
  """The question's ids, stripped as `prompt_text` strips it."""
  ids = _encode(tokenizer, question.strip())
  if not ids:
    raise ValueError("the question is empty after stripping")
  return ids
