"""The co-design experiment, end to end: does training on aggregation prompts make Markovian RSA pay off more?

  python -m experiments.codesign.run --mode=quick --out=experiments/results/codesign_quick   # < 10 min, 2 cores
  python -m experiments.codesign.run --mode=full --out=experiments/results/codesign          # < 90 min, 2 cores
  python -m experiments.codesign.run --mode=full3 --out=experiments/results/codesign_3ops    # 3-operation chains
  python -m experiments.codesign.run --mode=full4 --out=experiments/results/codesign_4ops    # 4-operation chains
  python -m experiments.codesign.plot --out=experiments/results/codesign                    # the PNG, from JSON

Steps (each skipped when its output is already there, so a rerun resumes):
  1. corpora (task.py): `plain.txt` = plain solutions only; `aggregation.txt` = the same number of documents, a
     fraction of them aggregation examples (C candidate tails, some wrong -> the correct solution), as ZAYA1's SFT
     mixed workflow prompts into its data. Evaluation questions are excluded from both. One char-level tokenizer
     (a byte-level BPE without merges: characters are tokens) serves both models.
  2. two trainings through `zaya_jax.train.loop.train`, the registered `tiny` preset plus overrides, same steps,
     batch, seed and model: `runs/plain`, `runs/aggregation` (Orbax resumes an interrupted training).
  3. evaluation of both on the same held-out problems, sampling at `temperature`:
       sample      N_maj independent samples (one decode call): single-sample accuracy (their mean correctness) and
                   majority@k over the first k, k = 1, 2, 4, ...
       rsa         RSAConfig.rsa: N, C, full candidates (τ = β), rounds 0..T
       markovian   RSAConfig(N, C, T, τ, β): tails of τ tokens, rounds 0..T
     Round r of a T-round run is the run stopped after round r (round r draws from fold_in(key, r) only), so one
     run gives every T' <= T. Accuracy of an RSA round is the mean correctness of its population (the ZAYA1 report's
     metric); the majority vote over it is recorded beside. Generated tokens per problem count decode tokens only.
     Per-problem results go to `evals/<model>/<method>.jsonl` (appended per problem: a rerun skips done problems).
  4. `results.jsonl` (one line per model, method, budget: accuracy with a 95% bootstrap CI over problems, tokens,
     seeds and configs), `comparison.json` (gains of Markovian RSA over one sample, per model, and their difference
     with a paired bootstrap CI), `table.md` made from those two files, `run.json` (configs, timings, machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

from experiments.codesign import task
from experiments.common import (
  drop_cut_last_line,
  git_commit,
  quiet_library_logging,
  read_jsonl,
  settings_key,
  write_json,
  write_text,
)
from zaya_jax.train.experiment import changed_settings, jsonable, setting_at

FLAGS = flags.FLAGS
MODELS = ("plain", "aggregation")
METHODS = ("sample", "rsa", "markovian")


@dataclasses.dataclass(frozen=True)
class Mode:
  """Everything one run of the study depends on (saved in run.json and with every result line)."""

  name: str
  task: task.TaskConfig = dataclasses.field(default_factory=task.TaskConfig)
  corpus_docs: int = 60_000  # documents per training corpus (the pipeline repeats it if the steps need more)
  aggregation_fraction: float = 0.25  # of the aggregation model's documents
  steps: int = 3000
  batch_size: int = 8
  seq_len: int = 448  # the longest document (an aggregation example with 4 whole candidates) is 421 tokens
  lr: float = 3e-3
  warmup_steps: int = 100
  model_overrides: tuple[str, ...] = ()  # dotted overrides of the model, e.g. "model.hidden_size=128"
  problems: int = 160  # evaluation problems (the CI is over these)
  n_sample: int = 24  # independent samples of the `sample` method (majority@k for k up to this)
  n: int = 8  # RSA population
  c: int = 4  # candidates per aggregation prompt
  t: int = 3  # aggregation rounds evaluated (every round 0..t is reported)
  beta: int = 96  # decode budget per call (tokens = characters): longer than any correct solution
  temperature: float = 1.0  # the report's TTC sampling: temperature 1, top-p 1
  data_seed: int = 1
  train_seed: int = 0
  eval_seed: int = 2
  bootstrap: int = 2000

  def __post_init__(self):
    if self.beta <= self.task.max_solution_chars:
      raise ValueError(f"Mode.beta = {self.beta} must exceed the longest solution ({self.task.max_solution_chars})")
    if self.task.c != self.c:
      raise ValueError(f"Mode.c = {self.c} but the training examples use TaskConfig.c = {self.task.c}")
    if self.task.tau > self.beta:
      raise ValueError(f"TaskConfig.tau = {self.task.tau} > Mode.beta = {self.beta}")


MODES = {
    # A smoke run (< 10 min on 2 shared cores): 120 steps teach the format, not the arithmetic; 24 problems.
    "quick": Mode(name="quick", corpus_docs=4000, steps=120, problems=24, t=2, warmup_steps=20),
    # < 90 min on 2 shared cores: 3000 steps of 3584 tokens per model, 160 problems.
    "full": Mode(name="full", steps=3000),
    # The full study on chains of 3 operations, added after "full" (5 operations) left the plain model at 12.7%
    # single-sample accuracy against 10% by chance: too little for aggregation to work with. Same everything else.
    "full3": Mode(name="full3", task=task.TaskConfig(min_ops=3, max_ops=3), steps=3000),
    # And on 4-operation chains, added after "full3" left both models at 96-98% single-sample accuracy: no headroom.
    # The difficulty was chosen from single-sample accuracy alone, between chance (5 operations) and ceiling (3).
    "full4": Mode(name="full4", task=task.TaskConfig(min_ops=4, max_ops=4), steps=3000),
}


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def bootstrap_ci(values_P: np.ndarray, rounds: int, seed: int, level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap CI of the mean over problems (resampling problems with replacement)."""
  values_P = np.asarray(values_P, np.float64)
  if len(values_P) == 0:
    return (float("nan"), float("nan"))
  rng = np.random.default_rng(seed)
  means_B = values_P[rng.integers(0, len(values_P), size=(rounds, len(values_P)))].mean(axis=1)
  lo, hi = np.quantile(means_B, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (for 0/1 per-problem outcomes)."""
  if n == 0:
    return (float("nan"), float("nan"))
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return float(centre - half), float(centre + half)


# ---------------------------------------------------------------------------------------------------------------
# 1. Corpora and tokenizer


def eval_problems(mode: Mode) -> list[task.Problem]:
  return task.problems(mode.eval_seed, mode.problems, mode.task)


def build_corpora(mode: Mode, out: str, log: Callable[[str], None]) -> dict[str, str]:
  """corpora/<model>.txt and tokenizer/tokenizer.json; kept when already written for the same settings."""
  folder = os.path.join(out, "corpora")
  os.makedirs(folder, exist_ok=True)
  meta_path = os.path.join(folder, "meta.json")
  meta = {"task": jsonable(dataclasses.asdict(mode.task)), "corpus_docs": mode.corpus_docs,
          "data_seed": mode.data_seed, "aggregation_fraction": mode.aggregation_fraction, "eval_seed": mode.eval_seed,
          "problems": mode.problems}
  paths = {m: os.path.join(folder, f"{m}.txt") for m in MODELS}
  tokenizer_path = os.path.join(out, "tokenizer", "tokenizer.json")
  if os.path.exists(meta_path) and all(os.path.exists(p) for p in [*paths.values(), tokenizer_path]):
    with open(meta_path) as f:
      if json.load(f) == meta:
        return {**paths, "tokenizer": tokenizer_path}
    raise ValueError(f"{folder} was written for other settings; use another --out or delete it")
  exclude = {p.question for p in eval_problems(mode)}
  t0 = time.perf_counter()
  # Same seed for both corpora: the plain model's documents are the other's with the aggregation examples replaced
  # by plain solutions of other problems (so both see the same number of documents per epoch).
  docs = {"plain": task.training_documents(mode.data_seed, mode.corpus_docs, mode.task, 0.0, exclude),
          "aggregation": task.training_documents(mode.data_seed, mode.corpus_docs, mode.task,
                                                 mode.aggregation_fraction, exclude)}
  for m in MODELS:
    task.write_corpus(paths[m], docs[m])
  from zaya_jax.tokenizer import train_bpe

  # 256 byte tokens + <pad> + <eos> and no merges: every character is one token, so τ-tails cut by tokens at
  # evaluation are exactly the character tails of the training examples, and digits are never merged.
  train_bpe(iter(docs["aggregation"][:2000]), 258, tokenizer_path)
  for m in MODELS:
    chars = sum(map(len, docs[m]))
    meta[f"{m}_chars"] = chars
    log(f"corpus {m}: {len(docs[m])} documents, {chars:,} characters")
  meta["seconds"] = round(time.perf_counter() - t0, 2)
  write_json(meta_path, {k: v for k, v in meta.items() if not k.endswith(("_chars", "seconds"))})
  write_json(os.path.join(folder, "stats.json"), meta)
  return {**paths, "tokenizer": tokenizer_path}


# ---------------------------------------------------------------------------------------------------------------
# 2. Training


def experiment_config(mode: Mode, corpus: str, tokenizer: str):
  """The registered `tiny` preset with the study's overrides (one source of truth: both models differ only in
  data.paths)."""
  from zaya_jax.train.experiment import get_experiment, override

  sample_prompt = task.plain_prompt(eval_problems(mode)[0].question) if mode.problems else "Q:1+2\nA:"
  return override(get_experiment("tiny"), [
      "model.vocab_size=272",  # 258 tokens, rounded up to a multiple of 16
      f"data.paths=({corpus!r},)", f"data.tokenizer={tokenizer!r}", "data.vocab_size=258",
      f"data.doc_separator={task.DOC_SEPARATOR!r}", f"data.seq_len={mode.seq_len}",
      f"data.batch_size={mode.batch_size}", f"data.seed={mode.data_seed}", "data.eval_fraction=0.01",
      f"optimizer.lr={mode.lr}", f"optimizer.warmup_steps={mode.warmup_steps}",
      f"loop.steps={mode.steps}", f"loop.seed={mode.train_seed}", f"loop.log_every={max(1, mode.steps // 10)}",
      "loop.eval_every=0", "loop.eval_batches=4", f"loop.checkpoint_every={max(1, mode.steps // 3)}",
      "loop.max_to_keep=1", "loop.sample_tokens=48", f"loop.sample_prompt={sample_prompt!r}",
      *mode.model_overrides])


def train_model(mode: Mode, name: str, corpora: dict[str, str], out: str, log) -> dict:
  """Trains runs/<name> (or resumes it); a finished run has train_done.json and is not touched again."""
  from zaya_jax.train.experiment import save_json, to_dict
  from zaya_jax.train.loop import train

  workdir = os.path.join(out, "runs", name)
  done_path = os.path.join(workdir, "train_done.json")
  cfg = experiment_config(mode, corpora[name], corpora["tokenizer"])
  # experiment.json is written when training ends, the loop's config.json when it starts: a run killed part-way
  # must not be continued with other settings either.
  for saved in ("experiment.json", "config.json"):
    if os.path.exists(os.path.join(workdir, saved)):
      with open(os.path.join(workdir, saved)) as f:
        # The corpus and tokenizer paths lie under --out: the same folder named another way is the same run (the
        # corpora themselves are run.json's business).
        changed = sorted(name for name in changed_settings(json.load(f), jsonable(to_dict(cfg)))
                         if name not in ("data.paths", "data.tokenizer"))
      if changed:
        raise ValueError(f"{workdir} was trained with another config ({', '.join(changed)}); use another --out or "
                         "delete it")
      break
  if os.path.exists(done_path):
    with open(done_path) as f:
      done = json.load(f)
    done.pop("config_key", None)  # written by an earlier version of this script
    log(f"train {name}: done already ({done['seconds']:.0f} s), in {done_path} (--out=<another folder> runs it "
        "afresh)")
    return done
  t0 = time.perf_counter()
  result = train(cfg, workdir, log=lambda line: log(f"[{name}] {line}"))
  if result.preempted:
    raise SystemExit(f"training of {name} was preempted (SIGTERM); rerun to resume")
  done = {"steps": result.final_step, "last_loss": result.last_loss,
          "eval_loss": result.eval_loss, "sample": result.sample, "resumed_from": result.resumed_from,
          "seconds": time.perf_counter() - t0}
  save_json(cfg, os.path.join(workdir, "experiment.json"))
  write_json(done_path, done)
  return done


# ---------------------------------------------------------------------------------------------------------------
# 3. Evaluation


def rsa_configs(mode: Mode, eos: int, pad: int) -> dict:
  """The sampler settings of each method. Tails end before the EOS token the decoder keeps (end_think = eos), so
  a tail is the last τ characters of the solution text, as in training."""
  from zaya_jax.infer import rsa

  q_max = mode.task.max_question_chars
  common = dict(tail_source="reasoning", end_think=(eos,), q_max=q_max, pad_id=pad, seed=mode.eval_seed)
  return {
      # c = 1, τ = 1: only round 0 runs (t = 0), so the tail settings only size the (unused) aggregation capacity.
      "sample": rsa.RSAConfig(n=mode.n_sample, c=1, t=0, tau=1, beta=mode.beta, **common),
      "rsa": rsa.RSAConfig.rsa(n=mode.n, c=mode.c, t=mode.t, beta=mode.beta, **common),
      "markovian": rsa.RSAConfig(n=mode.n, c=mode.c, t=mode.t, tau=mode.task.tau, beta=mode.beta, **common),
  }


def _round_record(r: int, state, tokenizer, problem: task.Problem) -> dict:
  from zaya_jax.infer import answers, rsa

  texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rsa.pool_sequences(state)]
  got = [answers.extract_boxed(t) for t in texts]
  gold = problem.answer
  return {"round": r, "generated": int(np.asarray(state.generated_R)[: r + 1].sum()),
          "lengths": np.asarray(state.pool_len_N).tolist(), "answers": got,
          "mean_correct": answers.mean_correct(got, gold), "majority": answers.majority_at_n(got, gold),
          "pass": answers.pass_at_n(got, gold), "example": texts[0]}


def evaluate_model(mode: Mode, name: str, out: str, log) -> dict[str, float]:
  """evals/<name>/<method>.jsonl, one line per problem; problems already there are skipped. Returns seconds spent
  per method (this launch)."""
  import jax

  from zaya_jax.infer import rsa
  from zaya_jax.infer.generate import make_decode_fn, pad_id
  from zaya_jax.infer.sampling import SamplingConfig
  from zaya_jax.train.checkpointing import load_run

  folder = os.path.join(out, "evals", name)
  wanted = set(range(mode.problems))
  if all(wanted <= {r["problem"] for r in read_jsonl(os.path.join(folder, f"{m}.jsonl"))} for m in METHODS):
    return {}  # nothing to do: skip restoring the model (run.json already guards the settings)
  model, tokenizer, _ = load_run(os.path.join(out, "runs", name))
  eos = tokenizer.eos_id
  encode = lambda s: tokenizer.encode(s)
  configs = rsa_configs(mode, eos, pad_id(model))
  sampling = SamplingConfig(temperature=mode.temperature)
  probs = eval_problems(mode)
  os.makedirs(folder, exist_ok=True)
  seconds = {}
  for m_index, method in enumerate(METHODS):
    cfg = configs[method]
    pieces = task.prompt_pieces(encode, cfg.c)
    # RSAConfig.stop_ids came after the first studies: left out at its default, so their recorded settings match.
    rsa_meta = {k: v for k, v in dataclasses.asdict(cfg).items() if (k, v) != ("stop_ids", ())}
    meta = {"method": method, "rsa": rsa_meta, "pieces": dataclasses.asdict(pieces),
            "temperature": mode.temperature, "eval_seed": mode.eval_seed, "problems_seed": mode.eval_seed}
    path = os.path.join(folder, f"{method}.jsonl")
    rows = [r for r in read_jsonl(path)]
    if rows and rows[0].get("meta_key") != settings_key(meta):
      raise ValueError(f"{path} was written with other settings; use another --out or delete it")
    done = {r["problem"] for r in rows}
    todo = [i for i in range(len(probs)) if i not in done]
    if not todo:
      continue
    decode_fn = make_decode_fn(model, sampling=sampling, stop_token_ids=(eos,), max_len=rsa.context_bound(cfg, pieces))
    base = jax.random.fold_in(jax.random.key(mode.eval_seed), m_index)
    t0 = time.perf_counter()
    drop_cut_last_line(path)
    with open(path, "a") as f:
      for count, i in enumerate(todo):
        problem = probs[i]
        rounds = []
        rsa.run_loop(cfg, pieces, decode_fn, encode(problem.question), jax.random.fold_in(base, i),
                     on_round=lambda r, s, p=problem, out=rounds: out.append(_round_record(r, s, tokenizer, p)))
        f.write(json.dumps({"meta_key": settings_key(meta), "meta": meta if i == todo[0] else None, "problem": i,
                            "question": problem.question, "answer": problem.answer, "rounds": rounds}) + "\n")
        f.flush()
        if count in (0, len(todo) - 1) or (count + 1) % max(1, len(todo) // 4) == 0:
          log(f"eval {name}/{method}: {count + 1}/{len(todo)} problems, {time.perf_counter() - t0:.0f} s")
    seconds[method] = time.perf_counter() - t0
  return seconds


# ---------------------------------------------------------------------------------------------------------------
# 4. Summaries


def _majority(answers_list, gold) -> float:
  from zaya_jax.infer import answers

  return answers.majority_at_n(answers_list, gold)


def per_problem_points(rows: list[dict], method: str, mode: Mode) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
  """{point name: (accuracy per problem, generated tokens per problem, description)} for one method's rows."""
  points = {}
  if method == "sample":
    r0 = [row["rounds"][0] for row in rows]
    points["single"] = (np.array([r["mean_correct"] for r in r0]),
                        np.array([np.mean(r["lengths"]) for r in r0]),
                        {"method": "single", "n": 1, "metric": f"mean correctness of {mode.n_sample} samples"})
    ks = sorted({k for k in (1, 2, 4, 8, 16, mode.n_sample) if k <= mode.n_sample})
    for k in ks:
      points[f"majority@{k}"] = (
          np.array([_majority(r["answers"][:k], row["answer"]) for r, row in zip(r0, rows)]),
          np.array([float(np.sum(r["lengths"][:k])) for r in r0]),
          {"method": "majority", "n": k, "metric": "majority vote correct"})
    return points
  for r in range(len(rows[0]["rounds"])):
    rr = [row["rounds"][r] for row in rows]
    desc = {"method": method, "n": mode.n, "c": mode.c, "t": r,
            "tau": mode.task.tau if method == "markovian" else mode.beta, "beta": mode.beta}
    tokens = np.array([x["generated"] for x in rr], np.float64)
    points[f"{method} T={r}"] = (np.array([x["mean_correct"] for x in rr]), tokens,
                                 {**desc, "metric": "mean correctness of the final population"})
    points[f"{method} T={r} vote"] = (np.array([x["majority"] for x in rr]), tokens,
                                      {**desc, "metric": "majority vote over the final population"})
  return points


