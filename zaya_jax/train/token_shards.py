"""Text corpora tokenized once into ArrayRecord shards: for corpora too large to read and tokenize at every launch.

    manifest = tokenize_corpus(["/corpus/texts"], load_tokenizer("tokenizer.json"), "/data/corpus-ids")
    DataConfig(paths=("/data/corpus-ids/*.array_record",), tokenizer="/data/corpus-ids/tokenizer.json")

Documents are read as the text path of `data.make_data` reads them (`data.iter_text_documents`: files, folders, globs,
compressed files, binary files skipped and listed, `doc_separator`) and encoded by the same function (the tokenizer's
post-processor, eos appended, documents of fewer than 2 ids dropped), one record per document: a run on the shards
trains on the same documents' ids as a run on the text. Their order and held-out split differ: on ArrayRecord input
those hash the shard's name and the record's index.

The output folder holds the shards (`tokens-00000.array_record`, ...; a new one after `shard_tokens` tokens), the
tokenizer (tokenizer.json and its side files) and `manifest.json`: the sources, the tokenizer's sha256, and per shard
its documents, tokens and largest id. `check_shards` (called by make_data) reads it for the shards a run is given:
another tokenizer than the one that wrote them (or shards of two tokenizers), a model vocabulary that their largest
id does not fit, or a shard whose record count differs from the manifest's is refused before training. The folder
is written beside its final name and renamed into place (`folders.folder_in_place`): complete or absent. Memory:
one shard's ids and one encode chunk (`data.encode_chunks`: a few MB of text), whatever the corpus's size.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Sequence

from zaya_jax.folders import folder_in_place
from zaya_jax.tokenizer import TOKENIZER_FILE, Tokenizer, side_files

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def shard_name(index: int) -> str:
  return f"tokens-{index:05d}.array_record"


def tokenize_corpus(paths: Sequence[str], tokenizer: Tokenizer, output: str | os.PathLike, *,
                    doc_separator: str | None = None, special_tokens_in_text: bool = False,
                    shard_tokens: int = 2**26, overwrite: bool = False,
                    progress: Callable[[dict], None] | None = None) -> dict:
  """Writes `output` (module doc) and returns its manifest. `progress` is called with the running totals after each
  encoded chunk of documents (and may raise to stop: nothing is left behind)."""
  from zaya_jax.train import data  # here, not at the top: data imports this module

  if shard_tokens < 1:
    raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
  skipped: list[str] = []
  totals = {"documents": 0, "tokens": 0, "dropped": 0}
  with folder_in_place(output, overwrite=overwrite) as tmp:
    shards, pending, pending_tokens = [], [], 0

    def flush():
      nonlocal pending, pending_tokens
      name = shard_name(len(shards))
      data.write_token_records(os.path.join(tmp, name), pending)
      shards.append({"file": name, "documents": len(pending), "tokens": pending_tokens,
                     "max_id": int(max(int(ids.max()) for ids in pending))})
      pending, pending_tokens = [], 0

    for chunk in data.encode_chunks(data.iter_text_documents(paths, doc_separator, skipped=skipped)):
      ids_M, offsets_N1, _ = data.encode_documents(tokenizer, chunk, special_tokens_in_text)
      totals["dropped"] += len(chunk) - (len(offsets_N1) - 1)
      for start, stop in itertools.pairwise(offsets_N1.tolist()):
        pending.append(ids_M[start:stop])
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


def check_shards(files: Sequence[str], records: Sequence[int], tokenizer: Tokenizer | None,
                 model_vocab_size: int | None) -> None:
  """Checks ArrayRecord `files` (holding `records` records each) against the manifest.json beside them, where there
  is one that lists them (files written by other means pass unchecked)."""
  manifests: dict[str, dict | None] = {}
  written_with: dict[str, str] = {}  # tokenizer sha256 -> a shard written with it
  for file, n in zip(files, records, strict=True):
    folder = os.path.dirname(os.path.abspath(file))
    if folder not in manifests:
      path = os.path.join(folder, MANIFEST)
      try:
        with open(path) as f:
          manifests[folder] = json.load(f)
      except FileNotFoundError:
        manifests[folder] = None
      except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    manifest = manifests[folder]
    shard = None if manifest is None else {s["file"]: s for s in manifest["shards"]}.get(os.path.basename(file))
    if shard is None:
      continue
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
