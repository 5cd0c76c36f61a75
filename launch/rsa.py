"""Markovian RSA (ZAYA1-8B report §VI) from the command line: one problem or a problem file, with a report.

  python launch/rsa.py --model=/models/ZAYA1-8B --chat --problem="What is 7 * 6? Answer in \\boxed{}." \\
      --n=16 --c=4 --t=2 --tau=4096 --beta=16384 --beta_final=40960 --template=markovian-zaya --tail_source=reasoning
  python launch/rsa.py --model=runs/tiny --problems=aime25.jsonl --n=8 --c=4 --t=2 --tau=256 --beta=512 \\
      --template=markovian-zaya --output=aime25_rsa.jsonl

Round 0 samples --n answers of the problem; each of --t aggregation rounds gives every new trace --c distinct
candidates of the previous round, of which it sees the last --tau tokens, and decodes --beta new tokens (the last round
--beta_final, round 0 --beta_first if given). The final population's answers (the last \\boxed{}) are printed with
their plurality vote, and (--show_text, on for --problem) the text of the candidate the vote picks. A problem file
holds one JSON object per line with "problem" (or "question") and optionally "answer"; with answers the run reports the
mean correctness over the final candidates (the report's metric), majority@N and pass@N. --output gets one JSON line
per problem (answers, vote, correctness, generated/prefilled tokens, largest context; the final texts with
--save_texts) and a summary line, which also records the flags, the checkpoint step and a fingerprint of the weights
("run"). Each problem's line is on disk once it is done (in `<output>.partial`, renamed to --output when every problem
is): after a crash, Ctrl-C or SIGTERM, rerun with the same flags and --resume to decode only the rest (problem i always
uses fold_in(key(seed), i), so the results equal an uninterrupted run's); a resume with other flags, other weights (a
run directory that saved a later step, a folder exported over) or another reference answer for a finished problem is
refused. An existing --output is kept unless --overwrite. Sampling flags apply to every round; --final_temperature,
--final_top_k and --final_top_p replace them in the last round (round 0 when --t=0). Each problem's line also scores
every round's population ("rounds": answers, vote, answer entropy, tokens, correctness), and the summary averages them
per round ("by_round"), as the RSA authors log per loop. Answers come from the whole output, or with
--answer_after_think only from what follows the last --end_think. Bad input prints one `error:` line and exits 1,
before the weights load wherever the tokenizer and config.json suffice to find it.

--model is a run directory (launch/train.py) or a Hugging Face folder, as for launch/generate.py. Templates:
rsa (the RSA authors' prompt), rsa-harness (its typo fixed), markovian-zaya (Zyphra's proxy prompt), pacore (the
proxy's PaCoRe prompt; with --tail_source=pacore_hybrid it is the proxy's PaCoRe mode), delethink (C = 1: the tail
continues the assistant's own answer; a chain that ended is not continued; a trace is scored and saved whole, its
chunks joined). With an aggregation template and --c=1 every trace is refined every round, finished or not (the
report's Delethink-like baseline).

The defaults are RSA's own (its authors' prompt, tails from the whole output, --beta_final = --beta, answers from the
whole output). The ZAYA1 report's Markovian RSA, on a model that thinks in <think>...</think>: --template=markovian-zaya
--tail_source=reasoning --beta_final=40960 (--answer_after_think to score only the final answers).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags

from zaya_jax.infer import answers as ans
from zaya_jax.infer import cli, cli_files, rsa_eval
from zaya_jax.infer import prompts as P
from zaya_jax.infer.generate import make_decode_fn, pad_id
from zaya_jax.infer.rsa import TAIL_SOURCES, context_bound

_MODEL = flags.DEFINE_string("model", None, "Run directory or Hugging Face folder.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (or its folder) if not in the model folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a run directory (default: the latest).")
_PROBLEM = flags.DEFINE_string("problem", None, "One problem (the question text).")
_ANSWER = flags.DEFINE_string("answer", None, "Reference answer of --problem (optional; enables correctness).")
_PROBLEMS = flags.DEFINE_string("problems", None,
                                "JSON-lines file, per line {\"problem\" (or \"question\"): ..., \"answer\": ...}.")
_N = flags.DEFINE_integer("n", 16, "Population N: traces per round.")
_C = flags.DEFINE_integer("c", 4, "Candidates per aggregation prompt C (<= N).")
_T = flags.DEFINE_integer("t", 2, "Aggregation rounds after round 0 (0 = plain parallel sampling).")
_TAU = flags.DEFINE_integer("tau", 4096, "Tail length in tokens carried from each candidate (<= beta).")
_BETA = flags.DEFINE_integer("beta", 16384, "New-token budget of rounds 0..t-1.")
_BETA_FINAL = flags.DEFINE_integer("beta_final", None, "New-token budget of the last round (default: beta).")
_BETA_FIRST = flags.DEFINE_integer("beta_first", None, "New-token budget of round 0 (default: beta); true Delethink's "
                                   "first chunk: --template=delethink --c=1 --beta=C-m --tau=m --beta_first=C.")
_TAIL_SOURCE = flags.DEFINE_enum("tail_source", "all", TAIL_SOURCES,
                                 "'all': tails end at the end of the output; 'reasoning': at --end_think if present; "
                                 "'pacore_hybrid': a trace that wrote --end_think carries its answer after it, "
                                 "one that did not its reasoning (the report's PaCoRe hybrid).")
_END_THINK = flags.DEFINE_string("end_think", "</think>", "End-of-thinking marker text (for --tail_source=reasoning "
                                 "or pacore_hybrid).")
_ANSWER_AFTER_THINK = flags.DEFINE_bool("answer_after_think", False, "Score only the text after the last --end_think "
                                         "marker (a candidate without one has no answer, as Delethink scores); "
                                         "default: the whole output.")
_TEMPLATE = flags.DEFINE_enum("template", "rsa", sorted(rsa_eval.TEMPLATES), "Aggregation prompt template.")
_CHAT = flags.DEFINE_bool("chat", False, "Render prompts as user messages with the tokenizer folder's chat template.")
_Q_MAX = flags.DEFINE_integer("q_max", None, "Question capacity in tokens (default: the longest question, rounded up "
                              "to 64); one compile serves every question up to it.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy (the report uses 1.0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = no limit).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (the report uses 1.0).")
_FINAL_TEMPERATURE = flags.DEFINE_float("final_temperature", None, "Sampling temperature of the last round (default: "
                                        "--temperature); Zyphra's RSA proxy samples its final call at 0.6.")
_FINAL_TOP_K = flags.DEFINE_integer("final_top_k", None, "--top_k of the last round (default: --top_k; the "
                                    "proxy's 40).")
_FINAL_TOP_P = flags.DEFINE_float("final_top_p", None, "--top_p of the last round (default: --top_p; the "
                                  "proxy's 0.95).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed: problem i uses fold_in(key(seed), i), independent of the others.")
_OUTPUT = flags.DEFINE_string("output", None, "Write one JSON line per problem and a summary line here.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
_SAVE_TEXTS = flags.DEFINE_bool("save_texts", False, "Also write the final candidates' texts (\"texts\") into each "
                                 "problem's --output line.")
_SHOW_TEXT = flags.DEFINE_bool("show_text", None, "Print the text of the final candidate the vote stands for (the "
                               "first finished one with the plurality answer, else candidate 0). Default: on for "
                               "--problem, off for --problems.")
_RESUME = flags.DEFINE_bool("resume", False, "Go on from the finished problems of an interrupted run with the same "
                            "flags (<output>.partial); starts afresh when there is none.")
# The flags that shape the results: a resumed run must repeat them (--output, --overwrite, --resume do not count).
_SETTINGS = (_MODEL, _TOKENIZER, _STEP, _PROBLEM, _ANSWER, _PROBLEMS, _N, _C, _T, _TAU, _BETA, _BETA_FINAL,
             _BETA_FIRST, _TAIL_SOURCE, _END_THINK, _TEMPLATE, _CHAT, _Q_MAX, _TEMPERATURE, _TOP_K, _TOP_P,
             _FINAL_TEMPERATURE, _FINAL_TOP_K, _FINAL_TOP_P, _SEED, _SAVE_TEXTS, _ANSWER_AFTER_THINK)


def _problems() -> list[cli_files.Problem]:
  if (_PROBLEM.value is None) == (_PROBLEMS.value is None):
    raise cli.CLIError("pass exactly one of --problem and --problems")
  if _PROBLEMS.value is not None:
    if _ANSWER.value is not None:
      raise cli.CLIError("--answer goes with --problem; a --problems file has an \"answer\" per line")
    return cli_files.read_problems(_PROBLEMS.value)
  if not _PROBLEM.value.strip():
    raise cli.CLIError("--problem is empty")
  if _ANSWER.value is not None and not _ANSWER.value.strip():
    raise cli.CLIError("--answer is empty (no answer could match it); leave it out for an unscored problem")
  return [cli_files.Problem(0, 0, _PROBLEM.value, _ANSWER.value)]


def rsa_config_from_flags(**settings):
  """The sampler's config from the population and budget flags, plus `settings` known only later."""
  return rsa_eval.rsa_config(n=_N.value, c=_C.value, t=_T.value, tau=_TAU.value, beta=_BETA.value,
                             beta_final=_BETA_FINAL.value, beta_first=_BETA_FIRST.value, seed=_SEED.value, **settings)