def majority_at_matched_tokens(sample_rows: list[dict], budget_P: np.ndarray, mode: Mode):
  """Majority voting held to a per-problem token budget (another method's generated tokens on that problem): the
  first k samples whose lengths sum to at most the budget (k >= 1, k <= n_sample). (accuracy, tokens, k) per problem."""
  acc, tokens, ks = [], [], []
  for row, budget in zip(sample_rows, budget_P, strict=True):
    r0 = row["rounds"][0]
    spent = np.cumsum(r0["lengths"][:mode.n_sample])
    k = max(1, int(np.searchsorted(spent, budget, side="right")))
    acc.append(_majority(r0["answers"][:k], row["answer"]))
    tokens.append(float(spent[k - 1]))
    ks.append(k)
  return np.array(acc), np.array(tokens), np.array(ks)


def summarize(mode: Mode, out: str, extra: dict) -> tuple[list[dict], dict]:
  """results.jsonl, comparison.json and table.md from the per-problem files."""
  lines, per_problem = [], {}
  final = f"markovian T={mode.t}"
  for name in MODELS:
    sample_rows = None
    for method in METHODS:
      rows = sorted(read_jsonl(os.path.join(out, "evals", name, f"{method}.jsonl")), key=lambda r: r["problem"])
      rows = [r for r in rows if r["problem"] < mode.problems]
      if not rows:
        continue
      meta = next((r["meta"] for r in rows if r.get("meta")), None)
      points = per_problem_points(rows, method, mode)
      if method == "sample":
        sample_rows = rows
      elif method == "markovian" and final in points and sample_rows is not None and len(sample_rows) == len(rows):
        # Majority voting on the same per-problem tokens as the final Markovian round (METHODS puts samples first).
        acc_P, tok_P, k_P = majority_at_matched_tokens(sample_rows, points[final][1], mode)
        points[f"majority at {final} tokens"] = (acc_P, tok_P, {
            "method": "majority_matched", "n": float(k_P.mean()), "metric": "majority vote correct",
            "matched_to": final, "samples_min_max": [int(k_P.min()), int(k_P.max())],
            "budget_over_all_samples": float(np.mean(k_P == mode.n_sample))})
      ids_P = np.array([r["problem"] for r in rows])
      for point, (acc_P, tok_P, desc) in points.items():
        per_problem[(name, point)] = (acc_P, tok_P, ids_P)
        seed = int(settings_key([name, point])[:8], 16)
        binary = bool(np.all((acc_P == 0) | (acc_P == 1)))
        line = {"model": name, "point": point, **desc, "problems": len(acc_P),
                "accuracy": float(acc_P.mean()), "ci95": bootstrap_ci(acc_P, mode.bootstrap, seed),
                "ci_kind": "percentile bootstrap over problems", "tokens_per_problem": float(tok_P.mean()),
                "temperature": mode.temperature, "eval_seed": mode.eval_seed, "train_seed": mode.train_seed,
                "data_seed": mode.data_seed, "mode": mode.name, "sampler": meta and meta["rsa"]}
        if binary:
          line["wilson95"] = wilson_ci(float(acc_P.sum()), len(acc_P))
        lines.append(line)
  with open(os.path.join(out, "results.jsonl.tmp"), "w") as f:
    for line in lines:
      f.write(json.dumps(line, sort_keys=True) + "\n")
  os.replace(os.path.join(out, "results.jsonl.tmp"), os.path.join(out, "results.jsonl"))

  comparison = {"mode": mode.name, "bootstrap": mode.bootstrap, "models": {}, **extra}
  pairs = {"markovian_vs_single": (final, "single"),
           # Majority over all n_sample samples: the same generation calls as N per round x (T + 1) rounds only
           # when those make n_sample (the quick mode; full modes: 32 vs 24). Then majority on the same tokens,
           # problem by problem.
           "markovian_vs_majority_same_calls": (final, f"majority@{mode.n_sample}"),
           "markovian_vs_majority_same_tokens": (final, f"majority at {final} tokens"),
           "rsa_vs_single": (f"rsa T={mode.t}", "single"),
           "markovian_T2_vs_single": ("markovian T=2", "single")}
  if mode.t == 2:
    del pairs["markovian_T2_vs_single"]  # the same comparison as markovian_vs_single
  gains = {}
  for name in MODELS:
    comparison["models"][name] = {}
    for label, (a, b) in pairs.items():
      if (name, a) not in per_problem or (name, b) not in per_problem:
        continue
      (acc_a, tok_a, ids_a), (acc_b, tok_b, ids_b) = per_problem[(name, a)], per_problem[(name, b)]
      ids_P, in_a, in_b = np.intersect1d(ids_a, ids_b, return_indices=True)  # paired: the problems both have
      if not len(ids_P):
        continue
      g_P = acc_a[in_a] - acc_b[in_b]
      gains[(name, label)] = (g_P, ids_P)
      comparison["models"][name][label] = {
          "gain": float(g_P.mean()), "ci95": bootstrap_ci(g_P, mode.bootstrap, 7), "a": a, "b": b,
          "problems": len(ids_P), "tokens_a": float(tok_a[in_a].mean()), "tokens_b": float(tok_b[in_b].mean())}
  comparison["difference_aggregation_minus_plain"] = {}
  for label in pairs:
    if ("plain", label) in gains and ("aggregation", label) in gains:
      (g_agg, ids_agg), (g_plain, ids_plain) = gains[("aggregation", label)], gains[("plain", label)]
      _, in_agg, in_plain = np.intersect1d(ids_agg, ids_plain, return_indices=True)
      d_P = g_agg[in_agg] - g_plain[in_plain]  # same problems, paired
      if not len(d_P):
        continue
      comparison["difference_aggregation_minus_plain"][label] = {
          "difference": float(d_P.mean()), "ci95": bootstrap_ci(d_P, mode.bootstrap, 11)}
  write_json(os.path.join(out, "comparison.json"), comparison)
  write_table(out)
  return lines, comparison


