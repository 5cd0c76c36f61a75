"""launch/pretokenize.py and zaya_jax.train.token_shards: text tokenized once into ArrayRecord shards."""

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest
from test_data import _equal, _take

from zaya_jax import host_memory
from zaya_jax.tokenizer import load_tokenizer, train_bpe
from zaya_jax.train import data as data_lib
from zaya_jax.train import text_corpus, token_shards
from zaya_jax.train.data import DataConfig, make_data
from zaya_jax.train.token_shards import MANIFEST, check_shards, tokenize_corpus, write_token_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A folder of text (one file gzipped, one binary, one empty) and a BPE trained on it."""
  base = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(0)
  folder = base / "texts"
  (folder / "sub").mkdir(parents=True)
  texts = {}
  for k in range(14):
    text = " ".join(rng.choice(WORDS, int(rng.integers(2, 80)))) + "\n"
    name = f"sub/doc{k:02d}.txt" if k % 4 == 0 else f"doc{k:02d}.txt"
    texts[f"texts/{name}"] = text
    (folder / name).write_text(text)
  gz_text = "zipped " * 30
  (folder / "zipped.txt.gz").write_bytes(gzip.compress(gz_text.encode()))
  texts["texts/zipped.txt.gz"] = gz_text
  (folder / "image.bin").write_bytes(b"\x89PNG\0\0binary")
  (folder / "empty.txt").write_text("")
  tokenizer = train_bpe(texts.values(), 300, base / "bpe" / "tokenizer.json")
  return base, folder, texts, tokenizer


def _records(path):
  source = grain.sources.ArrayRecordDataSource([str(path)])
  return [np.frombuffer(source[i], "<i4").tolist() for i in range(len(source))]


def test_shards_hold_every_document_once_and_train(corpus, monkeypatch):
  base, folder, texts, tok = corpus
  monkeypatch.setattr(text_corpus, "ENCODE_CHUNK", 4)  # several encode chunks: the documents are streamed
  seen = []
  manifest = tokenize_corpus([str(folder)], tok, base / "ids", shard_tokens=200, progress=seen.append)
  assert [p["documents"] for p in seen] == [4, 8, 12, 15]

  # One record per document, in corpus order: its ids (the tokenizer's own encoding) and eos. The binary file is
  # skipped and listed, the empty one has no document.
  names = [name for name, _ in text_corpus.text_documents([str(folder)])]  # corpus order: files, then subfolders
  assert sorted(names) == sorted(texts)
  want = [[*tok.encode(texts[name]), tok.eos_id] for name in names]
  shards = [base / "ids" / s["file"] for s in manifest["shards"]]
  got = [record for shard in shards for record in _records(shard)]
  assert got == want
  assert len(shards) > 2 and all(s["tokens"] >= 200 for s in manifest["shards"][:-1])  # a new shard past 200 ids
  assert [s["documents"] for s in manifest["shards"]] == [len(_records(s)) for s in shards]
  # Progress counts the shards written so far: those that reached 200 ids by then (the last may close at the end).
  ends = np.cumsum([s["documents"] for s in manifest["shards"]])
  closed = [(end, s["tokens"] >= 200) for end, s in zip(ends, manifest["shards"], strict=True)]
  assert [p["shards"] for p in seen] == [sum(full and end <= p["documents"] for end, full in closed) for p in seen]
  assert [s["max_id"] for s in manifest["shards"]] == [max(max(r) for r in _records(s)) for s in shards]
  assert (manifest["documents"], manifest["tokens"]) == (15, sum(map(len, want)))
  assert len(manifest["skipped"]) == 1 and "image.bin (binary)" in manifest["skipped"][0]
  assert json.loads((base / "ids" / MANIFEST).read_text()) == manifest
  assert (base / "ids" / "tokenizer.json").read_bytes() == open(tok.path, "rb").read()

  # Training reads them with their tokenizer, and sees what a run on the text would: the same held-out documents
  # (the shards keep the documents' name hashes) and, the same documents in the same order, the same batches.
  # No DataConfig.tokenizer: the shards' own is used (copied into the run directory, for samples and exports).
  cfg = DataConfig(paths=(str(base / "ids" / "*.array_record"),), seq_len=16, batch_size=2, eval_fraction=0.3,
                   prefetch=0)
  data = make_data(cfg, base / "run", model_vocab_size=512, process_index=0, process_count=1)
  text = make_data(dataclasses.replace(cfg, paths=(str(folder),), tokenizer=tok.path), base / "run_text",
                   model_vocab_size=512, process_index=0, process_count=1)
  assert data.tokenizer.fingerprint == tok.fingerprint == load_tokenizer(base / "run").fingerprint
  assert data.info.description == f"ArrayRecord {shards[0]}, ..., {shards[-1]} ({len(shards)} files)"
  assert (data.info.num_train_docs, data.info.num_eval_docs) == (text.info.num_train_docs, text.info.num_eval_docs)
  assert data.info.num_eval_docs > 1
  assert _equal(list(data.eval), list(text.eval))
  assert _equal(_take(iter(data.train), 6), _take(iter(text.train), 6))


def test_encode_chunks_bound_documents_and_characters(monkeypatch):
  monkeypatch.setattr(text_corpus, "ENCODE_CHUNK", 3)
  monkeypatch.setattr(text_corpus, "ENCODE_CHUNK_CHARS", 300)
  docs = [(str(i), "x" * n) for i, n in enumerate([100, 250, 50, 400, 10, 20, 30, 40])]
  chunks = [[name for name, _ in chunk] for chunk in text_corpus.encode_chunks(iter(docs))]
  assert chunks == [["0"], ["1", "2"], ["3"], ["4", "5", "6"], ["7"]]


def test_a_document_too_large_to_encode_in_memory_is_refused_by_name(corpus, tmp_path, monkeypatch):
  """A document longer than a chunk is encoded in one call (~130 bytes per byte of text): one that the memory the
  process can allocate cannot hold is refused before the call, naming it and the remedy, instead of the kernel
  killing the process. A file that is one document is refused before any file is read; a piece of a doc_separator
  split, when it is reached. A binary file that long is skipped as before, not refused."""
  _, _, _, tok = corpus
  monkeypatch.setattr(text_corpus, "ENCODE_CHUNK_CHARS", 300)
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a_small.txt").write_text("alpha beta " * 20)
  (tmp_path / "texts" / "big.txt").write_text("gamma delta " * 100)  # 1,200 bytes
  (tmp_path / "texts" / "image.bin").write_bytes(b"\0PNG" * 5000)  # longer, but binary
  reads = []
  read_text = text_corpus._read_text
  monkeypatch.setattr(text_corpus, "_read_text", lambda path, *a: reads.append(path) or read_text(path, *a))
  monkeypatch.setattr(host_memory, "available_memory", lambda: 1200 * text_corpus.ENCODE_BYTES_PER_TEXT_BYTE - 1)
  refused = r"document .*big.txt(#0)? holds 1,200 bytes of text: .* Split it into documents \(a doc_separator"
  with pytest.raises(ValueError, match=refused):
    tokenize_corpus([str(tmp_path / "texts")], tok, tmp_path / "ids")
  assert reads == [] and not (tmp_path / "ids").exists()
  with pytest.raises(ValueError, match=refused):  # split at "%%": big.txt is one piece, seen when encoded
    tokenize_corpus([str(tmp_path / "texts")], tok, tmp_path / "ids", doc_separator="%%")
  assert len(reads) >= 2 and not (tmp_path / "ids").exists()
  monkeypatch.setattr(host_memory, "available_memory", lambda: 1200 * text_corpus.ENCODE_BYTES_PER_TEXT_BYTE)
  assert tokenize_corpus([str(tmp_path / "texts")], tok, tmp_path / "ids")["documents"] == 2


def test_cgroup_headroom_reads_the_tightest_limit_above_the_process(tmp_path):
  """v2: the limit set on a parent (a Slurm job above its step) counts, "max" does not; v1: the memory controller's
  limit, its page-rounded "no limit" ignored; a path the mount does not hold (a container's own root) reads the
  parents. What the encode check sees besides MemAvailable (host_memory.available_memory)."""
  def tree(files):
    for rel, text in files.items():
      (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / rel).write_text(text)

  tree({"cg/job/step/memory.max": "max\n", "cg/job/step/memory.current": "100\n",
        "cg/job/memory.max": "5000\n", "cg/job/memory.current": "1200\n",
        "cg/memory.max": "max\n", "cg/memory.current": "9000\n", "v2": "0::/job/step\n"})
  assert host_memory.cgroup_headroom(str(tmp_path / "v2"), str(tmp_path / "cg")) == 3800
  tree({"cg/job/step/memory.max": "10000\n"})  # a looser limit below the job's: the job's still binds
  assert host_memory.cgroup_headroom(str(tmp_path / "v2"), str(tmp_path / "cg")) == 3800
  tree({"cg/job/step/memory.max": "2000\n"})
  assert host_memory.cgroup_headroom(str(tmp_path / "v2"), str(tmp_path / "cg")) == 1900
  tree({"v1root/memory/memory.limit_in_bytes": "9223372036854771712\n", "v1root/memory/memory.usage_in_bytes": "7\n",
        "v1": "4:memory:/not/mounted/here\n3:cpuset:/\nnot a cgroup line\n0::/\n"})
  assert host_memory.cgroup_headroom(str(tmp_path / "v1"), str(tmp_path / "v1root")) is None
  (tmp_path / "v1root/memory/memory.limit_in_bytes").write_text("4096\n")
  assert host_memory.cgroup_headroom(str(tmp_path / "v1"), str(tmp_path / "v1root")) == 4089
  assert host_memory.cgroup_headroom(str(tmp_path / "absent"), str(tmp_path / "cg")) is None


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup(monkeypatch):
  monkeypatch.setattr(host_memory, "_read", {"/proc/meminfo": "MemTotal:  9999 kB\nMemAvailable:    1000 kB"}.get)
  monkeypatch.setattr(host_memory, "cgroup_headroom", lambda: None)
  assert host_memory.available_memory() == 1000 * 1024  # kB are KiB in /proc/meminfo
  monkeypatch.setattr(host_memory, "cgroup_headroom", lambda: 5000)
  assert host_memory.available_memory() == 5000
  monkeypatch.setattr(host_memory, "cgroup_headroom", lambda: 10**9)
  assert host_memory.available_memory() == 1000 * 1024


@pytest.fixture
def seven_texts(tmp_path):
  """A folder of 7 short documents of 3 words, and a BPE for them: (folder, tokenizer)."""
  texts = tmp_path / "texts"
  texts.mkdir()
  for k in range(7):
    (texts / f"d{k}.txt").write_text("alpha beta gamma " * (k + 3))
  return texts, train_bpe(["alpha beta gamma delta " * 50], 280, tmp_path / "bpe" / "tokenizer.json")


def test_every_document_lands_in_exactly_one_shard(seven_texts, tmp_path):
  texts, tok = seven_texts
  first_doc_tokens = len(tok.encode((texts / "d0.txt").read_text())) + 1  # + eos
  for shard_tokens in (1, first_doc_tokens, 40, 64, 100, 2**26):
    out = tmp_path / f"ids{shard_tokens}"
    manifest = tokenize_corpus([str(texts)], tok, out, shard_tokens=shard_tokens)
    shards = manifest["shards"]
    assert manifest["documents"] == 7 and manifest["dropped"] == 0, shard_tokens
    assert sum(s["documents"] for s in shards) == 7, shard_tokens  # the last, partly filled shard too
    assert sum(s["tokens"] for s in shards) == manifest["tokens"], shard_tokens
    assert [len(_records(out / s["file"])) for s in shards] == [s["documents"] for s in shards], shard_tokens
    if shard_tokens == first_doc_tokens:  # a shard closes as soon as it holds shard_tokens
      assert shards[0]["documents"] == 1 and shards[0]["tokens"] == shard_tokens


def test_manifest_sources_hashes_and_tokenizer_lookup(seven_texts, tmp_path, monkeypatch):
  texts, tok = seven_texts
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "ids"
  manifest = tokenize_corpus(["texts"], tok, out)
  assert manifest["sources"] == [str(texts)]  # absolute: the manifest is read from other working directories
  shard = manifest["shards"][0]
  # Only files the manifest lists take its tokenizer; a file written beside them has none.
  write_token_records(out / "custom.array_record", [[5, 6, 1]])
  assert token_shards.tokenizer_of([str(out / "custom.array_record")]) is None
  assert token_shards.tokenizer_of([str(out / shard["file"])]) == str(out / "tokenizer.json")
  # Name hashes of another length than the shard's records would shift the held-out split.
  # So would signed ones (a hash past 2**63 turns negative and moves across the cut).
  for wrong in (np.zeros(shard["documents"] - 1, np.uint64), np.zeros(shard["documents"], np.int64)):
    np.save(out / shard["name_hashes"], wrong)
    with pytest.raises(ValueError, match=r"not the uint64\[7\] name hashes"):
      check_shards([str(out / shard["file"])], [shard["documents"]], None, None)
  # A link to a listed shard takes the tokenizer of the folder the shard really is in.
  (tmp_path / "linked").mkdir()
  os.symlink(out / shard["file"], tmp_path / "linked" / shard["file"])
  assert token_shards.tokenizer_of([str(tmp_path / "linked" / shard["file"])]) == str(out / "tokenizer.json")


def _tokenized(folder, tok, out):
  """(manifest, shard paths, their record counts) of `folder` tokenized into `out`."""
  manifest = tokenize_corpus([str(folder)], tok, out)
  return manifest, [str(out / s["file"]) for s in manifest["shards"]], [s["documents"] for s in manifest["shards"]]


def test_shards_are_checked_against_their_manifest(corpus, tmp_path):
  _, folder, _, tok = corpus
  out = tmp_path / "ids"
  manifest, files, counts = _tokenized(folder, tok, out)
  largest = max(s["max_id"] for s in manifest["shards"])
  check_shards(files, counts, tok, largest + 1)  # fits exactly

  # A model vocabulary below the largest id is refused up front (not when that record is read, mid-run).
  with pytest.raises(ValueError, match=rf"holds token id {largest}, outside the model's vocabulary \[0, {largest - 1}"):
    check_shards(files, counts, None, largest)
  cfg = DataConfig(paths=(str(out / "*.array_record"),), seq_len=8, batch_size=1, eval_fraction=0.0, prefetch=0)
  with pytest.raises(ValueError, match=r"ids/tokenizer.json has vocabulary size \d+ > the model's vocab_size"):
    make_data(cfg, tmp_path / "run", model_vocab_size=largest, process_index=0, process_count=1)
  os.remove(out / "tokenizer.json")  # without it the shards train tokenizer-less, and their manifest still checks
  with pytest.raises(ValueError, match=r"outside the model's vocabulary .*manifest.json"):
    make_data(cfg, tmp_path / "run", model_vocab_size=largest, process_index=0, process_count=1)
  shutil.copyfile(tok.path, out / "tokenizer.json")

  # Another tokenizer than the one that wrote the ids.
  other = train_bpe(["other words entirely " * 50], 280, tmp_path / "other" / "tokenizer.json")
  with pytest.raises(ValueError, match=r"was tokenized with .*ids/tokenizer.json, not with the tokenizer of this run"):
    make_data(dataclasses.replace(cfg, tokenizer=other.path), tmp_path / "run2", model_vocab_size=512,
              process_index=0, process_count=1)
  # The refused tokenizer is not left in the run directory: the corrected launch (the shards' own) goes through.
  assert not (tmp_path / "run2" / "tokenizer.json").exists()
  fixed = make_data(cfg, tmp_path / "run2", model_vocab_size=512, process_index=0, process_count=1)
  assert fixed.tokenizer.fingerprint == tok.fingerprint

  # Shards of two tokenizers in one run.
  tokenize_corpus([str(folder)], other, tmp_path / "other_ids")
  with pytest.raises(ValueError, match=r"tokens-00000.array_record and .*other_ids/tokens-00000.array_record were "
                                       r"tokenized with different tokenizers"):
    make_data(dataclasses.replace(cfg, paths=(*cfg.paths, str(tmp_path / "other_ids" / "*.array_record"))),
              tmp_path / "run4", model_vocab_size=512, process_index=0, process_count=1)

  # A shard replaced after the manifest was written.
  write_token_records(files[0], [[5, 6, 1]])
  with pytest.raises(ValueError, match=r"tokens-00000.array_record holds 1 records, but .*manifest.json says"):
    make_data(cfg, tmp_path / "run3", model_vocab_size=512, process_index=0, process_count=1)
  # A shard removed after the manifest was written: the glob matches the others, which would train on a corpus with
  # a hole in it.
  split = tmp_path / "split_ids"
  tokenize_corpus([str(folder)], tok, split, shard_tokens=64)
  assert len(list(split.glob("*.array_record"))) >= 3
  os.remove(split / "tokens-00001.array_record")
  with pytest.raises(ValueError, match=r"split_ids/manifest.json lists tokens-00001.array_record, which the folder "
                                       r"no longer holds"):
    make_data(dataclasses.replace(cfg, paths=(str(split / "*.array_record"),)), tmp_path / "run5",
              model_vocab_size=512, process_index=0, process_count=1)
  # A file beside them that the manifest does not list is read unchecked, as anywhere else.
  write_token_records(split / "custom.array_record", [[5, 6, 1]])
  assert check_shards([str(split / "custom.array_record")], [1], None, 512) == [None]
  # ArrayRecord files without a manifest are not checked (written by write_token_records, say).
  os.remove(out / MANIFEST)
  check_shards(files, [1, *counts[1:]], None, 2)


def test_a_stopped_or_refused_run_leaves_nothing(corpus, tmp_path):
  _, folder, _, tok = corpus

  def stop(totals):
    raise KeyboardInterrupt  # Ctrl-C (or launch/pretokenize.py's SIGTERM) after the first encoded chunk

  with pytest.raises(KeyboardInterrupt):
    tokenize_corpus([str(folder)], tok, tmp_path / "ids", shard_tokens=50, progress=stop)
  assert os.listdir(tmp_path) == []  # no output, no hidden temporary folder

  (tmp_path / "ids").mkdir()
  (tmp_path / "ids" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=r"ids exists and is not empty"):
    tokenize_corpus([str(folder)], tok, tmp_path / "ids")
  assert os.listdir(tmp_path / "ids") == ["keep.txt"]
  # A path without text fails after the earlier paths' documents were read: nothing is written either.
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"blank: no text"):
    tokenize_corpus([str(folder), str(tmp_path / "blank")], tok, tmp_path / "ids2")
  assert sorted(os.listdir(tmp_path)) == ["blank", "ids"]


def test_command_line(corpus, tmp_path):
  _, folder, _, tok = corpus
  tokenize = [sys.executable, os.path.join(ROOT, "launch", "pretokenize.py")]
  env = {**os.environ, "PYTHONPATH": ROOT}
  run = subprocess.run([*tokenize, f"--data={folder}", f"--tokenizer={os.path.dirname(tok.path)}",
                        f"--output={tmp_path / 'ids'}", "--shard_tokens=300"], capture_output=True, text=True,
                       env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  manifest = json.loads((tmp_path / "ids" / MANIFEST).read_text())
  assert run.stdout.startswith(f"wrote {tmp_path / 'ids'}: 15 documents, {manifest['tokens']:,} tokens in "
                               f"{len(manifest['shards'])} shard(s)")
  assert "1 file(s) skipped or read lossily, e.g. " in run.stdout and manifest["sources"] == [str(folder)]
  assert load_tokenizer(tmp_path / "ids").fingerprint == tok.fingerprint
  again = subprocess.run([*tokenize, f"--data={folder}", f"--tokenizer={tok.path}", f"--output={tmp_path / 'ids'}"],
                         capture_output=True, text=True, env=env, timeout=120)
  assert again.returncode == 1 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
  assert "Traceback" not in again.stderr
  other = tmp_path / "a_run"  # --overwrite replaces only earlier shards, and says so before any encoding
  other.mkdir()
  (other / "metrics.jsonl").write_text("{}\n")
  refused = subprocess.run([*tokenize, f"--data={folder}", f"--tokenizer={tok.path}", f"--output={other}",
                            "--overwrite"], capture_output=True, text=True, env=env, timeout=120)
  assert refused.returncode == 1 and "error: --output: " in refused.stderr, refused.stderr
  assert "not an earlier output of this kind" in refused.stderr and "shard(s) written" not in refused.stderr
  assert refused.stdout == "" and os.listdir(other) == ["metrics.jsonl"]
  missing = subprocess.run([*tokenize, f"--data={folder}"], capture_output=True, text=True, env=env, timeout=120)
  assert missing.returncode == 1 and ("error: --data, --tokenizer and --output are required; missing: --tokenizer, "
                                      "--output") in missing.stderr, missing.stderr


def test_output_that_is_or_holds_a_data_path_is_refused(corpus, tmp_path):
  # With --overwrite the corpus folder was replaced by the shards (deleted) once they were written.
  _, folder, _, tok = corpus
  texts = tmp_path / "texts"
  texts.mkdir()
  (texts / "a.txt").write_text("alpha beta gamma " * 20)
  for output in (texts, tmp_path):
    with pytest.raises(ValueError, match=r"is or holds the data path"):
      tokenize_corpus([str(texts)], tok, output, overwrite=True)
    assert (texts / "a.txt").read_text() == "alpha beta gamma " * 20
  # overwrite replaces earlier shards only (a folder with a manifest), not any folder a mistyped --output names.
  other = tmp_path / "a_run"
  other.mkdir()
  (other / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(FileExistsError, match=r"a_run is not an earlier output of this kind \(it holds none of "
                                            r"manifest.json\)"):
    tokenize_corpus([str(folder)], tok, other, overwrite=True)
  assert [p.name for p in other.iterdir()] == ["metrics.jsonl"]
  with pytest.raises(ValueError, match=r"is inside the data path"):  # the next read of the folder would fail
    tokenize_corpus([str(tmp_path / "*")], tok, texts / "ids")
  with pytest.raises(ValueError, match=r"doc_separator: must be a non-empty string"):
    tokenize_corpus([str(folder)], tok, tmp_path / "ids", doc_separator="")


def test_a_missing_or_repeated_path_fails_before_anything_is_encoded(corpus, tmp_path, monkeypatch):
  _, folder, _, tok = corpus
  monkeypatch.setattr(text_corpus, "ENCODE_CHUNK", 4)  # the first path's documents would be encoded chunk by chunk
  for paths in ([str(folder), str(tmp_path / "typo")], [str(folder), str(folder)]):
    seen = []
    with pytest.raises((FileNotFoundError, ValueError), match=r"not found|already read"):
      tokenize_corpus(paths, tok, tmp_path / "ids", progress=seen.append)
    assert seen == []  # not after the first path was tokenized


def test_manifest_problems_are_named_and_links_are_checked(corpus, tmp_path):
  _, folder, _, tok = corpus
  out = tmp_path / "ids"
  manifest, files, counts = _tokenized(folder, tok, out)
  # Linked from another folder: still checked against the manifest beside the real file.
  (tmp_path / "links").mkdir()
  links = [str(tmp_path / "links" / os.path.basename(f)) for f in files]
  for f, link in zip(files, links):
    os.symlink(f, link)
  with pytest.raises(ValueError, match=r"outside the model's vocabulary"):
    check_shards(links, counts, None, 2)
  # Another tool's manifest.json (no "format") is ignored; one of ours with keys missing is named, not a KeyError.
  (out / MANIFEST).write_text(json.dumps({"files": ["x"]}))
  check_shards(files, counts, None, 2)
  (out / MANIFEST).write_text(json.dumps({"format": 1, "tokenizer": {"sha256": "x"},
                                          "shards": [{"file": os.path.basename(files[0])}]}))
  with pytest.raises(ValueError, match=r"manifest.json: not a manifest of format 1 as launch/pretokenize.py writes"):
    check_shards(files, counts, None, None)
  # The documents' name hashes (the held-out split) must be there and fit the records.
  (out / MANIFEST).write_text(json.dumps(manifest))
  assert [len(h) for h in check_shards(files, counts, None, None)] == counts
  os.remove(out / manifest["shards"][0]["name_hashes"])
  with pytest.raises(ValueError, match=r"tokens-00000.name_hashes.npy \(the documents' name hashes of .*\) cannot"):
    check_shards(files, counts, None, None)


def test_a_damaged_shard_read_mid_run_is_one_named_error(tmp_path):
  # A damaged chunk past the records make_data reads up front failed the run with array_record's RuntimeError (a
  # traceback through grain's threads), naming every shard of the run.
  write_token_records(tmp_path / "a.array_record", [[5, 6, 1]] * 3)
  write_token_records(tmp_path / "b.array_record", [[5, 6, 7, 1]] * 40)
  with open(tmp_path / "b.array_record", "r+b") as f:
    f.seek(200)
    f.write(b"\xff" * 64)
  docs = data_lib._RecordDocuments([str(tmp_path / "a.array_record"), str(tmp_path / "b.array_record")], [3, 40],
                                   np.arange(43), None)
  assert docs[0].tolist() == [5, 6, 1]
  with pytest.raises(ValueError, match=r"^ArrayRecord file \S*/b.array_record record \d+ cannot be read: "):
    [docs[i] for i in range(43)]


def test_a_folder_of_shards_as_text_names_the_glob_to_use(tmp_path):
  (tmp_path / "ids").mkdir()
  write_token_records(tmp_path / "ids" / "tokens-00000.array_record", [[5, 6, 1]])
  for given in (tmp_path / "ids", tmp_path / "ids" / "*", tmp_path / "*"):
    with pytest.raises(ValueError, match=rf"\(e.g. {tmp_path}/ids/\*\.array_record\)"):
      text_corpus.text_documents([str(given)])


def test_a_folder_written_meanwhile_by_another_process_is_kept(tmp_path):
  # Two launch/pretokenize.py into one --output: the later silently replaced the earlier without --overwrite.
  from zaya_jax.folders import folder_in_place

  target = tmp_path / "ids"
  with pytest.raises(FileExistsError, match=r"ids was written by another process while this one ran"):
    with folder_in_place(target) as tmp:
      (tmp_path / "ids").mkdir()
      (target / "theirs.txt").write_text("theirs")
      open(os.path.join(tmp, "mine.txt"), "w").close()
  assert os.listdir(target) == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["ids"]
  (target / "theirs.txt").unlink()  # an empty folder is still taken (as check_target allows)
  with folder_in_place(target) as tmp:
    open(os.path.join(tmp, "mine.txt"), "w").close()
  assert os.listdir(target) == ["mine.txt"]


def test_a_folder_in_place_gets_the_modes_a_plain_mkdir_and_open_give(tmp_path):
  # Its files written as temporaries (mkstemp: 0600) and the folder itself (mkdtemp: 0700) would hide an export or
  # a shard folder from the other users of a shared cluster.
  import stat
  import tempfile

  from zaya_jax.folders import folder_in_place

  # Umasks that differ from what mkdtemp and mkstemp give, whatever the caller's; 002 (a shared group) tells a file's
  # 0666 & ~umask from a fixed 0644.
  for mask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o002, 0o775, 0o664)):
    out = tmp_path / f"out_{mask:03o}"
    umask = os.umask(mask)
    try:
      with folder_in_place(out) as tmp:
        fd, _ = tempfile.mkstemp(dir=tmp, suffix=".txt")
        os.close(fd)
        os.mkdir(os.path.join(tmp, "sub"))
    finally:
      os.umask(umask)
    [name] = [n for n in os.listdir(out) if n.endswith(".txt")]
    assert stat.S_IMODE(os.stat(out).st_mode) == folder_mode
    assert stat.S_IMODE(os.stat(out / name).st_mode) == file_mode
    assert stat.S_IMODE(os.stat(out / "sub").st_mode) == folder_mode  # still a folder one can enter
