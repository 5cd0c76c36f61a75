"""The inference command lines (launch/generate.py, launch/rsa.py) and their shared code (zaya_jax.infer.cli).

Fixtures: a byte-level BPE trained here on three standard-library files (with a chat template in its
tokenizer_config.json); a Hugging Face folder = save_hf of a random ZayaConfig.tiny model + that tokenizer; an Orbax
run directory trained for 12 steps by tests/train_driver.py with the same tokenizer. The training runs in a separate
process started when the module starts, so its ~45 s compile overlaps the other tests; only the route test waits.

Compiles are shared: every generation below has the same shape (2 chat prompts x 2 samples, 8 new tokens, sampled),
and the RSA runs (scripted in-process, the CLI's, the in-process replay) use one RSA config; the subprocesses read the
session's persistent compilation cache (conftest.py), so they compile nothing the module compiled before them.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

import zaya_jax
from zaya_jax.checkpoint.hf import flat_params
from zaya_jax.infer import cli, cli_files, make_decode_fn, rsa_eval
from zaya_jax.infer import prompts as P
from zaya_jax.infer.generate import GenerateOutput
from zaya_jax.infer.rsa import context_bound
from zaya_jax.infer.sampling import SamplingConfig
from zaya_jax.model.decoder import abstract_model
from zaya_jax.tokenizer import train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "train_driver.py")
GENERATE = os.path.join(ROOT, "launch", "generate.py")
RSA = os.path.join(ROOT, "launch", "rsa.py")
STDLIB = sysconfig.get_paths()["stdlib"]
ENV = {**os.environ, "PYTHONPATH": ROOT}  # carries the session's compilation cache (conftest.py)

CHAT_TEMPLATE = ("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
PROMPTS = ["def wrap(text):", "import os"]
GEN = dict(max_new_tokens=8, sampling=SamplingConfig(temperature=1.0), n=2)
CONTEXT = zaya_jax.ZayaConfig.tiny().max_position_embeddings
RSA_FLAGS = dict(n=4, c=2, t=1, tau=8, beta=16)  # the CLI's --q_max default rounds questions up to 64 tokens


def launch(script, *args):
  return subprocess.Popen([sys.executable, script, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def rsa_cfg(**kw):
  return rsa_eval.rsa_config(**{**RSA_FLAGS, "beta_final": None, "tail_source": "all", "end_think": (), "q_max": 64,
                                "max_context": CONTEXT, "pad_id": 0, "seed": 0, **kw})


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus")
  for name in ("textwrap", "glob", "fnmatch"):
    shutil.copy(os.path.join(STDLIB, f"{name}.py"), path)
  return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
  path = tmp_path_factory.mktemp("tokenizer")
  texts = [open(os.path.join(corpus, f)).read()[:4000] for f in sorted(os.listdir(corpus))]
  train_bpe(texts, 512, path / "tokenizer.json")
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<eos>",
                                                          "pad_token": "<pad>"}))
  return path


@pytest.fixture(scope="module", autouse=True)
def training(tmp_path_factory, corpus, tok_dir):
  """Started first, waited for by `run_dir` only."""
  workdir = tmp_path_factory.mktemp("run") / "tiny"
  # 12 steps, a checkpoint every 6: test_train.py's resume program, so that in a full run of the suite the train
  # step compiles once for both files (the session's compilation cache); the steps themselves take milliseconds.
  proc = subprocess.Popen([sys.executable, DRIVER, str(workdir), corpus, "12", "6",
                           f"set=data.tokenizer={tok_dir / 'tokenizer.json'}"], env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  yield proc, workdir
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def run_dir(training):
  proc, workdir = training
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return workdir


def random_model(seed):
  """A tiny model with numpy-drawn weights: flax's initialisers take ~10 s eagerly on a busy 2-core machine."""
  graphdef, state = nnx.split(abstract_model(zaya_jax.ZayaConfig.tiny()))
  rng = np.random.default_rng(seed)
  for key, var in flat_params(state).items():
    if key.endswith("balancing_biases"):
      value = np.zeros(var.shape, np.float32)
      value[-1] = -1.0  # the skip slot unreachable, as transformers loads a checkpoint
    else:
      value = rng.normal(0.0, 0.2, var.shape).astype(np.float32)
    var.set_value(jnp.asarray(value))
  return nnx.merge(graphdef, state)


def _copy_tokenizer(src, dst):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(src, name), dst)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok_dir):
  path = tmp_path_factory.mktemp("hf") / "tiny"
  zaya_jax.save_hf(random_model(seed=1), path)
  _copy_tokenizer(tok_dir, path)
  return path


@pytest.fixture(scope="module")
def hf(hf_dir):
  return cli.load_model(str(hf_dir))


@pytest.fixture(scope="module")
def chat_samples(hf):
  return cli.generate_completions(hf, PROMPTS, chat=cli.chat_format(hf, True), seed=3, **GEN)


# --------------------------------------------------------------------------------------------- loading and inputs


def test_model_paths_that_are_not_models_are_named(tmp_path, hf_dir):
  with pytest.raises(cli.CLIError, match="does not exist"):
    cli.load_model(str(tmp_path / "missing"))
  (tmp_path / "file.txt").write_text("x")
  with pytest.raises(cli.CLIError, match="is a file"):
    cli.load_model(str(tmp_path / "file.txt"))
  with pytest.raises(cli.CLIError, match=r"neither an Orbax run directory.*no config\.json"):
    cli.load_model(str(tmp_path))
  other = tmp_path / "llama"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(cli.CLIError, match=r"neither.*model_type 'llama' and it has no checkpoints/"):
    cli.load_model(str(other))
  # A weights-only HF folder: the message names the missing file, before any weight is read.
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(hf_dir / name, bare)
  with pytest.raises(cli.CLIError, match=f"no tokenizer: {bare / 'tokenizer.json'} is missing"):
    cli.load_model(str(bare))
  run_like = tmp_path / "run_like"
  (run_like / "checkpoints").mkdir(parents=True)
  (run_like / "config.json").write_text("{}")
  assert cli.model_kind(str(run_like)) == "run"
  with pytest.raises(cli.CLIError, match=r"tokenizer\.json is missing"):
    cli.load_model(str(run_like))
  with pytest.raises(cli.CLIError, match=r"config\.json is not a launch/train\.py run config"):
    cli.load_model(str(run_like), tokenizer_path=str(hf_dir))
  loaded = cli.load_model(str(bare), tokenizer_path=str(hf_dir))  # --tokenizer fills the gap
  assert loaded.kind == "hf" and loaded.stop_ids == (1,)
  # A chat model's end-of-turn token is listed in generation_config.json (Gemma 3: [1, 106]): it stops replies too.
  (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
  assert cli.load_model(str(bare), tokenizer_path=str(hf_dir)).stop_ids == (1, 5)
  (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "<end_of_turn>"]}))
  with pytest.raises(cli.CLIError, match=r"generation_config\.json eos_token_id must be token ids"):
    _ = cli.load_model(str(bare), tokenizer_path=str(hf_dir)).stop_ids
  (bare / "generation_config.json").unlink()
  plain = tmp_path / "plain_tokenizer"  # a tokenizer folder without tokenizer_config.json: no chat template
  plain.mkdir()
  shutil.copy(hf_dir / "tokenizer.json", plain)
  with pytest.raises(cli.CLIError, match=r"--chat: .*no chat_template"):
    cli.chat_format(cli.load_model(str(bare), tokenizer_path=str(plain)), True)