def _fmt(acc, ci) -> str:
  return f"{100 * acc:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def write_table(out: str) -> str:
  """table.md from results.jsonl and comparison.json only (every number in it is in those files)."""
  lines = read_jsonl(os.path.join(out, "results.jsonl"))
  with open(os.path.join(out, "comparison.json")) as f:
    comparison = json.load(f)
  by = {(r["model"], r["point"]): r for r in lines}
  points = list(dict.fromkeys(r["point"] for r in lines))
  md = [f"Accuracy % [95% bootstrap CI over {lines[0]['problems'] if lines else 0} problems] and generated tokens "
        "per problem (mode " + str(comparison.get("mode")) + "; from results.jsonl).", "",
        "| method | plain: accuracy | plain: tokens | aggregation-trained: accuracy | aggregation-trained: tokens |",
        "|---|---|---|---|---|"]
  for p in points:
    cells = []
    for name in MODELS:
      r = by.get((name, p))
      cells += ["–", "–"] if r is None else [_fmt(r["accuracy"], r["ci95"]), f"{r['tokens_per_problem']:.0f}"]
    md.append(f"| {p} | " + " | ".join(cells) + " |")
  md += ["", "Gains in accuracy points [95% paired bootstrap CI] (from comparison.json):", "",
         "| comparison | plain | aggregation-trained | difference (aggregation - plain) |", "|---|---|---|---|"]
  for label in ("markovian_vs_single", "markovian_T2_vs_single", "markovian_vs_majority_same_calls",
                "markovian_vs_majority_same_tokens", "rsa_vs_single"):
    cells = []
    for name in MODELS:
      g = comparison["models"].get(name, {}).get(label)
      cells.append("–" if g is None else _fmt(g["gain"], g["ci95"]))
    d = comparison["difference_aggregation_minus_plain"].get(label)
    if d is None and all(c == "–" for c in cells):
      continue  # not measured in this mode (e.g. T=2 when t = 2 is the final round already)
    cells.append("–" if d is None else _fmt(d["difference"], d["ci95"]))
    example = next((comparison["models"][n][label] for n in MODELS if label in comparison["models"].get(n, {})), None)
    name = label if example is None else f"{example['a']} - {example['b']}"
    md.append(f"| {name} | " + " | ".join(cells) + " |")
  text = "\n".join(md) + "\n"
  write_text(os.path.join(out, "table.md"), text)
  return text


