"""The co-design study (experiments/codesign): the task generator, the aggregation examples, the prompt pieces the
evaluation splices, the statistics, and the whole pipeline end to end at toy size (trains two models for a few
steps, evaluates every method, writes JSON + table, plots, and resumes without redoing anything)."""

import dataclasses
import json
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.codesign import plot, run, task
from experiments.common import read_jsonl
from zaya_jax.infer import answers, rsa
from zaya_jax.tokenizer import train_bpe
from zaya_jax.train.text_corpus import text_documents

CFG = task.TaskConfig()


def _evaluate(question: str, modulus: int = 10) -> int:
  """The question evaluated left to right, written independently of task.py."""
  value = int(question[0])
  for i in range(1, len(question), 2):
    op, d = question[i], int(question[i + 1])
    value = {"+": value + d, "-": value - d, "*": value * d}[op] % modulus
  return value


def test_problems_are_deterministic_in_the_seed_and_distinct():
  a, b, c = task.problems(5, 200, CFG), task.problems(5, 200, CFG), task.problems(6, 200, CFG)
  assert a == b
  assert [p.question for p in a] != [p.question for p in c]
  assert len({p.question for p in a}) == 200
  assert task.training_documents(3, 50, CFG, 0.5) == task.training_documents(3, 50, CFG, 0.5)
  assert task.training_documents(3, 50, CFG, 0.5) != task.training_documents(4, 50, CFG, 0.5)


def test_solutions_are_checkable_and_have_equal_line_widths():
  for p in task.problems(0, 300, dataclasses.replace(CFG, min_ops=2, max_ops=7)):
    assert p.answer == str(_evaluate(p.question))
    text = task.solution(p)
    assert task.is_correct(text, p) and answers.extract_boxed(text) == p.answer
    lines = (task.plain_prompt(p.question) + text).split("\n")[:-1]  # the boxed answer is the last line
    assert len({len(line) for line in lines}) == 1, lines  # every operand sits one line above its step
    assert len(text) <= dataclasses.replace(CFG, max_ops=7).max_solution_chars
  wrong = [task.is_correct(task.wrong_solution(random.Random(i), p), p)
           for i, p in enumerate(task.problems(1, 400, CFG))]
  assert 0 < sum(wrong) < 0.3 * len(wrong)  # a slip is nearly always a wrong answer, occasionally absorbed (*5, ...)
  assert not task.is_correct("no answer", task.problems(0, 1, CFG)[0])


def test_aggregation_examples_are_well_formed():
  rng = random.Random(0)
  seen_tau = set()
  n_wrong = 0
  for p in task.problems(2, 200, CFG):
    ex = task.aggregation_example(rng, p, CFG)
    seen_tau.add(ex.tau)
    assert len(ex.candidates) == CFG.c == len(ex.wrong)
    assert ex.wrong == tuple(not task.is_correct(c, p) for c in ex.candidates)
    n_wrong += sum(ex.wrong)
    for cand, tl in zip(ex.candidates, ex.tails):
      assert cand.endswith(tl) and len(tl) == (len(cand) if ex.tau is None else min(ex.tau, len(cand)))
    assert task.is_correct(ex.target, p) and ex.document == ex.prompt + ex.target
    assert ex.prompt.startswith(task.AGG_PREFIX + p.question) and ex.prompt.endswith(task.ANSWER_MARK)
    expected = task.AGG_PREFIX + p.question + "".join(task.candidate_head(i) + t for i, t in enumerate(ex.tails))
    assert ex.prompt == expected + task.ANSWER_MARK
  assert seen_tau == {None, CFG.tau}  # both RSA (whole) and Markovian (tail) formats are trained
  assert 0.3 < n_wrong / (200 * CFG.c) < 0.7  # p_wrong ~ U(0, 1): about half of the candidates wrong
  docs = task.training_documents(0, 400, CFG, 0.25)
  agg = sum(d.startswith(task.AGG_PREFIX) for d in docs)
  assert 60 < agg < 140 and all(d.startswith((task.AGG_PREFIX, task.QUESTION_PREFIX)) for d in docs)