def test_prompt_and_problem_files(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("first prompt\n\n  \nsecond {braces}\n")
  assert cli_files.read_prompts(str(txt)) == ["first prompt", "second {braces}"]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "a\\nb"}\n"plain string"\n')
  assert cli_files.read_prompts(str(jsonl)) == ["a\nb", "plain string"]
  jsonl.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
  with pytest.raises(cli.CLIError, match=r"p.jsonl:3: expected \{\"prompt\""):
    cli_files.read_prompts(str(jsonl))
  for blank in ('{"prompt": "   "}\n"b"\n', '"  "\n'):  # a prompt of only whitespace would generate from nothing
    jsonl.write_text(blank)
    with pytest.raises(cli.CLIError, match=r"p.jsonl:1: expected"):
      cli_files.read_prompts(str(jsonl))
  with pytest.raises(cli.CLIError, match=r"expected a \.txt"):
    cli_files.read_prompts(str(tmp_path / "p.csv"))

  problems = tmp_path / "problems.jsonl"
  problems.write_text('{"problem": "one", "answer": "7"}\n\n{"question": "two", "answer": 5}\n{"problem": "three"}\n')
  got = cli_files.read_problems(str(problems))
  assert got == [cli_files.Problem(0, 1, "one", "7"), cli_files.Problem(1, 3, "two", "5"),
                 cli_files.Problem(2, 4, "three", None)]
  for text, words in [
    ('{"problem": "one"}\n{"problem": "two"\n', "problems.jsonl:2: not valid JSON"),
    ('{"problem": "one"}\n["two"]\n', "problems.jsonl:2: expected a JSON object"),
    ('{"answer": "1"}\n', "problems.jsonl:1: needs a non-empty string field \"problem\""),
    ('{"problem": "  "}\n', "problems.jsonl:1: needs a non-empty string field \"problem\""),
    ('{"problem": "one", "answer": [1]}\n', "problems.jsonl:1: \"answer\" must be a string or a number"),
    ('{"problem": "one", "answer": true}\n', "problems.jsonl:1: \"answer\" must be a string or a number"),
    ('{"problem": "one", "answer": " "}\n', "problems.jsonl:1: \"answer\" is empty"),
    ("\n  \n", "is empty"),
  ]:
    problems.write_text(text)
    with pytest.raises(cli.CLIError, match=words):
      cli_files.read_problems(str(problems))
  with pytest.raises(cli.CLIError, match="does not exist"):
    cli_files.read_problems(str(tmp_path / "nope.jsonl"))


def test_flag_validation_names_the_flags():
  with pytest.raises(cli.CLIError, match=r"--c = 5 > --n = 4"):
    rsa_cfg(c=5)
  with pytest.raises(cli.CLIError, match=r"--tau = 32 > --beta = 16"):
    rsa_cfg(tau=32)
  with pytest.raises(cli.CLIError, match="--top_p must lie in"):
    cli.sampling_config(1.0, 0, 0.0)
  with pytest.raises(cli.CLIError, match=r"--top_k must be >= 1, or 0 for no limit; got -3"):
    cli.sampling_config(1.0, -3, 1.0)
  assert cli.sampling_config(0.5, 0, 1.0) == SamplingConfig(0.5, None, 1.0)
  with pytest.raises(cli.CLIError, match=r"--final_top_k must be >= 1, or 0 for no limit; got -1"):
    cli.sampling_config(1.0, -1, 1.0, flag_prefix="final_")
  with pytest.raises(cli.CLIError, match="--final_temperature must be 0"):
    cli.sampling_config(-1.0, 0, 1.0, flag_prefix="final_")


# ------------------------------------------------------------------------------------------------------- generation