def _resumed(rows: list[dict], problems: list[cli_files.Problem]) -> dict[int, rsa_eval.ProblemReport]:
  """The reports of a partial --output, checked against the problems they claim to answer."""
  done = {}
  for row in rows:
    if row.get("summary"):
      continue
    try:
      report = rsa_eval.ProblemReport.from_json(row)
    except (KeyError, TypeError) as e:
      old = " (no per-round reports: written by an older launch/rsa.py; delete it to start over)" if (
        isinstance(e, KeyError) and e.args == ("rounds",)) else ""
      raise cli.CLIError(f"--resume: {_OUTPUT.value}.partial holds a line that is not a problem report ({e}){old}"
                         ) from None
    if report.index >= len(problems) or problems[report.index].problem != report.problem:
      raise cli.CLIError(f"--resume: {_OUTPUT.value}.partial answers another problem {report.index + 1} than the "
                         "problem file's; delete it to start over")
    if problems[report.index].answer != report.reference:  # its line would be scored against the old answer
      raise cli.CLIError(f"--resume: problem {report.index + 1}'s reference answer is {problems[report.index].answer!r}"
                         f" in the problem file but {report.reference!r} in {_OUTPUT.value}.partial; restore it, or "
                         "delete the partial file to start over")
    done[report.index] = report
  return done


