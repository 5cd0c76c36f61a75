"""Text corpora tokenized once into ArrayRecord shards: for corpora too large to read and tokenize at every launch.

    manifest = tokenize_corpus(["/corpus/texts"], load_tokenizer("tokenizer.json"), "/data/corpus-ids")
    DataConfig(paths=("/data/corpus-ids/*.array_record",), tokenizer="/data/corpus-ids/tokenizer.json")

Documents are read as the text path of `data.make_data` reads them (`text_corpus.iter_text_documents`: files,
folders, globs, compressed files, binary files skipped and listed, `doc_separator`) and encoded by the same function
(the tokenizer's post-processor, eos appended, documents of fewer than 2 ids dropped), one record per document
(`write_token_records`, which also writes ArrayRecord files of ids from other sources), in corpus order. Each
shard keeps its documents' name hashes (`tokens-00000.name_hashes.npy`), which make_data's held-out split reads
instead of hashing the shard's name and record index. So a run on the shards holds out the same documents as a run
on the text, and, its documents the same in the same order, sees the same batches; and documents added to the text
and tokenized again do not move the others between the splits.

The output folder holds the shards (`tokens-00000.array_record`, ...; a new one after `shard_tokens` tokens) and
their name hashes, the tokenizer (tokenizer.json and its side files) and `manifest.json`: the sources, the
tokenizer's sha256, and per shard its documents, tokens and largest id. make_data takes the tokenizer from it when
its DataConfig names none (`tokenizer_of`), and `check_shards` reads it for the shards a run is given: another
tokenizer than the one that wrote them (or shards of two tokenizers), a model vocabulary that their largest id does
not fit, a shard whose record count differs from the manifest's, or a shard it lists that the folder no longer holds
is refused before training (the records' contents are not checked). The folder is written beside its final name and
renamed into place (`folders.folder_in_place`): complete or absent; an output that is, holds or sits inside a data
path is refused.
Memory: one shard's ids, one file's text and one encode chunk (`text_corpus.encode_chunks`: 4 MiB of text, or one longer
document: ~130 bytes per byte of text, refused by name when the memory available cannot hold it), whatever the
corpus's size.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from zaya_jax.folders import folder_in_place
from zaya_jax.tokenizer import TOKENIZER_FILE, Tokenizer, side_files
from zaya_jax.train import text_corpus

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def write_token_records(path: str | os.PathLike, docs, eos_id: int | None = None) -> int:
  """Writes one ArrayRecord record per document (little-endian int32 ids, + eos_id if given); returns the count.

  Atomically: the records go to a temporary file renamed into place at the end, so an error or a kill midway leaves
  no well-formed but truncated file at `path` for a later run to read as the whole corpus."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access for shuffling
  n, complete = 0, False
  try:
    for ids in docs:
      ids_L = np.asarray(ids, "<i4").reshape(-1)
      if eos_id is not None:
        ids_L = np.append(ids_L, np.int32(eos_id)).astype("<i4")
      writer.write(ids_L.tobytes())
      n += 1
    complete = True
  finally:
    writer.close()
    if not complete and os.path.exists(tmp):
      os.remove(tmp)
  os.replace(tmp, path)
  return n


def shard_name(index: int) -> str:
  return f"tokens-{index:05d}.array_record"