def test_generation_is_deterministic_for_a_seed_and_uses_the_chat_template(hf, chat_samples):
  chat = cli.chat_format(hf, True)
  assert cli.encode_prompt(hf.tokenizer, "hi", chat) == hf.tokenizer.encode("User: hi\nAssistant:")
  assert [c.prompt_tokens for c in chat_samples[::2]] == [
    len(hf.tokenizer.encode(f"User: {p}\nAssistant:")) for p in PROMPTS]
  assert [(c.prompt_index, c.sample) for c in chat_samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert all(c.tokens == 8 if not c.stopped else c.tokens <= 8 for c in chat_samples)
  assert len({c.completion for c in chat_samples}) == 4  # each row drew its own tokens
  assert cli.generate_completions(hf, PROMPTS, chat=chat, seed=3, **GEN) == chat_samples
  other = cli.generate_completions(hf, PROMPTS, chat=chat, seed=4, **GEN)
  assert [c.completion for c in other] != [c.completion for c in chat_samples]
  # Too long for the model's 1024 positions: refused before compiling, naming the prompt.
  too_long = r"prompt 2 has \d+ tokens; with --max_new_tokens=8 it needs .* context of 1024"
  with pytest.raises(cli.CLIError, match=too_long):
    cli.generate_completions(hf, ["ok", "word " * 1100], chat=None, seed=0, **GEN)
  need = len(cli.encode_prompt(hf.tokenizer, "ok", chat)) + 1023
  with pytest.raises(cli.CLIError, match=f"prompt 1 has .* --max_new_tokens=1024 it needs {need} positions"):
    cli.generate_completions(hf, ["ok"], chat=chat, seed=0, **{**GEN, "max_new_tokens": 1024})


def test_generate_cli_writes_what_the_library_generates(tmp_path, hf_dir, chat_samples):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n\n" for p in PROMPTS))
  output = tmp_path / "samples.jsonl"
  rc, out, err = finish(launch(GENERATE, f"--model={hf_dir}", f"--prompts_file={prompts}", "--chat", "--n=2",
                               "--max_new_tokens=8", "--temperature=1.0", "--seed=3", f"--output={output}"))
  assert rc == 0, err
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  model = {"model": str(hf_dir), "step": None, "fingerprint": cli.load_model(str(hf_dir)).fingerprint}
  assert rows == [{**c.to_json(), **model} for c in chat_samples]
  assert out.count("=== prompt ") == 4 and "=== prompt 2 'import os', sample 2 (8 tokens" in out
  for c in chat_samples:  # each header says how its sample ended
    end = "stop token" if c.stopped else "budget"
    assert re.search(rf"=== prompt {c.prompt_index + 1} .*, sample {c.sample + 1} \({c.tokens} tokens, ended at the "
                     rf"{end}\) ===", out), (c, out)
  assert f"model: {hf_dir} (Hugging Face folder)" in err
  assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl", "samples.jsonl"]  # no temporary file left behind


def test_a_folder_reads_as_load_hf_reads_it(tmp_path, hf_dir, hf):
  # A legacy-only key beside native weights: load_hf ignores it (as transformers does); the CLIs read config.json
  # through ZayaConfig.from_hf alone, which took the folder for a legacy one and refused it.
  stray = tmp_path / "stray"
  shutil.copytree(hf_dir, stray)
  config = json.loads((stray / "config.json").read_text())
  (stray / "config.json").write_text(json.dumps({**config, "norm_epsilon": 1e-3}))
  with pytest.warns(UserWarning, match="legacy-layout keys"):
    loaded = cli.load_model(str(stray))
  assert loaded.config == hf.config


def test_generate_cli_stops_between_batches_on_sigterm(tmp_path, hf_dir):
  # SIGTERM while the first batch compiles and decodes: it was raised as SystemExit from the handler, which landed in
  # JAX's callbacks (swallowed there, or a segmentation fault). Now the batch finishes and the run exits 143.
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  output = tmp_path / "samples.jsonl"
  proc = launch(GENERATE, f"--model={hf_dir}", f"--prompts_file={prompts}", "--batch_size=1", "--max_new_tokens=8",
                f"--output={output}")
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if line.startswith("model: "):
      proc.send_signal(signal.SIGTERM)
      break
  rc, out, err = finish(proc)
  err = "".join(seen) + err
  assert rc == 128 + signal.SIGTERM and "SIGTERM: stopping after the work in flight" in err, err
  assert "Traceback" not in err and "Fatal" not in err and out == "", err
  assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl"]  # nothing half-written


# ------------------------------------------------------------------------------------------------------ RSA reports

SCRIPT = {  # final-round outputs per problem; "~" rows never stop (cut at the budget), the others end with eos
  "P-one": ["so \\boxed{7}", "\\boxed{7}.", "\\boxed{3}", "~no idea"],
  "P-two": ["\\boxed{3}"] * 4,
  "P-three": ["\\boxed{5}", "\\boxed{2}", "\\boxed{ 2 }", "~hmm"],
  "P-four": ["\\boxed{1}", "x", "y", "z"],
}


def test_report_numbers_match_a_hand_computation(tmp_path, hf):
  tok = hf.tokenizer
  problems_file = tmp_path / "problems.jsonl"
  problems_file.write_text('{"problem": "P-one: 3+4?", "answer": "7"}\n{"question": "P-two: 2+3?", "answer": 5}\n'
                           '{"problem": "P-three: 1+4?", "answer": "5.0"}\n{"problem": "P-four"}\n')
  problems = cli_files.read_problems(str(problems_file))
  cfg, pieces = rsa_cfg(stop_ids=hf.stop_ids), P.encode_pieces(tok.hf, P.RSA_REFERENCE, 2, None)  # as launch/rsa.py
  calls = []  # (problem, prompt lengths, output lengths) per decode call

  def decode_fn(key, prompts_BL, lens_B, max_new):
    prompts_BL, lens_B = np.asarray(prompts_BL), np.asarray(lens_B)
    name = next(k for k in SCRIPT if k in tok.decode(prompts_BL[0, :lens_B[0]]))
    final = any(c[0] == name for c in calls)  # t = 1: the second call of a problem is its last round
    texts = SCRIPT[name] if final else [f"{i}\\boxed{{9}}" for i in range(4)]  # round 0's answers are not read
    tokens = np.zeros((4, max_new), np.int32)
    lens = np.zeros((4,), np.int32)
    for i, text in enumerate(texts):
      ids = tok.encode(text.lstrip("~"))
      ids = (ids * max_new)[:max_new] if text.startswith("~") else [*ids, tok.eos_id]
      assert len(ids) <= max_new, text
      tokens[i, :len(ids)], lens[i] = ids, len(ids)
    calls.append((name, lens_B.copy(), lens.copy()))
    return tokens, lens

  reports = [rsa_eval.solve_problem(cfg, pieces, decode_fn, tok, p, jax.random.key(p.index), hf.stop_ids)[0]
             for p in problems]
  assert [r.answers for r in reports] == [("7", "7", "3", None), ("3",) * 4, ("5", "2", " 2 ", None),
                                          ("1", None, None, None)]
  assert reports[0].finished == (True, True, True, False)
  assert [r.majority for r in reports] == ["7", "3", "2", "1"]
  assert [r.votes for r in reports] == [2, 4, 2, 1]  # candidates that gave the majority's answer (" 2 " is "2")
  assert [r.mean_correct for r in reports] == [0.5, 0.0, 0.25, None]  # "5.0" normalises to "5"
  assert [r.majority_correct for r in reports] == [True, False, False, None]
  assert [r.passed for r in reports] == [True, False, True, None]
  for r, name in zip(reports, SCRIPT):
    mine = [c for c in calls if c[0] == name]
    assert len(mine) == 2
    assert r.generated == sum(int(c[2].sum()) for c in mine)
    assert r.prefilled == sum(int(c[1].sum()) for c in mine)
    assert r.max_context == max(int((c[1] + c[2]).max()) for c in mine)
  s = rsa_eval.summarize(reports)
  assert (s["problems"], s["scored"], s["n"]) == (4, 3, 4)
  assert s["mean_correct"] == pytest.approx(0.75 / 3)
  assert s["majority_at_n"] == pytest.approx(1 / 3) and s["pass_at_n"] == pytest.approx(2 / 3)
  assert s["generated_per_problem"] == sum(int(c[2].sum()) for c in calls) / 4
  assert s["max_context"] == max(r.max_context for r in reports)
  assert "mean correct 0.250, majority@4 0.333, pass@4 0.667" in rsa_eval.format_summary(s)
  # Every round's population is scored too: round 0 answered 9 everywhere (wrong), round 1 is the final population.
  for r, name in zip(reports, SCRIPT):
    mine = [c for c in calls if c[0] == name]
    assert len(r.rounds) == 2 and r.rounds[0].answers == ("9",) * 4 and r.rounds[1].answers == r.answers
    assert (r.rounds[0].majority, r.rounds[0].votes, r.rounds[0].entropy) == ("9", 4, 0.0)
    assert (r.rounds[1].majority, r.rounds[1].votes) == (r.majority, r.votes)
    assert [x.generated for x in r.rounds] == [int(c[2].sum()) for c in mine]
    assert [x.prefilled for x in r.rounds] == [int(c[1].sum()) for c in mine]
    assert [x.max_context for x in r.rounds] == [int((c[1] + c[2]).max()) for c in mine]
  assert reports[0].rounds[1].entropy == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
  assert reports[0].rounds[0].scores("7") == {"mean_correct": 0.0, "majority_correct": False, "pass": False}
  first, last = s["by_round"]
  assert (first["mean_correct"], first["majority_at_n"], first["pass_at_n"], first["entropy"]) == (0.0, 0.0, 0.0, 0.0)
  assert (last["mean_correct"], last["majority_at_n"], last["pass_at_n"]) == (
    s["mean_correct"], s["majority_at_n"], s["pass_at_n"])
  assert first["generated_per_problem"] + last["generated_per_problem"] == s["generated_per_problem"]
  assert "round 0: mean correct 0.000, majority@4 0.000" in rsa_eval.format_summary(s)
  assert [rsa_eval.ProblemReport.from_json(json.loads(json.dumps(r.to_json()))) for r in reports] == reports

  # --output: written whole on success, absent (and no temporary file) after a failure.
  path = tmp_path / "report.jsonl"
  with cli_files.AtomicJsonl(str(path)) as out:
    for r in reports:
      out.write(r.to_json())
    out.write(s)
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines[-1] == s and lines[0]["correct"] == [True, True, False, False] and lines[3]["correct"] is None
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() would make it, not a temporary's 0600
  failed = tmp_path / "failed.jsonl"
  with pytest.raises(RuntimeError), cli_files.AtomicJsonl(str(failed)) as out:
    out.write({"half": True})
    raise RuntimeError("crash mid-run")
  assert not failed.exists() and sorted(os.listdir(tmp_path)) == ["problems.jsonl", "report.jsonl"]
  with pytest.raises(cli.CLIError, match=r"folder .* does not exist"):
    cli_files.AtomicJsonl(str(tmp_path / "no" / "x.jsonl")).__enter__()
  with pytest.raises(cli.CLIError, match="is a folder; give the path of the JSON-lines file"):
    cli_files.AtomicJsonl(str(tmp_path)).__enter__()
  assert sorted(os.listdir(tmp_path)) == ["problems.jsonl", "report.jsonl"]
  with pytest.raises(cli.CLIError, match="do not fit the model's context of 300"):
    rsa_eval.check_rsa_context(cfg, pieces, 300, 10)
  rsa_eval.check_rsa_context(cfg, pieces, context_bound(cfg, pieces), 10)  # fits exactly
  with pytest.raises(cli.CLIError, match=f"makes {context_bound(cfg, pieces)}"):
    rsa_eval.check_rsa_context(cfg, pieces, context_bound(cfg, pieces) - 1, 10)


def test_rsa_cli_report_is_reproducible_in_process_and_resumes_after_sigterm(tmp_path, hf_dir, hf):
  problems = tmp_path / "problems.jsonl"
  problems.write_text('{"problem": "What is 2+2?", "answer": "4"}\n{"question": "Compute 3*3.", "answer": 9}\n'
                      '{"problem": "Name a prime."}\n')
  output = tmp_path / "rsa.jsonl"
  model_dir = tmp_path / "model"  # a copy: exported over below
  shutil.copytree(hf_dir, model_dir)
  args = [RSA, f"--model={model_dir}", f"--problems={problems}", *[f"--{k}={v}" for k, v in RSA_FLAGS.items()],
          "--seed=5", "--save_texts", "--final_temperature=0"]
  rc, out, err = finish(launch(*args, f"--output={output}"))
  assert rc == 0, err
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(lines) == 4 and lines[-1]["summary"] and "summary over 3 problem(s), 2 with a reference" in out
  run = lines[-1].pop("run")  # provenance: the flags and the weights (a copied folder has the same fingerprint)
  assert run["model"] == {"step": None, "fingerprint": hf.fingerprint} and run["flags"]["--seed"] == 5
  assert f"model: {model_dir} (Hugging Face folder)" in err
  assert out.count("new tokens, longest call") == 6 and out.count("  vote:") == 3  # 2 rounds x 3 problems
  assert "  candidate " not in out  # texts are shown for --problem, not for a problem file (unless --show_text)
  assert "  round 1: mean correct" in out  # the summary's per-round line
  assert "1 of 3 problem(s) have no \"answer\" field (e.g. line 3)" in err  # said before decoding

  # The same problems through the library: same seed plumbing (problem i: fold_in(key(seed), i)), same reports.
  cfg = rsa_cfg(seed=5, stop_ids=hf.stop_ids)  # as launch/rsa.py builds it
  assert f"budget: at most {cfg.max_generated:,} new tokens a problem ({cfg.rounds} rounds of {cfg.n} traces)" in err
  assert all(line["generated"] <= cfg.max_generated for line in lines[:-1])
  pieces = P.encode_pieces(hf.tokenizer.hf, P.RSA_REFERENCE, 2, None)
  decode_fn = make_decode_fn(hf.model, sampling=SamplingConfig(temperature=1.0), stop_token_ids=hf.stop_ids)
  greedy_fn = make_decode_fn(hf.model, sampling=SamplingConfig(temperature=0.0), stop_token_ids=hf.stop_ids)
  solved = [rsa_eval.solve_problem(cfg, pieces, decode_fn, hf.tokenizer, p,
                                   jax.random.fold_in(jax.random.key(5), p.index), hf.stop_ids,
                                   final_decode_fn=greedy_fn) for p in cli_files.read_problems(str(problems))]
  reports = [report for report, _ in solved]
  assert lines[:3] == [json.loads(json.dumps({**r.to_json(), "texts": texts})) for r, texts in solved]
  assert lines[3] == rsa_eval.summarize(reports)
  bound, n, rounds = context_bound(cfg, pieces), cfg.n, cfg.rounds
  for r in reports:
    assert len(r.answers) == n and 2 * n <= r.generated <= n * cfg.beta * rounds and r.max_context <= bound

  # Preempted (SIGTERM) once problem 1 is done: its line stays in rsa2.jsonl.partial, nothing under the name.
  second = tmp_path / "rsa2.jsonl"
  proc = launch(*args, f"--output={second}")
  for line in proc.stdout:
    if line.startswith("problem 2/3"):
      proc.send_signal(signal.SIGTERM)
      break
  rc, _, err = finish(proc)
  assert rc == 128 + signal.SIGTERM and "run again with --resume" in err, err
  partial = tmp_path / "rsa2.jsonl.partial"
  assert not second.exists() and [json.loads(x) for x in partial.read_text().splitlines()] == lines[:1]
  # Other weights under the same path (a model exported over the folder) do not resume the partial file.
  shutil.move(model_dir / "model.safetensors", tmp_path / "kept.safetensors")
  zaya_jax.save_hf(random_model(seed=2), tmp_path / "other")
  shutil.move(tmp_path / "other" / "model.safetensors", model_dir / "model.safetensors")
  shutil.rmtree(tmp_path / "other")
  rc, _, err = finish(launch(*args, f"--output={second}", "--resume"))
  assert rc == 1 and "other settings: model fingerprint=" in err, err
  shutil.move(tmp_path / "kept.safetensors", model_dir / "model.safetensors")
  # Nor does a finished problem whose reference answer changed in the file: its line was scored against the old one.
  text = problems.read_text()
  problems.write_text(text.replace('"answer": "4"', '"answer": "5"'))
  rc, _, err = finish(launch(*args, f"--output={second}", "--resume"))
  assert rc == 1 and "problem 1's reference answer is '5' in the problem file but '4'" in err, err
  problems.write_text(text)
  # --resume decodes problems 2 and 3 only; the file equals the uninterrupted run's.
  rc, out, err = finish(launch(*args, f"--output={second}", "--resume"))
  assert rc == 0, err
  assert out.count("done before") == 1 and out.count("round 1: ") == 3  # 2 problems + the summary
  assert second.read_text() == output.read_text()
  assert sorted(os.listdir(tmp_path)) == ["model", "problems.jsonl", "rsa.jsonl", "rsa2.jsonl"]


def test_output_is_kept_and_partial_lines_resume_only_with_the_same_settings(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_text("earlier results\n")
  with pytest.raises(cli.CLIError, match="exists; pass --overwrite"):
    cli_files.AtomicJsonl(str(path)).__enter__()
  with pytest.raises(cli.CLIError, match=r"exists \(the run that wrote it finished: nothing to resume\)"):
    cli_files.AtomicJsonl(str(path), resumable=True, resume=True).__enter__()
  with cli_files.AtomicJsonl(str(path), overwrite=True) as out:
    out.write({"a": 1})
  assert path.read_text() == '{"a": 1}\n'
  with pytest.raises(cli.CLIError, match="is the --problems file"):
    cli_files.check_output_is_not_input(str(path), problems=str(path))
  (tmp_path / "sub").mkdir()  # the same file under another spelling of its path
  with pytest.raises(cli.CLIError, match="is the --problems file"):
    cli_files.check_output_is_not_input(str(path), problems=str(tmp_path / "sub" / ".." / "out.jsonl"))
  (tmp_path / "sub").rmdir()

  fresh = tmp_path / "fresh.jsonl"
  with pytest.raises(RuntimeError), cli_files.AtomicJsonl(str(fresh), resumable=True, settings={"--seed": 1}) as out:
    raise RuntimeError("fails before any line")
  assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # nothing kept: nothing was finished
  with (pytest.raises(KeyboardInterrupt),
        cli_files.AtomicJsonl(str(fresh), resumable=True, settings={"--seed": 1}) as out):
    out.write({"line": 1})
    raise KeyboardInterrupt
  partial = tmp_path / "fresh.jsonl.partial"
  with open(partial, "a") as f:
    f.write('{"line": 2, "cut')  # a kill in the middle of a line
  with pytest.raises(cli.CLIError, match="pass --resume"):
    cli_files.AtomicJsonl(str(fresh), resumable=True, settings={"--seed": 1}).__enter__()
  with pytest.raises(cli.CLIError, match=r"other settings: --seed=1 \(now 2\)"):
    cli_files.AtomicJsonl(str(fresh), resumable=True, resume=True, settings={"--seed": 2}).__enter__()
  with pytest.raises(cli.CLIError, match=r"other settings: --beta=None \(now 32\)"):  # one the first run lacked
    cli_files.AtomicJsonl(str(fresh), resumable=True, resume=True, settings={"--seed": 1, "--beta": 32}).__enter__()
  with pytest.raises(cli.CLIError, match=r"other settings: --seed=1 \(now None\)"):  # one this run lacks
    cli_files.AtomicJsonl(str(fresh), resumable=True, resume=True, settings={}).__enter__()
  # A resumed run that fails before finishing another line keeps what the first one finished.
  with (pytest.raises(RuntimeError),
        cli_files.AtomicJsonl(str(fresh), resumable=True, resume=True, settings={"--seed": 1}) as out):
    raise RuntimeError("fails before any new line")
  assert (tmp_path / "fresh.jsonl.partial.settings").exists()
  with cli_files.AtomicJsonl(str(fresh), resumable=True, resume=True, settings={"--seed": 1}) as out:
    assert out.done == [{"line": 1}]  # the cut line is dropped, to be decoded again
    out.write({"line": 2})
  assert fresh.read_text() == '{"line": 1}\n{"line": 2}\n'
  assert sorted(os.listdir(tmp_path)) == ["fresh.jsonl", "out.jsonl"]

  # The final rename fails (a folder created at the name meanwhile): the finished lines stay resumable.
  late = tmp_path / "late.jsonl"
  with (pytest.raises(cli.CLIError, match="cannot be written"),
        cli_files.AtomicJsonl(str(late), resumable=True, settings={"--seed": 1}) as out):
    out.write({"line": 1})
    late.mkdir()
  assert (tmp_path / "late.jsonl.partial").read_text() == '{"line": 1}\n'
  assert (tmp_path / "late.jsonl.partial.settings").exists()


def test_each_finished_line_of_a_resumable_output_is_on_disk_before_the_next(tmp_path, monkeypatch):
  # A kill (or a power cut) after a line was written loses at most the line being written.
  path = tmp_path / "out.jsonl"
  seen = []
  real_fsync = os.fsync
  monkeypatch.setattr(cli_files.os, "fsync", lambda fd: (real_fsync(fd), seen.append(
      open(str(path) + ".partial", encoding="utf-8").read())))
  with cli_files.AtomicJsonl(str(path), resumable=True, settings={}) as out:
    out.write({"a": 1})
    out.write({"b": 2})
  assert seen == ['{"a": 1}\n', '{"a": 1}\n{"b": 2}\n']
  seen.clear()
  with cli_files.AtomicJsonl(str(tmp_path / "plain.jsonl")) as out:  # not resumable: nothing to keep, no fsync
    out.write({"a": 1})
  assert seen == []


def test_round_figures_are_means_over_every_problem():
  # A problem without a reference answer still has a population: its entropy counts, its correctness cannot.
  def report(index, reference, entropies):
    rounds = tuple(rsa_eval.RoundReport(answers=("1", "2"), majority="1", votes=1, entropy=e, generated=10, prefilled=5,
                                        max_context=20) for e in entropies)
    return rsa_eval.ProblemReport(index=index, problem=f"p{index}", reference=reference, answers=("1", "2"),
                                  finished=(True, True), majority="1", votes=1, generated=20, prefilled=10,
                                  max_context=20, rounds=rounds)

  summary = rsa_eval.summarize([report(0, "1", [0.0, 0.0]), report(1, None, [1.0, 0.5])])
  assert [r["entropy"] for r in summary["by_round"]] == [0.5, 0.25]
  assert summary["by_round"][0]["mean_correct"] == 0.5
  unscored = rsa_eval.summarize([report(0, None, [0.0])])  # no reference anywhere: no correctness, not zero
  assert unscored["mean_correct"] is unscored["majority_at_n"] is unscored["pass_at_n"] is None
  assert "n/a" in rsa_eval.format_summary(unscored)
  # Reports of different round counts (runs with another --t appended by hand) have no per-round figures.
  assert "by_round" not in rsa_eval.summarize([report(0, "1", [0.0, 0.0]), report(1, "1", [0.0])])


def test_a_prompt_that_just_fits_the_context_is_accepted():
  cli.check_fits_context([97], 4, 100, str)  # 97 prompt tokens + 3 fed back = 100 positions
  with pytest.raises(cli.CLIError, match="needs 101 positions"):
    cli.check_fits_context([98], 4, 100, str)


class _ScriptedTokenizer:
  pad_id, eos_id = 0, 7

  def encode(self, text):
    return [3] * len(text)

  def decode(self, ids):
    return " ".join(map(str, ids))


def test_the_tokenizers_eos_stops_generation_and_each_batch_has_its_key(tmp_path, monkeypatch):
  loaded = cli.LoadedModel(path=str(tmp_path), kind="hf", tokenizer=_ScriptedTokenizer(),
                           config=zaya_jax.ZayaConfig.tiny(), load_weights=lambda: None)
  assert loaded.stop_ids == (1, 7)  # the config's eos, then the tokenizer's
  keys = []

  stops = []

  def scripted_generate(model, prompts_BL, lens_B, *, key, stop_token_ids, **_):
    keys.append(np.asarray(jax.random.key_data(key)).tolist())
    stops.append(tuple(stop_token_ids))
    rows = prompts_BL.shape[0]
    return GenerateOutput(np.full((rows, 2), 5, np.int32), np.full((rows,), 2, np.int32))

  monkeypatch.setattr(cli, "generate", scripted_generate)
  out = cli.generate_completions(loaded, ["a", "b", "c"], chat=None, max_new_tokens=2,
                                 sampling=SamplingConfig(temperature=1.0), n=2, seed=3, batch_size=4)
  assert len(out) == 6  # 3 prompts x 2 samples in two batches of 4 rows, batch b drawn with fold_in(key(seed), b)
  assert keys == [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(3), b))).tolist() for b in (0, 1)]
  assert stops == [(1, 7), (1, 7)]  # what generate was told to stop at