def test_evaluation_questions_stay_out_of_training_and_the_corpus_round_trips(tmp_path):
  small = dataclasses.replace(CFG, min_ops=1, max_ops=1)  # 10 * 27 = 270 questions: collisions are certain
  held = {p.question for p in task.problems(0, 100, small)}
  docs = task.training_documents(1, 150, small, 0.3, exclude=held)
  questions = {d.split("\n")[0].split(":")[1] for d in docs}
  assert not questions & held and len(questions) == 150
  path = str(tmp_path / "corpus.txt")
  task.write_corpus(path, docs)
  assert [text for _, text in text_documents([path], task.DOC_SEPARATOR)] == docs  # one example = one document
  with pytest.raises(ValueError, match="too small"):
    task.problems(0, 300, small)


def test_device_spliced_prompts_equal_the_training_text(tmp_path):
  """What the model sees at evaluation (pieces + question ids + token tails, spliced by rsa) is token for token the
  prompt it was trained on."""
  docs = task.training_documents(0, 200, CFG, 0.5)
  tok = train_bpe(iter(docs), 258, tmp_path / "tokenizer.json")
  pieces = task.prompt_pieces(tok.encode, CFG.c)
  rng = random.Random(1)
  for p in task.problems(9, 20, CFG):
    q = np.asarray(tok.encode(p.question), np.int32)
    prompt, n = rsa.build_initial_prompt(pieces, jnp.asarray(q), len(q), 64)
    assert np.asarray(prompt)[: int(n)].tolist() == tok.encode(task.plain_prompt(p.question))
    ex = task.aggregation_example(rng, p, dataclasses.replace(CFG, whole_fraction=0.0))
    # The decoder's candidates end in <eos>; the tails (tail_source="reasoning", end_think=(eos,)) stop before it.
    cand = [[*tok.encode(c), tok.eos_id] for c in ex.candidates]
    width = max(map(len, cand))
    pool = np.array([c + [0] * (width - len(c)) for c in cand], np.int32)
    end = rsa.reasoning_end(jnp.asarray(pool), jnp.asarray([len(c) for c in cand]), (tok.eos_id,))
    tails, tail_len = rsa.extract_tails(jnp.asarray(pool), end, CFG.tau)
    prompt, n = rsa.build_aggregation_prompt(pieces, jnp.asarray(q), len(q), tails, tail_len, 512)
    assert np.asarray(prompt)[: int(n)].tolist() == tok.encode(ex.prompt)
    assert tok.encode(ex.document) == tok.encode(ex.prompt) + tok.encode(ex.target)