# ---------------------------------------------------------------------------------------------------------------
# Driver


def seeds_of(mode: Mode) -> dict:
  return {"seeds": {"data": mode.data_seed, "train": mode.train_seed, "eval": mode.eval_seed}}


def previous_run(out: str, mode: Mode) -> dict:
  """run.json of the study in `out` ({} for a new folder); ValueError when it was run with other settings."""
  run_path = os.path.join(out, "run.json")
  previous = json.load(open(run_path)) if os.path.exists(run_path) else {}
  now = jsonable(dataclasses.asdict(mode))
  if previous and previous.get("mode") != now:
    saved = previous.get("mode", {})
    differing = [f"{name} {setting_at(saved, name)!r} (now {setting_at(now, name)!r})"
                 for name in changed_settings(saved, now)] or ["fields added or removed since"]
    raise ValueError(f"{out} holds a run of other settings (run.json: {', '.join(differing)}); pass the settings it "
                     "was run with, or use another --out")
  return previous


def run(mode: Mode, out: str, log=print) -> dict:
  """The whole study for `mode` into `out` (resumable). Returns comparison.json's contents."""
  import jax

  os.makedirs(out, exist_ok=True)
  t_start = time.perf_counter()
  commit = git_commit()  # the code this process runs: taken now, before anyone edits the checkout during the run
  previous = previous_run(out, mode)
  timings = dict(previous.get("seconds", {}))
  t0 = time.perf_counter()
  corpora = build_corpora(mode, out, log)
  timings.setdefault("corpora", time.perf_counter() - t0)
  trainings = {}
  for name in MODELS:
    trainings[name] = train_model(mode, name, corpora, out, log)
    timings[f"train_{name}"] = trainings[name]["seconds"]
  for name in MODELS:
    for method, s in evaluate_model(mode, name, out, log).items():
      timings[f"eval_{name}_{method}"] = timings.get(f"eval_{name}_{method}", 0.0) + s
  # Every launch's wall time (after imports), so a resumed run still shows what the first launch cost.
  timings["launches"] = [*timings.get("launches", []), round(time.perf_counter() - t_start, 2)]
  commits = [*previous.get("launch_commits", []), commit]  # one per launch, as "launches"
  info = {"mode": dataclasses.asdict(mode), "seconds": timings, "commit": commits[0], "launch_commits": commits,
          "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                      "jax": jax.__version__, "load_average": os.getloadavg()},
          "trainings": trainings}
  write_json(os.path.join(out, "run.json"), info)
  _, comparison = summarize(mode, out, seeds_of(mode))
  log(open(os.path.join(out, "table.md")).read())
  return comparison