def _launch_rsa():
  """launch/rsa.py imported in this process, for its flag plumbing (absl flags are global: defined once)."""
  name = "_launch_rsa_under_test"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, RSA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]


def _run_rsa_cli(tmp_path, monkeypatch, tokenizer, args):
  """launch/rsa.py's main with `args` on one problem: (solve_problem's call, its sampling, its final sampling)."""
  mod = _launch_rsa()
  (tmp_path / "config.json").write_text("{}")  # the fingerprint hashes it; no weights are ever read
  loaded = cli.LoadedModel(path=str(tmp_path), kind="hf", tokenizer=tokenizer, config=zaya_jax.ZayaConfig.tiny(),
                           load_weights=lambda: "weights")
  monkeypatch.setattr(cli, "load_model", lambda *a, **k: loaded)
  made, calls = [], []

  def scripted_make_decode_fn(model, *, sampling, stop_token_ids):
    def never_called(*args):  # solve_problem is scripted
      raise AssertionError("decode_fn called")

    made.append((never_called, sampling))
    return never_called

  def solve_problem(cfg, pieces, decode_fn, tok, problem, key, stop_ids, *, on_round, answer_after, final_decode_fn):
    calls.append(dict(cfg=cfg, decode_fn=decode_fn, final_decode_fn=final_decode_fn, problem=problem,
                      answer_after=answer_after))
    texts = ["no answer yet", *(f"candidate {i} says \\boxed{{{7 if i == 2 else 4}}}" for i in range(1, cfg.n))]
    finished = [i >= 2 for i in range(cfg.n)]  # the vote stands for the first finished candidate with its answer
    return rsa_eval.report_problem(problem, texts, finished, 1, 1, 1, answer_after), texts

  monkeypatch.setattr(mod, "make_decode_fn", scripted_make_decode_fn)
  monkeypatch.setattr(rsa_eval, "solve_problem", solve_problem)
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["rsa.py", f"--model={tmp_path}", "--problem=What is 2+2?", *args])
    assert mod.main([]) == 0
  finally:
    flags.FLAGS.unparse_flags()
  (call,) = calls
  samplings = {id(fn): s for fn, s in made}
  return call, samplings[id(call["decode_fn"])], samplings[id(call["final_decode_fn"])]