def test_confidence_intervals():
  values = np.array([1.0] * 30 + [0.0] * 70)
  lo, hi = run.bootstrap_ci(values, 2000, 0)
  assert lo < 0.3 < hi and hi - lo < 0.25
  wl, wh = run.wilson_ci(30, 100)
  assert wl < 0.3 < wh and abs((wh - wl) - (hi - lo)) < 0.05
  assert run.wilson_ci(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and run.wilson_ci(0, 10)[1] > 0.2


TOY = run.Mode(
    name="toy", task=task.TaskConfig(min_ops=2, max_ops=2, c=2, tau=8), corpus_docs=300, aggregation_fraction=0.3,
    steps=6, batch_size=4, seq_len=96, warmup_steps=2, problems=3, n_sample=4, n=4, c=2, t=1, beta=32,
    bootstrap=200)


def test_majority_held_to_another_methods_tokens_per_problem():
  row = {"answer": "2", "rounds": [{"lengths": [10, 20, 30, 40], "answers": ["1", "2", "2", "3"]}]}
  acc, tokens, k = run.majority_at_matched_tokens([row] * 3, np.array([65.0, 5.0, 1000.0]), TOY)
  # 65 tokens: the first 3 samples (60) vote 2; 5: never fewer than one sample (10, voting 1); 1000: all 4 (100).
  np.testing.assert_array_equal(k, [3, 1, 4])
  np.testing.assert_array_equal(tokens, [60.0, 10.0, 100.0])
  np.testing.assert_array_equal(acc, [1.0, 0.0, 1.0])


def test_the_study_end_to_end_and_resumes(tmp_path):
  out = str(tmp_path / "study")
  lines = []
  comparison = run.run(TOY, out, log=lines.append)
  results = read_jsonl(os.path.join(out, "results.jsonl"))
  points = {(r["model"], r["point"]) for r in results}
  for model in run.MODELS:
    assert {(model, p) for p in ("single", "majority@1", "majority@4", "rsa T=0", "rsa T=1", "markovian T=1",
                                 "markovian T=1 vote")} <= points
  for r in results:
    assert r["problems"] == TOY.problems and 0.0 <= r["accuracy"] <= 1.0
    assert r["ci95"][0] <= r["accuracy"] + 1e-9 and r["accuracy"] <= r["ci95"][1] + 1e-9
    assert r["tokens_per_problem"] > 0 and r["eval_seed"] == TOY.eval_seed and r["mode"] == "toy"
  by = {(r["model"], r["point"]): r for r in results}
  for model in run.MODELS:  # more rounds, more samples: more tokens
    assert by[(model, "markovian T=1")]["tokens_per_problem"] > by[(model, "markovian T=0")]["tokens_per_problem"]
    assert by[(model, "majority@4")]["tokens_per_problem"] > by[(model, "majority@1")]["tokens_per_problem"]
    assert by[(model, "markovian T=1")]["sampler"]["tau"] == 8 and by[(model, "rsa T=1")]["sampler"]["tau"] == 32
    matched = by[(model, "majority at markovian T=1 tokens")]
    assert 1 <= matched["n"] <= TOY.n_sample and matched["matched_to"] == "markovian T=1"
  assert set(comparison["models"]) == set(run.MODELS)
  assert {"markovian_vs_majority_same_calls", "markovian_vs_majority_same_tokens"} <= set(comparison["models"]["plain"])
  assert "markovian_vs_single" in comparison["difference_aggregation_minus_plain"]
  table = open(os.path.join(out, "table.md")).read()
  r = by[("aggregation", "markovian T=1")]
  assert "| markovian T=1 |" in table and f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}" in table
  assert run.write_table(out) == table  # the table is a function of the JSON files only
  for model in run.MODELS:
    rows = read_jsonl(os.path.join(out, "evals", model, "markovian.jsonl"))
    assert [row["problem"] for row in rows] == list(range(TOY.problems))
    assert len(rows[0]["rounds"]) == TOY.t + 1 and len(rows[0]["rounds"][0]["answers"]) == TOY.n
  info = json.load(open(os.path.join(out, "run.json")))
  assert info["mode"]["steps"] == TOY.steps and info["trainings"]["plain"]["steps"] == TOY.steps

  png = plot.plot(os.path.join(out, "results.jsonl"), str(tmp_path / "fig.png"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

  # A rerun trains nothing and evaluates nothing (it only rewrites the summaries from the same files).
  before = {m: open(os.path.join(out, "evals", m, "sample.jsonl")).read() for m in run.MODELS}
  lines.clear()
  run.run(TOY, out, log=lines.append)
  assert any("done already" in line for line in lines) and not any(line.startswith("eval ") for line in lines)
  assert {m: open(os.path.join(out, "evals", m, "sample.jsonl")).read() for m in run.MODELS} == before
  assert read_jsonl(os.path.join(out, "results.jsonl")) == results
  with pytest.raises(ValueError, match=rf"other settings \(run.json: temperature {TOY.temperature!r} \(now 0.5\)\)"):
    run.run(dataclasses.replace(TOY, temperature=0.5), out, log=lines.append)
  with pytest.raises(ValueError, match=rf"other settings \(run.json: problems {TOY.problems} \(now {TOY.problems + 1}"):
    run.previous_run(out, dataclasses.replace(TOY, problems=TOY.problems + 1))  # --summarize_only checks it too
  # Killed mid-training (no train_done.json, no run.json yet): a relaunch with other training settings is refused by
  # the loop's config.json, not continued from the checkpoint.
  finished = [os.path.join(out, "run.json"), *(os.path.join(out, "runs", "plain", name)
                                                for name in ("train_done.json", "experiment.json"))]
  kept = {path: open(path, "rb").read() for path in finished}
  for path in finished:
    os.remove(path)
  with pytest.raises(ValueError, match=r"runs/plain was trained with another config "
                                       r"\(loop.checkpoint_every, loop.steps\)"):
    run.train_model(dataclasses.replace(TOY, steps=TOY.steps + 3), "plain", run.build_corpora(TOY, out, print), out,
                    print)
  for path, data in kept.items():
    open(path, "wb").write(data)

  # One method evaluated on fewer problems (a summary mid-study): gains pair only the problems both points have.
  path = os.path.join(out, "evals", "plain", "markovian.jsonl")
  first = read_jsonl(path)[0]
  with open(path, "w") as f:
    f.write(json.dumps(first) + "\n")
  _, partial = run.summarize(TOY, out, run.seeds_of(TOY))
  assert partial["models"]["plain"]["markovian_vs_single"]["problems"] == 1
  assert partial["models"]["aggregation"]["markovian_vs_single"]["problems"] == TOY.problems