def define_flags() -> None:
  """Flags are defined only when this module is the program (plot.py has an --out of its own)."""
  flags.DEFINE_enum("mode", "quick", sorted(MODES), "quick: a < 10 min smoke run; full: the < 90 min study; "
                    "full3 / full4: the same on 3- / 4-operation chains.")
  flags.DEFINE_string("out", None, "Output folder (corpora, runs, evals, results.jsonl, table.md); a rerun resumes. "
                      "Default: experiments/results/codesign_<mode>.")
  flags.DEFINE_integer("problems", None, "Override the number of evaluation problems of the mode.")
  flags.DEFINE_integer("steps", None, "Override the training steps of the mode.")
  flags.DEFINE_bool("summarize_only", False, "Rebuild results.jsonl, comparison.json and table.md from the folder's "
                    "evals/ (nothing trained or evaluated, run.json untouched).")


def main(argv):
  del argv
  quiet_library_logging()
  from zaya_jax import host_memory

  host_memory.retain_freed_memory()  # the runs' step temporaries stay mapped (zaya_jax/host_memory.py)
  mode = MODES[FLAGS.mode]
  if FLAGS.problems is not None:
    mode = dataclasses.replace(mode, problems=FLAGS.problems)
  if FLAGS.steps is not None:
    mode = dataclasses.replace(mode, steps=FLAGS.steps)
  out = FLAGS.out or os.path.join("experiments", "results", f"codesign_{mode.name}")
  random.seed(0)  # nothing here should depend on it; pinned so an accidental use is at least reproducible
  try:
    if FLAGS.summarize_only:
      if not previous_run(out, mode):
        raise ValueError(f"{out} holds no study (no run.json) to summarize")
      summarize(mode, out, seeds_of(mode))  # the folder's own settings: a quick summary would overwrite a full one
      print(open(os.path.join(out, "table.md")).read())
      return 0
    run(mode, out)
  except (ValueError, FileNotFoundError) as e:  # settings, folders, a study's files: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