def test_rsa_cli_prints_the_text_the_vote_stands_for(tmp_path, monkeypatch, hf, capsys):
  # Candidates: 0 no answer, 1 '4' cut at its budget, 2 '7' finished, 3 '4' finished.
  _run_rsa_cli(tmp_path, monkeypatch, hf.tokenizer, ["--n=4", "--c=2", "--t=1", "--tau=4", "--beta=8"])
  out = capsys.readouterr().out
  assert "vote: '4' (2 of 4)" in out and "candidate 3 (finished):\ncandidate 3 says \\boxed{4}\n" in out, out
  assert "candidate 1 says" not in out and "candidate 2 says" not in out and "no answer yet" not in out
  # No finished candidate with the plurality answer: the first one with it, said to be cut.
  _run_rsa_cli(tmp_path, monkeypatch, hf.tokenizer, ["--n=3", "--c=2", "--t=1", "--tau=4", "--beta=8"])
  assert "candidate 1 (cut at its budget):\ncandidate 1 says \\boxed{4}\n" in capsys.readouterr().out
  _run_rsa_cli(tmp_path, monkeypatch, hf.tokenizer, ["--n=4", "--c=2", "--t=1", "--tau=4", "--beta=8",
                                                     "--noshow_text"])
  assert "candidate 3 says" not in capsys.readouterr().out