def tokenize_corpus(paths: Sequence[str], tokenizer: Tokenizer, output: str | os.PathLike, *,
                    doc_separator: str | None = None, special_tokens_in_text: bool = False,
                    shard_tokens: int = 2**26, overwrite: bool = False,
                    progress: Callable[[dict], None] | None = None) -> dict:
  """Writes `output` (module doc) and returns its manifest. `progress` is called with the running totals after each
  encoded chunk of documents (and may raise to stop: nothing is left behind)."""
  if shard_tokens < 1:
    raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
  _check_output_outside_data(paths, output)
  skipped: list[str] = []
  totals = {"documents": 0, "tokens": 0, "dropped": 0}
  with folder_in_place(output, overwrite=overwrite, own_files=(MANIFEST,)) as tmp:
    shards, pending, pending_hashes, pending_tokens = [], [], [], 0

    def flush():
      nonlocal pending, pending_hashes, pending_tokens
      name = shard_name(len(shards))
      hashes_name = name.replace(".array_record", ".name_hashes.npy")
      write_token_records(os.path.join(tmp, name), pending)
      np.save(os.path.join(tmp, hashes_name), np.asarray(pending_hashes, np.uint64))
      shards.append({"file": name, "documents": len(pending), "tokens": pending_tokens,
                     "max_id": int(max(int(ids.max()) for ids in pending)), "name_hashes": hashes_name})
      pending, pending_hashes, pending_tokens = [], [], 0

    for chunk in text_corpus.encode_chunks(text_corpus.iter_text_documents(paths, doc_separator, skipped=skipped)):
      ids_M, offsets_N1, hashes_N = text_corpus.encode_documents(tokenizer, chunk, special_tokens_in_text)
      totals["dropped"] += len(chunk) - (len(offsets_N1) - 1)
      for (start, stop), name_hash in zip(itertools.pairwise(offsets_N1.tolist()), hashes_N.tolist(), strict=True):
        pending.append(ids_M[start:stop])
        pending_hashes.append(name_hash)
        pending_tokens += stop - start
        totals["documents"] += 1
        totals["tokens"] += stop - start
        if pending_tokens >= shard_tokens:
          flush()
      if progress is not None:
        progress(dict(totals, shards=len(shards)))
    if pending:
      flush()
    if not shards:
      raise ValueError(f"data paths {', '.join(paths)}: no document has 2 or more ids")
    shutil.copyfile(tokenizer.path, os.path.join(tmp, TOKENIZER_FILE))
    for file in side_files(os.path.dirname(tokenizer.path)):  # its eos/pad names and chat template
      shutil.copyfile(file, os.path.join(tmp, os.path.basename(file)))
    manifest = {"format": MANIFEST_FORMAT, "sources": [os.path.abspath(os.path.expanduser(p)) for p in paths],
                "doc_separator": doc_separator, "special_tokens_in_text": special_tokens_in_text,
                "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer.fingerprint,
                              "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                **totals, "skipped": skipped, "shards": shards}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
  return manifest


def _check_output_outside_data(paths: Sequence[str], output: str | os.PathLike) -> None:
  """`output` must not be, hold or sit inside a data path: with overwrite the old folder (the corpus) is deleted once
  the shards are in, and shards inside a data folder make it unreadable as text next time."""
  out = os.path.realpath(os.path.expanduser(os.fspath(output)))
  for p in paths:
    p = os.path.expanduser(p)
    root = os.path.realpath(text_corpus.glob_root(p) if glob.has_magic(p) else p)
    common = os.path.commonpath([out, root])
    if common == out:
      raise ValueError(f"output {output} is or holds the data path {p}: writing it would replace the text")
    if common == root and os.path.isdir(root):
      raise ValueError(f"output {output} is inside the data path {p}: write the shards elsewhere")


_SHARD_KEYS = ("file", "documents", "tokens", "max_id", "name_hashes")


def _read_manifest(folder: str) -> dict | None:
  """`folder`'s manifest.json as launch/pretokenize.py writes it; None when there is none, or another tool's (a
  generic file name: without our "format" key it is not ours to check against)."""
  path = os.path.join(folder, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read: {e}") from None
  if not isinstance(manifest, dict) or "format" not in manifest:
    return None
  written_by, shards = manifest.get("tokenizer"), manifest.get("shards")
  if (manifest["format"] != MANIFEST_FORMAT or not isinstance(written_by, dict)
      or not {"file", "sha256", "vocab_size"} <= written_by.keys() or not isinstance(shards, list)
      or not all(isinstance(s, dict) and set(_SHARD_KEYS) <= s.keys() for s in shards)):
    raise ValueError(f"{path}: not a manifest of format {MANIFEST_FORMAT} as launch/pretokenize.py writes it "
                     "(tokenize again, or remove it to train on the files unchecked)")
  return manifest


def tokenizer_of(files: Sequence[str]) -> str | None:
  """The tokenizer.json that the manifest of the first of `files` it lists names, if any (check_shards then refuses
  shards of other tokenizers)."""
  for file in files:
    real = os.path.realpath(file)
    manifest = _read_manifest(os.path.dirname(real))
    if manifest is not None and any(s["file"] == os.path.basename(real) for s in manifest["shards"]):
      path = os.path.join(os.path.dirname(real), manifest["tokenizer"]["file"])
      return path if os.path.isfile(path) else None  # removed since: train without one (check_shards still checks)
  return None


def _check_no_shard_missing(folder: str, manifest: dict) -> None:
  """A shard that its manifest lists and the folder no longer holds: a glob over the folder would train on the
  rest without a word, a corpus with a hole in it."""
  listed = [shard["file"] for shard in manifest["shards"]]
  missing = [name for name in listed if not os.path.isfile(os.path.join(folder, name))]
  if missing:
    names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise ValueError(f"{os.path.join(folder, MANIFEST)} lists {names}, which the folder no longer holds: the folder "
                     "was changed after it was written; tokenize it again")


def check_shards(files: Sequence[str], records: Sequence[int], tokenizer: Tokenizer | None,
                 model_vocab_size: int | None) -> list[np.ndarray | None]:
  """Checks ArrayRecord `files` (holding `records` records each) against the manifest.json beside them (beside the
  file a link points to), where there is one that lists them; files written by other means pass unchecked. A folder
  one of whose listed shards the run reads must still hold all of them.
  Returns, per file, its documents' name hashes where the manifest has them (the held-out split of the text they
  came from), else None."""
  manifests: dict[str, dict | None] = {}
  listed: dict[str, dict[str, dict]] = {}  # folder -> its manifest's shards by file name
  complete: set[str] = set()  # folders whose listed shards are all there
  written_with: dict[str, str] = {}  # tokenizer sha256 -> a shard written with it
  name_hashes: list[np.ndarray | None] = []
  for file, n in zip(files, records, strict=True):
    real = os.path.realpath(file)
    folder = os.path.dirname(real)
    if folder not in manifests:
      manifests[folder] = _read_manifest(folder)
      listed[folder] = {s["file"]: s for s in (manifests[folder] or {"shards": ()})["shards"]}
    manifest, shard = manifests[folder], listed[folder].get(os.path.basename(real))
    if shard is None:
      name_hashes.append(None)
      continue
    if folder not in complete:  # once per folder, and only for one whose shards the run reads
      _check_no_shard_missing(folder, manifest)
      complete.add(folder)
    if shard["documents"] != n:
      raise ValueError(f"ArrayRecord file {file} holds {n} records, but {os.path.join(folder, MANIFEST)} says "
                       f"{shard['documents']}: the folder was changed after it was written; tokenize it again")
    written_by = manifest["tokenizer"]
    written_with.setdefault(written_by["sha256"], file)
    if len(written_with) > 1:
      raise ValueError(f"ArrayRecord files {' and '.join(written_with.values())} were tokenized with different "
                       "tokenizers (their manifest.json): one run's ids must mean the same text")
    if tokenizer is not None and written_by["sha256"] != tokenizer.fingerprint:
      raise ValueError(f"ArrayRecord file {file} was tokenized with {os.path.join(folder, written_by['file'])}, "
                       f"not with the tokenizer of this run ({tokenizer.path}): their ids mean other text")
    if model_vocab_size is not None and shard["max_id"] >= model_vocab_size:
      raise ValueError(f"ArrayRecord file {file} holds token id {shard['max_id']}, outside the model's vocabulary "
                       f"[0, {model_vocab_size - 1}] (manifest.json; tokenizer vocabulary {written_by['vocab_size']})")
    hashes_path = os.path.join(folder, shard["name_hashes"])
    try:
      hashes_N = np.load(hashes_path)
    except (OSError, ValueError) as e:
      raise ValueError(f"{hashes_path} (the documents' name hashes of {file}) cannot be read: {e}") from None
    if hashes_N.dtype != np.uint64 or hashes_N.shape != (n,):
      raise ValueError(f"{hashes_path}: {hashes_N.dtype}{list(hashes_N.shape)}, not the uint64[{n}] name hashes "
                       f"of {file}'s records; tokenize it again")
    name_hashes.append(hashes_N)
  return name_hashes