def main(argv) -> int:
  del argv
  if not _MODEL.value:
    raise cli.CLIError("--model is required (a run directory or a Hugging Face folder)")
  problems = _problems()
  unscored = [p for p in problems if p.answer is None]
  if _PROBLEMS.value and unscored:  # said now, not after hours of decoding
    print(f"note: {len(unscored)} of {len(problems)} problem(s) have no \"answer\" field (e.g. line "
          f"{unscored[0].line}): they are decoded but not scored", file=sys.stderr)
  sampling = cli.sampling_config(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  # Each last-round flag defaults to its round flag.
  pairs = ((_BETA, _BETA_FINAL), (_TEMPERATURE, _FINAL_TEMPERATURE), (_TOP_K, _FINAL_TOP_K), (_TOP_P, _FINAL_TOP_P))
  final_sampling = cli.sampling_config(*(round_flag.value if final_flag.value is None else final_flag.value
                                         for round_flag, final_flag in pairs[1:]), flag_prefix="final_")
  if _T.value == 0:  # round 0 is the final round: its own flags win, the others would be silently unused
    for round_flag, final_flag in pairs:
      if final_flag.value is not None and flags.FLAGS[round_flag.name].present:
        raise cli.CLIError(f"--{round_flag.name} is unused with --t=0 and --{final_flag.name}: round 0 is the final "
                           "round; pass one of them")
  # Checked before the model loads: flag errors (C > N, τ > β, ...) should not wait for the weights.
  rsa_config_from_flags(tail_source="all", end_think=(), q_max=1, max_context=None, pad_id=0)
  cli_files.check_output_is_not_input(_OUTPUT.value, problems=_PROBLEMS.value)
  loaded = cli.load_model(_MODEL.value, tokenizer_path=_TOKENIZER.value, step=_STEP.value)  # weights: on first use
  print(f"model: {loaded.describe()}", file=sys.stderr)
  # What shapes the results: the flags, and the weights themselves (a run directory that went on training, or a
  # folder exported over, must not resume a partial file with another model). Written into the summary line too.
  provenance = {"flags": {f"--{flag.name}": flag.value for flag in _SETTINGS},
                "model": {"step": loaded.step, "fingerprint": loaded.fingerprint}}
  settings = {**provenance["flags"], "model step": loaded.step, "model fingerprint": loaded.fingerprint}
  with cli_files.AtomicJsonl(_OUTPUT.value, overwrite=_OVERWRITE.value, resumable=True, resume=_RESUME.value,
                             settings=settings) as out:
    done = _resumed(out.done, problems)
    tokenizer = loaded.tokenizer
    chat = cli.chat_format(loaded, _CHAT.value)
    try:
      # With t = 0 nothing is aggregated: --c and the template's aggregation prompt are unused.
      pieces = P.encode_pieces(tokenizer.hf, rsa_eval.TEMPLATES[_TEMPLATE.value], _C.value if _T.value else 1, chat)
    except ValueError as e:
      raise cli.CLIError(f"--template={_TEMPLATE.value}: {e}") from None
    questions = [P.encode_question(tokenizer.hf, p.problem) for p in problems]
    longest = max(len(q) for q in questions)
    q_max = _Q_MAX.value or -(-longest // 64) * 64
    if longest > q_max:
      raise cli.CLIError(f"--q_max={q_max} is shorter than the longest question ({longest} tokens)")
    end_think = ()
    if _TAIL_SOURCE.value in ("reasoning", "pacore_hybrid"):
      end_think = tuple(tokenizer.hf.encode(_END_THINK.value, add_special_tokens=False).ids)
      if not end_think:
        raise cli.CLIError(f"--end_think is empty: --tail_source={_TAIL_SOURCE.value} needs the end-of-thinking "
                           "marker text")
      if len(end_think) > 1:
        # The sampler looks for this exact id sequence; a model may write the same text as other ids (merged
        # with a neighbouring space or newline), and a trace whose marker is missed counts as all reasoning.
        print(f"note: --end_think={_END_THINK.value!r} is not one token in this tokenizer but {len(end_think)} "
              f"{list(end_think)}: reasoning ends only where the model writes exactly these ids", file=sys.stderr)
    # pad_id must be generate's (rows are compared and scrubbed with it); max_context is the model's positions,
    # which also bound make_decode_fn's cache (prompt capacity + budget - 1 per call). Tails end before a final stop
    # token, which marks a trace finished.
    # True Delethink (the continuation template) stops a chain at EOS; with an aggregation template and --c=1 (the
    # report's Delethink-like baseline) every trace is refined every round, finished or not.
    keep_finished = rsa_eval.TEMPLATES[_TEMPLATE.value].continuation and _C.value == 1 and _T.value > 0
    cfg = rsa_config_from_flags(tail_source=_TAIL_SOURCE.value, end_think=end_think, q_max=q_max,
                                max_context=loaded.context, pad_id=pad_id(loaded), stop_ids=loaded.stop_ids,
                                keep_finished=keep_finished)
    rsa_eval.check_rsa_context(cfg, pieces, loaded.context, longest)
    print(f"budget: at most {cfg.max_generated:,} new tokens a problem ({cfg.rounds} rounds of {cfg.n} traces); "
          f"every call within {context_bound(cfg, pieces):,} tokens of context", file=sys.stderr)
    key = jax.random.key(_SEED.value)
    reports, decode_fn, final_decode_fn = [], None, None
    for problem in problems:
      cli.stop_if_terminated()
      print(f"problem {problem.index + 1}/{len(problems)}: {problem.problem.strip()[:100]!r}", flush=True)
      if problem.index in done:
        reports.append(done[problem.index])
        print(f"  done before (in {_OUTPUT.value}.partial)", flush=True)
        continue
      if decode_fn is None:  # one decode function for every problem and round: compiled once per budget
        decode_fn = make_decode_fn(loaded.model, sampling=sampling, stop_token_ids=loaded.stop_ids)
        final_decode_fn = decode_fn if final_sampling == sampling else make_decode_fn(
          loaded.model, sampling=final_sampling, stop_token_ids=loaded.stop_ids)

      def on_round(r, rr, reference=problem.answer):
        vote = "no answer" if rr.majority is None else f"{rr.majority!r} ({rr.votes} of {cfg.n})"
        scores = rr.scores(reference)
        correct = "" if reference is None else f", {round(scores['mean_correct'] * cfg.n)}/{cfg.n} correct"
        print(f"  round {r}: {rr.generated} new tokens, longest call {rr.max_context} tokens; vote {vote}"
              f"{correct}, answer entropy {rr.entropy:.2f}", flush=True)

      report, texts = rsa_eval.solve_problem(cfg, pieces, decode_fn, tokenizer, problem,
                                             jax.random.fold_in(key, problem.index), loaded.stop_ids, on_round=on_round,
                                             answer_after=_END_THINK.value if _ANSWER_AFTER_THINK.value else None,
                                             final_decode_fn=final_decode_fn)
      reports.append(report)
      out.write({**report.to_json(), **({"texts": texts} if _SAVE_TEXTS.value else {})})
      shown = ", ".join("-" if a is None else repr(a) for a in report.answers)
      print(f"  answers: {shown}")
      vote = "no answer" if report.majority is None else f"{report.majority!r} ({report.votes} of {cfg.n})"
      verdict = ""
      if report.reference is not None:
        verdict = (f"; reference {report.reference!r}: majority {'correct' if report.majority_correct else 'wrong'}, "
                   f"{sum(report.correct)}/{cfg.n} candidates correct")
      print(f"  vote: {vote}{verdict}", flush=True)
      if _SHOW_TEXT.value or (_SHOW_TEXT.value is None and _PROBLEM.value is not None):
        chosen = ans.majority_vote(report.answers, report.finished)  # as the report's vote: its representative
        shown_index = 0 if chosen is None else chosen.index
        state = "finished" if report.finished[shown_index] else "cut at its budget"
        print(f"  candidate {shown_index} ({state}):\n{texts[shown_index]}", flush=True)
    summary = rsa_eval.summarize(reports)
    out.write({**summary, "run": provenance})
  print(rsa_eval.format_summary(summary))
  if _OUTPUT.value:
    print(f"wrote {len(reports)} problem(s) and a summary line to {_OUTPUT.value}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(cli.main_wrapper(main))