def test_rsa_cli_flags_reach_the_sampler(tmp_path, monkeypatch, hf):
  # The subprocess test compares the CLI with rsa_eval.solve_problem in process: what both share, and flags it does not
  # pass, go unseen there. Here launch/rsa.py runs in process, its model and sampler scripted (no weights, no compile).
  tokenizer = hf.tokenizer
  call, sampling, final = _run_rsa_cli(tmp_path, monkeypatch, tokenizer, [
    "--template=delethink", "--n=3", "--c=1", "--t=2", "--tau=4", "--beta=8", "--beta_first=12",
    "--tail_source=reasoning", "--end_think=</think>", "--answer_after_think", "--answer=4",
    "--temperature=0.7", "--final_temperature=0", "--final_top_k=5"])
  cfg = call["cfg"]
  assert (cfg.n, cfg.c, cfg.t, cfg.tau, cfg.beta, cfg.beta_first) == (3, 1, 2, 4, 8, 12)
  assert cfg.keep_finished and cfg.self_continue  # true Delethink: a chain that ended is not continued
  assert cfg.tail_source == "reasoning"
  assert cfg.end_think == tuple(tokenizer.hf.encode("</think>", add_special_tokens=False).ids)
  assert call["answer_after"] == "</think>" and call["problem"].answer == "4"
  assert sampling == SamplingConfig(temperature=0.7) and final == SamplingConfig(temperature=0.0, top_k=5)


