"""Training that starts from a Hugging Face checkpoint (`launch/train.py --init_from`), and the way back: a run's
checkpoint exported as a Hugging Face folder (`launch/export_hf.py`). The checkpoint is the reference
implementation's, with a tokenizer trained here; sharded loading is in tests/test_sharding.py."""

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from reference import load_reference, make_reference, reference_logits

import zaya_jax
from zaya_jax.checkpoint.hf import CheckpointError, flat_params, read_hf_config, save_hf
from zaya_jax.tokenizer import load_tokenizer, train_bpe
from zaya_jax.train import step as train_step_lib
from zaya_jax.train.checkpointing import load_run, resolve_step
from zaya_jax.train.data import make_data
from zaya_jax.train.experiment import from_hf_checkpoint, get_experiment, override
from zaya_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
# Unlike the tiny preset (2 layers, 4 experts, hidden 64): adopting the checkpoint's architecture is visible.
REFERENCE = dict(vocab_size=384, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, moe_intermediate_size=16, num_experts=3, router_hidden_size=8,
                 max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus")
  for name in ("argparse", "textwrap", "shutil", "glob"):
    shutil.copy(os.path.join(STDLIB, f"{name}.py"), path)
  return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
  """A reference-saved folder with a tokenizer.json (320 ids, fewer than the model's 384), as a released model has."""
  folder = tmp_path_factory.mktemp("hf") / "model"
  reference = make_reference(folder, seed=21, **REFERENCE)
  texts = (open(os.path.join(corpus, name)).read() for name in sorted(os.listdir(corpus)))
  train_bpe(texts, 320, folder / "tokenizer.json")
  return str(folder), reference


def run_config(folder, corpus, steps, *extra):
  return override(from_hf_checkpoint(get_experiment("tiny"), folder), [
      f"data.paths=({corpus!r},)", "data.seq_len=32", "data.batch_size=4", "data.eval_fraction=0.25",
      "data.shuffle_window=8", f"loop.steps={steps}", "loop.checkpoint_every=2", "loop.log_every=1",
      "loop.eval_every=0", "loop.eval_batches=1", "loop.sample_tokens=0", "optimizer.warmup_steps=1",
      "loop.async_checkpointing=False", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint, corpus):
  """A run of 2 steps started from the checkpoint: (workdir, its first step's loss, its log)."""
  folder, _ = checkpoint
  workdir = tmp_path_factory.mktemp("run")
  lines = []
  train(run_config(folder, corpus, 2), workdir, log=lines.append)
  with open(workdir / "metrics.jsonl") as f:
    first_loss = json.loads(f.readline())["loss"]
  return workdir, first_loss, lines


def test_the_checkpoint_decides_the_architecture_and_the_tokenizer(checkpoint):
  folder, _ = checkpoint
  base = get_experiment("tiny")
  cfg = from_hf_checkpoint(base, folder)
  assert cfg.model == read_hf_config(folder, dtype=base.model.dtype, param_dtype=base.model.param_dtype)
  assert (cfg.model.num_layers, cfg.model.moe.num_experts, cfg.model.vocab_size) == (3, 3, 384)
  assert cfg.data.tokenizer == folder and cfg.loop.init_from == folder
  assert (cfg.optimizer, cfg.loop.steps) == (base.optimizer, base.loop.steps)  # the rest stays the experiment's
  # How the model runs stays the experiment's too.
  runtime = override(base, ["model.remat=dots", "model.attention.backend=xla", "model.moe.backend=dense"]).model
  kept = from_hf_checkpoint(dataclasses.replace(base, model=runtime), folder).model
  assert (kept.remat, kept.attention.backend, kept.moe.backend) == ("dots", "xla", "dense")


def test_the_first_state_is_the_reference_model_and_training_starts_from_it(checkpoint, corpus, trained, tmp_path):
  folder, reference = checkpoint
  cfg = run_config(folder, corpus, 2)
  trainer, state = train_step_lib.create_from_hf(folder, cfg.model, cfg.optimizer, cfg.step, cfg.balancing, 2, 0)
  assert int(state.step) == 0
  ids = np.random.default_rng(4).integers(0, REFERENCE["vocab_size"], (2, 11))
  ours = np.asarray(zaya_jax.forward(trainer.model_of(state), ids).logits_BTV)
  theirs = reference_logits(reference, ids).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)

  # The run's first step was taken from those weights: its loss is the loaded model's on the run's first batch.
  workdir, first_loss, lines = trained
  assert any(line.startswith(f"initialised from {folder}") for line in lines), lines
  batch = next(iter(make_data(cfg.data, tmp_path / "probe", model_vocab_size=cfg.model.vocab_size).train))
  logits = zaya_jax.forward(trainer.model_of(state), batch["input_ids"],
                            segment_ids_BT=batch["segment_ids"]).logits_BTV
  log_p = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  picked = np.take_along_axis(np.asarray(log_p), batch["targets"][..., None], axis=-1)[..., 0]
  expected = -(picked * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  assert abs(first_loss - expected) <= 1e-5 * expected, (first_loss, expected)

  # A later launch resumes the run from its own checkpoint; the folder's weights are not read again.
  again = []
  train(run_config(folder, corpus, 3), workdir, log=again.append)
  assert any(line.startswith("resumed from") for line in again) and not any("initialised" in x for x in again)


def test_export_loads_in_transformers_and_starts_another_run(checkpoint, trained, tmp_path):
  folder, _ = checkpoint
  workdir, _, _ = trained
  model, _, cfg = load_run(workdir, 2)
  export = tmp_path / "export"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export_hf.py"), f"--workdir={workdir}",
                         "--step=2", f"--output={export}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "at step 2" in proc.stdout
  assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(export).st_mode) == 0o777 & ~umask  # readable by others where the umask allows
  with open(export / "tokenizer.json", "rb") as a, open(os.path.join(folder, "tokenizer.json"), "rb") as b:
    assert a.read() == b.read()
  # The run's BPE had no tokenizer_config.json; the export's names its tokens, so transformers encodes as we do.
  ours, theirs_tok = load_tokenizer(workdir), transformers.AutoTokenizer.from_pretrained(export)
  text = open(os.path.join(STDLIB, "fnmatch.py")).read()[:2000] + " ünïcode"
  assert theirs_tok(text)["input_ids"] == ours.encode(text)
  assert (theirs_tok.eos_token_id, theirs_tok.pad_token_id) == (ours.eos_id, ours.pad_id)

  # An export into the run directory (here: over its checkpoints) is refused, and the run keeps its checkpoints.
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export_hf.py"), f"--workdir={workdir}",
                         f"--output={workdir / 'checkpoints'}", "--overwrite"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and "must lie outside the run directory" in proc.stderr, proc.stderr[-3000:]
  assert "2" in os.listdir(workdir / "checkpoints") and not (workdir / "checkpoints" / "config.json").exists()
  # A mistyped --workdir is named as missing (it read as "holds no complete checkpoint").
  with pytest.raises(CheckpointError, match=r"tinyy: no such run directory"):
    resolve_step(tmp_path / "tinyy")

  ids = np.random.default_rng(5).integers(0, REFERENCE["vocab_size"], (2, 9))
  theirs = reference_logits(load_reference(export), ids).logits.numpy()
  np.testing.assert_allclose(np.asarray(zaya_jax.forward(model, ids).logits_BTV), theirs, atol=1e-5, rtol=0)

  trained_params = {k: np.asarray(v[...]) for k, v in flat_params(model).items()}
  trainer, state = train_step_lib.create_from_hf(str(export), cfg.model, cfg.optimizer, cfg.step, cfg.balancing,
                                                 2, 0)
  started = {k: np.asarray(v[...]) for k, v in flat_params(nnx.state(trainer.model_of(state))).items()}
  assert started.keys() == trained_params.keys()
  assert all(np.array_equal(started[k], trained_params[k]) for k in started)

  # A bf16 export: weights rounded as torch rounds them, balancing biases kept in fp32.
  save_hf(model, tmp_path / "bf16", dtype="bfloat16")
  with open(tmp_path / "bf16" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  half = {k: np.asarray(v[...]) for k, v in flat_params(zaya_jax.load_hf(tmp_path / "bf16")).items()}
  for key, value in trained_params.items():
    if key.endswith("balancing_biases"):
      assert half[key].dtype == np.float32 and np.array_equal(half[key], value)
    else:
      want = torch.from_numpy(np.array(value)).to(torch.bfloat16).float().numpy()
      assert half[key].dtype == ml_dtypes.bfloat16 and np.array_equal(half[key].astype(np.float32), want), key


def test_an_architecture_override_or_a_missing_tokenizer_is_refused_before_the_data(checkpoint, corpus, tmp_path):
  folder, _ = checkpoint
  with pytest.raises(CheckpointError, match=r"model\.num_layers: 2 here, 3 in the checkpoint"):
    train(run_config(folder, corpus, 2, "model.num_layers=2"), tmp_path / "a", log=lambda _: None)
  assert not (tmp_path / "a").exists()  # nothing tokenized, no empty run directory left behind

  bare = tmp_path / "no_tokenizer"
  shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*"))
  with pytest.raises(ValueError, match=r"data\.tokenizer is unset"):
    train(run_config(str(bare), corpus, 2), tmp_path / "b", log=lambda _: None)

  with pytest.raises(ValueError, match="empty path"):
    from_hf_checkpoint(get_experiment("tiny"), "")
  with pytest.raises(CheckpointError, match="no such folder"):
    read_hf_config(tmp_path / "nowhere")

  # Through the command line: --init_from, then the --set overrides, then the same check.
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--init_from={folder}",
                         "--set=model.num_layers=2", f"--workdir={tmp_path / 'c'}", f"--data={corpus}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stderr.startswith("error:") and "model.num_layers" in proc.stderr, proc.stderr


def test_a_run_keeps_the_start_it_began_with(checkpoint, corpus, trained, tmp_path):
  """A resume would ignore another --init_from (and record it as used): refused, as is dropping it."""
  folder, _ = checkpoint
  workdir, _, _ = trained
  with open(workdir / "config.json") as f:
    before = f.read()
  elsewhere = tmp_path / "copy"
  shutil.copytree(folder, elsewhere)
  with pytest.raises(ValueError, match=f"began from {folder}.*resume with --init_from={folder}"):
    train(run_config(str(elsewhere), corpus, 4), workdir, log=lambda _: None)
  scratch = override(get_experiment("tiny"), [f"data.paths=({corpus!r},)", "loop.steps=4"])
  with pytest.raises(ValueError, match=f"began from {folder}"):
    train(scratch, workdir, log=lambda _: None)
  with open(workdir / "config.json") as f:
    assert f.read() == before

  # And a run that began from a random initialisation (its launch's config.json, a checkpoint) cannot switch to one.
  random_start = tmp_path / "random_start"
  shutil.copytree(workdir, random_start)
  config = json.loads((random_start / "config.json").read_text())
  config["loop"]["init_from"] = None
  (random_start / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="began from a random initialisation"):
    train(run_config(folder, corpus, 2), random_start, log=lambda _: None)
  # A launch that died before its first checkpoint has nothing to resume: it may start from elsewhere.
  shutil.rmtree(random_start / "checkpoints")
  lines = []
  assert train(run_config(folder, corpus, 2), random_start, log=lines.append).final_step == 2
  assert any(line.startswith("initialised from") for line in lines), lines
  with pytest.raises(CheckpointError, match="training run directory"):
    read_hf_config(workdir)