def test_c1_with_an_aggregation_template_refines_finished_traces(tmp_path, monkeypatch, hf):
  tokenizer = hf.tokenizer
  call, sampling, final = _run_rsa_cli(tmp_path, monkeypatch, tokenizer, [
    "--template=rsa", "--n=2", "--c=1", "--t=1", "--tau=4", "--beta=8"])
  assert not call["cfg"].keep_finished and call["answer_after"] is None and call["problem"].answer is None
  assert call["final_decode_fn"] is call["decode_fn"] and sampling == final == SamplingConfig(temperature=1.0)


def test_solve_problem_decodes_the_last_round_with_the_final_decoder(hf):
  tokenizer = hf.tokenizer
  cfg = rsa_eval.rsa_config(n=2, c=1, t=1, tau=4, beta=16, beta_final=None, tail_source="all", end_think=(), q_max=64,
                            max_context=1024, pad_id=0, seed=0)
  pieces = P.encode_pieces(tokenizer.hf, P.RSA_REFERENCE, 1, None)

  def scripted(answer):
    ids = [*tokenizer.encode(f"\\boxed{{{answer}}}"), tokenizer.eos_id]

    def decode(key, prompts_BL, lens_B, max_new):
      tokens = np.zeros((cfg.n, max_new), np.int32)
      tokens[:, :len(ids)] = ids
      return tokens, np.full((cfg.n,), len(ids), np.int32)
    return decode

  report, _ = rsa_eval.solve_problem(cfg, pieces, scripted("3"), tokenizer,
                                     cli_files.Problem(0, 0, "What is 2+2?", "4"), jax.random.key(0),
                                     (tokenizer.eos_id,), final_decode_fn=scripted("4"))
  assert report.rounds[0].answers == ("3", "3") and report.answers == ("4", "4") and report.mean_correct == 1.0


def test_delethink_scores_the_whole_trace_of_joined_chunks(hf):
  """True Delethink: a trace is every chunk joined (spec §2.1), so an answer whose box straddles a chunk boundary, or
  that an earlier chunk wrote, is the trace's; a chain that ended keeps its text. The pool holds only the newest
  chunk, which was all that was scored."""
  tokenizer = hf.tokenizer
  filler = tokenizer.encode(" x")[:1]
  first = {0: tokenizer.encode("so </think> the answer is \\boxed{1"),  # cut at its budget, mid-box
           1: tokenizer.encode("thus </think> \\boxed{7}"),  # cut at its budget after a whole box
           2: [*tokenizer.encode("done \\boxed{5}"), tokenizer.eos_id]}  # finished: never continued
  second = {0: [*tokenizer.encode("2} ok"), tokenizer.eos_id], 1: [*tokenizer.encode(" checked"), tokenizer.eos_id],
            2: [*tokenizer.encode("\\boxed{9}"), tokenizer.eos_id]}  # row 2's result is discarded
  beta_first = max(len(first[0]), len(first[1]))
  for i in (0, 1):  # exactly the budget: cut there, not finished
    first[i] = filler * (beta_first - len(first[i])) + first[i]
  cfg = rsa_eval.rsa_config(n=3, c=1, t=1, tau=6, beta=12, beta_first=beta_first, beta_final=None,
                            tail_source="all", end_think=(), q_max=64, max_context=1024, pad_id=0, seed=0,
                            stop_ids=(tokenizer.eos_id,), keep_finished=True)
  pieces = P.encode_pieces(tokenizer.hf, P.DELETHINK, 1, None)
  assert pieces.continuation

  def decode(key, prompts_BL, lens_B, max_new):
    rows = first if max_new == beta_first else second
    tokens = np.zeros((cfg.n, max_new), np.int32)
    for i, ids in rows.items():
      tokens[i, :len(ids)] = ids
    lens = np.asarray([len(rows[i]) for i in range(cfg.n)], np.int32)
    return tokens, np.minimum(lens, max_new)

  for answer_after in (None, "</think>"):
    report, texts = rsa_eval.solve_problem(cfg, pieces, decode, tokenizer, cli_files.Problem(0, 0, "Q?", "12"),
                                           jax.random.key(0), (tokenizer.eos_id,), answer_after=answer_after)
    assert texts[0].endswith("\\boxed{12} ok") and texts[1].endswith("\\boxed{7} checked"), texts
    assert texts[2] == "done \\boxed{5}"  # kept as it ended: its discarded continuation is not added
    assert report.answers == ("12", "7", None if answer_after else "5"), (answer_after, report.answers)
    assert report.rounds[0].answers == (None, "7", None if answer_after else "5")
  # Without keep_finished an ended chain is continued too: its stop token is no text between the chunks.
  _, texts = rsa_eval.solve_problem(dataclasses.replace(cfg, keep_finished=False), pieces, decode, tokenizer,
                                    cli_files.Problem(0, 0, "Q?", "12"), jax.random.key(0), (tokenizer.eos_id,))
  assert texts[2] == "done \\boxed{5}\\boxed{9}", texts


# ------------------------------------------------------------------------------------------------------- bad inputs


def test_bad_input_exits_1_with_one_message_and_no_output(tmp_path, hf_dir):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", answer: 2}\n')
  llama = tmp_path / "llama"
  llama.mkdir()
  (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
  no_tok = tmp_path / "no_tokenizer"
  no_tok.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(hf_dir / name, no_tok)
  # Weights that cannot load: flag errors that the tokenizer and config.json reveal must come first.
  broken = tmp_path / "broken_weights"
  shutil.copytree(hf_dir, broken)
  (broken / "model.safetensors").write_bytes(b"not safetensors")
  model = f"--model={hf_dir}"
  cases = [
    (GENERATE, [f"--model={broken}", "--prompt=" + "word " * 1100, "--max_new_tokens=4"], "context of 1024"),
    (RSA, [f"--model={broken}", "--problem=" + "word " * 10, "--q_max=2", "--n=2", "--c=2", "--beta=16", "--tau=8"],
     "--q_max=2 is shorter"),
    (RSA, [f"--model={broken}", "--problem=x", "--n=2", "--c=2", "--beta=2000", "--tau=8", "--tail_source=reasoning"],
     "do not fit the model's context of 1024"),
    (GENERATE, [f"--model={llama}", "--prompt=x"], "is neither an Orbax run directory"),
    (GENERATE, [f"--model={no_tok}", "--prompt=x"], f"{no_tok / 'tokenizer.json'} is missing"),
    (RSA, [model, "--problem=x", "--n=2", "--c=3"], "--c = 3 > --n = 2"),
    (RSA, [f"--model={broken}", "--problem=x", "--t=0", "--temperature=0.5", "--final_temperature=0.6"],
     "--temperature is unused with --t=0 and --final_temperature: round 0 is the final round"),
    (RSA, [f"--model={broken}", "--problem=x", "--n=2", "--c=2", "--beta=16", "--tau=8", "--template=pacore",
           "--tail_source=pacore_hybrid", "--end_think="], "--end_think is empty: --tail_source=pacore_hybrid needs"),
    (RSA, [model, f"--problems={bad}"], "bad.jsonl:3: not valid JSON"),
  ]  # τ > β and an empty file take the same exit path; their messages are checked in-process above
  procs = [launch(script, *args, f"--output={tmp_path / f'out{i}.jsonl'}") for i, (script, args, _) in enumerate(cases)]
  errs = []
  for proc, (_, args, words) in zip(procs, cases):
    rc, out, err = finish(proc)
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err and lines[-1].startswith("error: ") and words in lines[-1], (args, err)
    assert out == ""
    errs.append(err)
  # The project's BPE has no </think> token: the marker is several ids, which a model may write differently.
  assert "--end_think='</think>' is not one token in this tokenizer" in errs[2], errs[2]
  assert not any(name.startswith(("out", ".out")) for name in os.listdir(tmp_path))  # nothing half-written
  with pytest.raises(cli.CLIError, match="cannot load"):  # the broken weights themselves are named on first use
    _ = cli.load_model(str(broken)).model


# ------------------------------------------------------------------------------------------------- run directories


def test_run_directory_and_its_hf_export_generate_the_same_tokens(tmp_path, run_dir, chat_samples):
  run = cli.load_model(str(run_dir))
  assert run.kind == "run" and run.stop_ids == (1,) and run.step == 12  # the latest, resolved before any weights
  assert cli.load_model(str(run_dir), step=6).fingerprint != run.fingerprint
  with pytest.raises(cli.CLIError, match=r"no complete checkpoint at step 7 \(it has 6, 12\)"):
    cli.load_model(str(run_dir), step=7)
  exported = tmp_path / "exported"
  zaya_jax.save_hf(run.model, exported)
  _copy_tokenizer(run_dir, exported)
  hf = cli.load_model(str(exported))
  assert hf.kind == "hf"
  a, b = flat_params(run.model), flat_params(hf.model)
  assert a.keys() == b.keys() and all(np.array_equal(a[k][...], b[k][...]) for k in a)
  from_run = cli.generate_completions(run, PROMPTS, chat=cli.chat_format(run, True), seed=3, **GEN)
  from_hf = cli.generate_completions(hf, PROMPTS, chat=cli.chat_format(hf, True), seed=3, **GEN)
  assert from_run == from_hf
  # Trained weights, not the random HF fixture's: the same seed gives other tokens.
  assert [c.completion for c in from_run] != [c.completion for c in chat_samples]
