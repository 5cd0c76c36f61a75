"""Pretraining data: documents -> token ids (cached in the run dir) -> packed rows [T] -> global batches -> host rows.

    data = make_data(DataConfig(seq_len=512, batch_size=16), run_dir, model_vocab_size=cfg.vocab_size)
    it = iter(data.train)   # infinite; checkpoint it with grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it)
    batch = next(it)        # {"input_ids", "segment_ids", "targets", "loss_mask"}: [batch_size / hosts, T]
    for batch in data.eval: ...   # one pass over the held-out documents per `for`

Batch contract (numpy, [B_local, T]; B_local = batch_size / process_count):
- input_ids int32, targets int32: targets[b, t] is the token after input_ids[b, t] in the same document.
- segment_ids int32: 1, 2, ... per document piece within a row (contiguous runs), 0 on padding.
- loss_mask float32: 1.0 where segment_ids > 0, 0.0 on padding. Every real position is a valid prediction: a
  document is `ids + [eos]`, rows pair ids[:-1] with ids[1:], so a document's last text token predicts eos inside its
  own segment and no target ever crosses into the next document.
- Padding (input_ids = targets = pad_id, segment 0) only occurs in eval: the last row of the pass and whole rows that
  fill the last batch up to B (shapes never change, so nothing recompiles). Train rows are always full.

Packing is grain's `ConcatThenSplitIterDataset` (concat-then-split): documents are concatenated in (shuffled) order
and cut every T tokens; a document longer than the room left is split and continues at the start of the next row as
a new segment (segment ids and the model's positions restart there; nothing is dropped). Train: documents are
shuffled per epoch with a hash of `seed` (grain reseeds every epoch), repeated forever, then rows go through a window
shuffle (`shuffle_window` rows) so the rows of one long file do not fill a batch. Eval: held-out documents in corpus
order, one pass. Every stage is a grain dataset with exact get_state/set_state.

Host sharding: every host runs the same global pipeline and keeps rows [p*B/n, (p+1)*B/n) of each global batch, so
the global batch at every step is the same for any host count (the concatenation of the hosts' blocks in process
order, which is how `jax.make_array_from_process_local_data` assembles it). The price is that each host packs every
row; packing is numpy slicing over cached ids, far cheaper than a train step.

Iterators: keep them in function scope (or `close()` them): grain 0.2.18's prefetch iterators print an
AttributeError from `__del__` when they are still alive at interpreter teardown (harmless).

Held-out split: by document, independent of `seed`: each document has a 64-bit hash of its name (path relative to
the given root + piece index; for ArrayRecord records, the hash of the text's name that launch/pretokenize.py keeps
beside them, or else the file name + record index), and a document is eval when its hash is below
eval_fraction * 2**64, so about that fraction of the documents is held out (binomially: 627 documents at 0.01 hold out
6.3 +- 2.5; the default corpus here holds out 10). The test looks at the document alone: adding documents (a second
--data path) never moves one that was held out into training, which a fixed count would (the cut moves). A corpus
too small for any hash to fall below holds out its smallest-hash document, so eval_fraction > 0 always gives an eval
split (and a document added later may then take its place).

Inputs (`DataConfig.paths`):
- text files, folders (walked recursively, hidden entries skipped), globs, read by text_corpus.py; `.gz`, `.bz2` and
  `.xz` files are decompressed; binary files (a NUL byte in the first 8 KiB: UTF-16 text too) are skipped inside
  folders, and text that is not valid UTF-8 is read with U+FFFD for its undecodable bytes: both are listed in
  `CorpusInfo.skipped` and counted in its description (which the training loop logs). One file is one document unless
  `doc_separator` is set.
  Documents are encoded with the tokenizer's own post-processor (Gemma's adds <bos>) and get `eos` appended; the ids
  are cached as `run_dir/tokens-<key>.npz`, key = sha256(tokenizer.json, document names and texts); the caches of
  other keys in the run dir (an edited corpus, another tokenizer) are removed.
  The tokenizer is `run_dir/tokenizer.json`: a BPE trained on the corpus at first use, or a copy of
  `DataConfig.tokenizer` (a different one already there is an error), so the run directory reproduces the ids.
- ArrayRecord files (`*.array_record`) of token ids: one record per document, little-endian int32 bytes, used as
  they are (`token_shards.write_token_records(..., eos_id=)` appends eos). No tokenizer is needed. launch/pretokenize.py
  writes them from text (token_shards.py), with a manifest.json that make_data checks (tokenizer, largest id).
- None: the embedded default corpus (`text_corpus.default_documents`), nothing to download:
  * the Python standard library's .py sources (sysconfig stdlib; without site-packages/dist-packages, test/tests,
    idlelib, __pycache__, the `encodings` codec tables and pydoc_data, whose text is the next item),
  * `pydoc_data.topics` (the language reference topics, one document each),
  * where installed: /usr/share/doc/python3*/html/_sources/**/*.txt (Debian python3.x-doc),
    /usr/share/games/fortunes/* (Debian fortunes; one quote per document), /usr/share/doc/jargon-text/jargon*.
  On the development machine (Python 3.11.7 under pyenv, none of the Debian packages installed) that is 548 source
  files (9.18 MB) + 79 topics (0.47 MB): 627 documents, 9.65 MB, 2.45 M tokens with the 8192-entry BPE; the first
  call (read, train the BPE, encode, cache) took 16-21 s on 2 shared cores, later calls 0.13-0.19 s.
  Subset rule: documents are taken in the order of a salted name hash (not the held-out split's) while the total
  stays <= `default_corpus_bytes` (12 MiB), which bounds the first call (BPE training + encoding) on machines with the
  Debian text packages; None takes everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import os
import re
import time
import uuid
from collections.abc import Sequence

import grain
import numpy as np

from zaya_jax.tokenizer import Tokenizer, copy_into, load_or_train, load_tokenizer
from zaya_jax.train import token_shards
from zaya_jax.train.text_corpus import (
  ARRAY_RECORD_SUFFIXES,
  default_documents,
  encode_documents,
  name_hash,
  text_documents,
)

_CACHE_FORMAT = "zaya_jax.train.data/2"  # bump when the cached ids would change (2: special-token strings are text)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to batch it. `batch_size` is global (all hosts, per step)."""

  paths: tuple[str, ...] | None = None  # text files/dirs/globs or *.array_record files; None = the default corpus
  seq_len: int = 1024
  batch_size: int = 8
  seed: int = 0
  eval_fraction: float = 0.01  # of documents, held out (see the module doc); 0 = no eval split
  shuffle: bool = True  # train only: documents per epoch + a window of packed rows
  shuffle_window: int = 128  # rows; <= 1 disables the row shuffle
  num_threads: int = 2  # grain read threads (document fetch + shift)
  prefetch: int = 2  # batches prefetched by a background thread; 0 = none
  tokenizer: str | None = None  # tokenizer.json (or its folder), copied into the run dir; None: train a BPE there
  # (text) or take the one of launch/pretokenize.py's shards (ArrayRecord; else no tokenizer)
  vocab_size: int = 8192  # of the BPE trained when `tokenizer` is None
  doc_separator: str | None = None  # split text files into documents at this string
  default_corpus_bytes: int | None = 12 * 2**20  # subset of the default corpus (see the module doc); None = all
  special_tokens_in_text: bool = False  # True: "<eos>", "<start_of_turn>"... in documents are the special tokens

  def __post_init__(self):
    paths = self.paths
    if isinstance(paths, str | os.PathLike):
      paths = (paths,)
    if paths is not None:
      paths = tuple(os.fspath(p) for p in paths)
      if not paths:
        raise ValueError("DataConfig.paths: empty; pass None for the default corpus")
    object.__setattr__(self, "paths", paths)
    for name in ("seq_len", "batch_size", "vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"DataConfig.{name}: must be a positive int, got {value!r}")
    # A bounded range (any int would do: the shuffles get hashes of it below 2**31, see _shuffle_seeds).
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
      raise ValueError(f"DataConfig.seed: must be an int in [0, 2**31), got {self.seed!r}")
    for name in ("num_threads", "prefetch", "shuffle_window"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"DataConfig.{name}: must be an int >= 0, got {value!r}")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"DataConfig.eval_fraction: must be in [0, 1), got {self.eval_fraction!r}")
    if self.default_corpus_bytes is not None and self.default_corpus_bytes <= 0:
      raise ValueError(f"DataConfig.default_corpus_bytes: must be positive or None, got {self.default_corpus_bytes}")
    if self.doc_separator == "":
      raise ValueError("DataConfig.doc_separator: must be a non-empty string or None")

  @property
  def reads_token_records(self) -> bool:
    """Whether `paths` are ArrayRecord files of token ids (no tokenizer needed) rather than text."""
    return self.paths is not None and all(p.endswith(ARRAY_RECORD_SUFFIXES) for p in self.paths)


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
  description: str
  num_docs: int
  num_train_docs: int
  num_eval_docs: int
  num_train_tokens: int | None  # input positions (len - 1 per document); None for ArrayRecord (not scanned)
  num_eval_tokens: int | None
  num_bytes: int | None  # text bytes read (None for ArrayRecord)
  cache_file: str | None  # the cached ids (text input)
  cache_hit: bool
  tokenizer_seconds: float  # load or train
  tokenize_seconds: float  # read + encode, or load the cache
  fingerprint: str = ""  # of the documents as read (names and contents; ArrayRecord: names, sizes, record counts)
  skipped: tuple[str, ...] = ()  # files of the given paths not read as text, or read lossily, with the reason


@dataclasses.dataclass(frozen=True)
class Data:
  train: grain.IterDataset  # infinite; `iter()` gives a checkpointable grain DatasetIterator
  eval: grain.IterDataset | None  # one pass per `iter()`; None when eval_fraction == 0
  tokenizer: Tokenizer | None  # None for ArrayRecord input without DataConfig.tokenizer
  info: CorpusInfo
  local_batch_size: int
  seq_len: int


# ---------------------------------------------------------------------------------------------------------------------
# Split, cache, sources


def _mix64(x_N: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer: spreads consecutive record indices over the whole 64-bit range."""
  x_N = x_N.astype(np.uint64)
  x_N = (x_N ^ (x_N >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x_N = (x_N ^ (x_N >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x_N ^ (x_N >> np.uint64(31))


def _split_indices(hashes_N: np.ndarray, eval_fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) document indices, each in corpus order. A document is held out when its hash is below
  eval_fraction * 2**64: a test of that document alone, so adding or removing other documents never moves one
  between the splits (a document held out once stays held out). When no hash is that small (a corpus of a few times
  fewer than 1 / eval_fraction documents), the document with the smallest hash is held out instead."""
  n = len(hashes_N)
  is_eval_N = np.zeros(n, bool)
  if eval_fraction > 0 and n:
    is_eval_N = hashes_N < np.uint64(min(int(eval_fraction * 2.0**64), 2**64 - 1))
    if not is_eval_N.any():
      is_eval_N[np.argmin(hashes_N)] = True
  if n and is_eval_N.all():
    raise ValueError(f"{what}: {n} document(s) cannot be split into train and eval with eval_fraction="
                     f"{eval_fraction} (every one is held out); add documents or set eval_fraction=0")
  return np.flatnonzero(~is_eval_N), np.flatnonzero(is_eval_N)


def _subset(docs: list[tuple[str, str]], max_bytes: int | None) -> list[tuple[str, str]]:
  """Documents in hash order while the total stays <= max_bytes, back in corpus order (deterministic). The hash is
  salted: in the held-out split's own hash order a subset would begin with the held-out documents (a 256 KiB subset
  of the default corpus held out 8 of its 9 documents)."""
  if max_bytes is None:
    return docs
  keep, total = [], 0
  for i in sorted(range(len(docs)), key=lambda i: name_hash("default corpus subset\0" + docs[i][0])):
    size = len(docs[i][1].encode("utf-8", "surrogateescape"))
    if total + size <= max_bytes:
      keep.append(i)
      total += size
  return [docs[i] for i in sorted(keep)]


def _corpus_key(tokenizer: Tokenizer, docs: list[tuple[str, str]], special_tokens_in_text: bool = False) -> str:
  h = hashlib.sha256(f"{_CACHE_FORMAT}\0{tokenizer.fingerprint}\0{int(special_tokens_in_text)}\0".encode())
  for name, text in docs:
    h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    h.update(text.encode("utf-8", "surrogateescape") + b"\0\0")
  return h.hexdigest()


_CACHE_NAME = re.compile(r"tokens-([0-9a-f]{20})\.npz(\.[0-9a-f]{32}\.tmp\.npz)?")


def _remove_stale_caches(run_dir: str, key: str) -> None:
  """Removes the token caches of other corpora (the corpus or the tokenizer changed since they were written) and
  their temporaries (left by a kill mid-write); those of `key` stay: another host may be writing one right now."""
  for name in os.listdir(run_dir):
    match = _CACHE_NAME.fullmatch(name)
    if match and match.group(1) != key:
      with contextlib.suppress(FileNotFoundError):  # another host removed it first
        os.remove(os.path.join(run_dir, name))


def _cached_ids(tokenizer: Tokenizer, docs: list[tuple[str, str]], run_dir: str, special_tokens_in_text: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, bool]:
  key = _corpus_key(tokenizer, docs, special_tokens_in_text)[:20]
  path = os.path.join(run_dir, f"tokens-{key}.npz")
  if os.path.isfile(path):
    _remove_stale_caches(run_dir, key)
    with np.load(path) as f:
      return f["ids"], f["offsets"], f["hashes"], path, True
  ids_M, offsets_N1, hashes_N = encode_documents(tokenizer, docs, special_tokens_in_text)
  tmp = f"{path}.{uuid.uuid4().hex}.tmp.npz"  # unique across hosts sharing the run dir
  np.savez(tmp, ids=ids_M, offsets=offsets_N1, hashes=hashes_N)
  os.replace(tmp, path)  # atomic: hosts sharing a run dir never read half a file
  _remove_stale_caches(run_dir, key)
  return ids_M, offsets_N1, hashes_N, path, False


class _PackedDocuments(Sequence):
  """Documents `index_N` of a flat id array: random access for grain.MapDataset.source."""

  def __init__(self, ids_M: np.ndarray, offsets_N1: np.ndarray, index_N: np.ndarray):
    self._ids_M, self._offsets_N1, self._index_N = ids_M, offsets_N1, index_N

  def __len__(self) -> int:
    return len(self._index_N)

  def __getitem__(self, i: int) -> np.ndarray:
    d = self._index_N[i]
    return self._ids_M[self._offsets_N1[d]:self._offsets_N1[d + 1]]

  def num_positions(self) -> int:
    lengths_N = self._offsets_N1[self._index_N + 1] - self._offsets_N1[self._index_N]
    return int(np.sum(lengths_N - 1))


class _RecordDocuments(Sequence):
  """Records `index_N` of ArrayRecord files, decoded as int32 ids (checked against the model's vocabulary)."""

  def __init__(self, paths: Sequence[str], counts: Sequence[int], index_N: np.ndarray, max_id: int | None):
    self._paths, self._index_N, self._max_id = tuple(paths), index_N, max_id
    self._starts = np.cumsum([0, *counts])  # global record index -> (file, record in it), for error messages
    self._source = grain.sources.ArrayRecordDataSource(list(paths))

  def __len__(self) -> int:
    return len(self._index_N)

  def _where(self, record: int) -> str:
    f = int(np.searchsorted(self._starts, record, side="right")) - 1
    return f"ArrayRecord file {self._paths[f]} record {record - int(self._starts[f])}"

  def __getitem__(self, i: int) -> np.ndarray:
    index = int(self._index_N[i])
    try:
      record = self._source[index]
    except RuntimeError as e:  # array_record's corrupt chunk (a damaged file): one error line, not a traceback
      raise ValueError(f"{self._where(index)} cannot be read: {e}") from None
    if len(record) % 4:
      raise ValueError(f"{self._where(index)}: {len(record)} bytes, not a whole number of int32 token ids (write "
                       "records with token_shards.write_token_records)")
    ids_L = np.frombuffer(record, "<i4").astype(np.int32)
    if self._max_id is not None and len(ids_L) and (ids_L.max() > self._max_id or ids_L.min() < 0):
      raise ValueError(f"{self._where(index)}: ids in [{ids_L.min()}, {ids_L.max()}] outside the model's "
                       f"vocabulary [0, {self._max_id}]")
    return ids_L


def _expand_record_paths(paths: Sequence[str]) -> list[str]:
  files, seen = [], {}
  for path in paths:
    path = os.path.expanduser(path)
    matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not matches:
      raise FileNotFoundError(f"data path: no files match {path!r}")
    for f in matches:
      if not os.path.isfile(f):
        raise FileNotFoundError(f"ArrayRecord file not found: {f}")
      real = os.path.realpath(f)
      if real in seen:  # its records would be trained on twice, and could sit on both sides of the eval split
        raise ValueError(f"ArrayRecord file {f} is given twice (also as {seen[real]}); give each file once")
      seen[real] = f
    files += matches
  return files


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline stages (module-level functions so the pipeline pickles, e.g. for mp_prefetch)


def _shift(ids_L: np.ndarray) -> dict[str, np.ndarray]:
  return {"input_ids": ids_L[:-1], "targets": ids_L[1:]}


def _long_enough(ids_L: np.ndarray) -> bool:
  return len(ids_L) >= 2


def _finish_row(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  segment_ids_T = row["input_ids_segment_ids"].astype(np.int32)
  real_T = segment_ids_T > 0
  return {"input_ids": np.where(real_T, row["input_ids"], pad_id).astype(np.int32),
          "segment_ids": segment_ids_T,
          "targets": np.where(real_T, row["targets"], pad_id).astype(np.int32),
          "loss_mask": real_T.astype(np.float32)}


def _pad_batch(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Fills the last eval batch up to `rows` with padding rows, so its shape matches every other batch."""
  missing = rows - len(batch["input_ids"])
  if missing == 0:
    return batch
  fill = {"input_ids": pad_id, "targets": pad_id, "segment_ids": 0, "loss_mask": 0}
  return {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill[k], v.dtype)]) for k, v in batch.items()}


def _host_rows(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
  return {k: v[start:stop] for k, v in batch.items()}


# How the corpus becomes the training order, recorded in checkpoints. 1: the seed as it is, and grain seeds epoch e
# with seed + e, so seed s + 1 replayed seed s's order one epoch later. 2: the seed is hashed first. 3: the held-out
# split is a hash threshold per document (it held out the ceil(eval_fraction * docs) smallest hashes), and the default
# corpus's subset (default_corpus_bytes) takes documents in another hash order than the split's.
DATA_ORDER = 3


def _shuffle_seeds(seed: int) -> tuple[int, int]:
  """(document shuffle seed, row-window shuffle seed): far apart for neighbouring `seed`s, below 2**31 so grain's
  seed + epoch and seed + window stay inside 32 bits."""
  doc, window = _mix64(np.array([2 * seed, 2 * seed + 1], np.uint64)) % np.uint64(2**31)
  return int(doc), int(window)


def _pipeline(docs: Sequence[np.ndarray], cfg: DataConfig, *, train: bool, pad_id: int, process_index: int,
              process_count: int) -> grain.IterDataset:
  ds = grain.MapDataset.source(docs).filter(_long_enough)
  doc_seed, window_seed = _shuffle_seeds(cfg.seed)
  if train:
    if cfg.shuffle:
      ds = ds.shuffle(seed=doc_seed)
    ds = ds.repeat(None)  # grain reseeds the shuffle every epoch
  it = ds.map(_shift).to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads))
  it = grain.experimental.ConcatThenSplitIterDataset(
      it, length_struct={"input_ids": cfg.seq_len, "targets": cfg.seq_len})
  it = it.map(functools.partial(_finish_row, pad_id=pad_id))
  if train and cfg.shuffle and cfg.shuffle_window > 1:
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=cfg.shuffle_window, seed=window_seed)
  it = it.batch(cfg.batch_size, drop_remainder=train)
  if not train:
    it = it.map(functools.partial(_pad_batch, rows=cfg.batch_size, pad_id=pad_id))
  if process_count > 1:
    rows = cfg.batch_size // process_count
    it = it.map(functools.partial(_host_rows, start=process_index * rows, stop=(process_index + 1) * rows))
  if cfg.prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
  return it


def _check_batch_tokens(num_tokens: int, cfg: DataConfig, what: str) -> None:
  if num_tokens < cfg.batch_size * cfg.seq_len:
    raise ValueError(f"{what}: {num_tokens} training tokens, fewer than one batch of batch_size={cfg.batch_size} x "
                     f"seq_len={cfg.seq_len} = {cfg.batch_size * cfg.seq_len}")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def make_data(cfg: DataConfig, run_dir: str | os.PathLike, *, model_vocab_size: int | None = None,
              process_index: int | None = None, process_count: int | None = None) -> Data:
  """Builds the train and eval pipelines; every input error is raised here (before any JAX compile)."""
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if cfg.batch_size % process_count:
    raise ValueError(f"DataConfig.batch_size {cfg.batch_size} is not divisible by process_count {process_count}")
  run_dir = os.fspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)

  paths = cfg.paths
  records = cfg.reads_token_records
  if paths is not None and not records and any(p.endswith(ARRAY_RECORD_SUFFIXES) for p in paths):
    raise ValueError(f"DataConfig.paths mixes ArrayRecord files and text: {paths}")
  if records:
    return _record_data(cfg, run_dir, model_vocab_size, process_index, process_count)

  t0 = time.perf_counter()
  skipped: list[str] = []
  if paths is None:
    what = "default corpus"
    docs = _subset(default_documents(), cfg.default_corpus_bytes)
  else:
    what = f"text {', '.join(paths)}"
    docs = text_documents(paths, cfg.doc_separator, skipped=skipped)
    if skipped:
      what += f" ({len(skipped)} file(s) skipped or read lossily, e.g. {skipped[0]}; CorpusInfo.skipped lists them)"
  t_read = time.perf_counter() - t0
  if cfg.tokenizer is not None:
    tokenizer = copy_into(cfg.tokenizer, run_dir, model_vocab_size)
  else:
    tokenizer = load_or_train(run_dir, lambda: (text for _, text in docs), cfg.vocab_size, model_vocab_size)
  if model_vocab_size is not None:
    tokenizer.check_fits(model_vocab_size)
  t1 = time.perf_counter()
  ids_M, offsets_N1, hashes_N, cache_file, hit = _cached_ids(tokenizer, docs, run_dir, cfg.special_tokens_in_text)
  t2 = time.perf_counter()
  train_N, eval_N = _split_indices(hashes_N, cfg.eval_fraction, what)
  train_docs = _PackedDocuments(ids_M, offsets_N1, train_N)
  eval_docs = _PackedDocuments(ids_M, offsets_N1, eval_N)
  _check_batch_tokens(train_docs.num_positions(), cfg, what)
  info = CorpusInfo(
      description=what, num_docs=len(hashes_N), num_train_docs=len(train_N), num_eval_docs=len(eval_N),
      num_train_tokens=train_docs.num_positions(), num_eval_tokens=eval_docs.num_positions(),
      num_bytes=sum(len(text.encode("utf-8", "surrogateescape")) for _, text in docs), cache_file=cache_file,
      cache_hit=hit, tokenizer_seconds=t1 - t0 - t_read, tokenize_seconds=t_read + t2 - t1,
      fingerprint=_corpus_key(tokenizer, docs, cfg.special_tokens_in_text), skipped=tuple(skipped))
  return _data(train_docs, eval_docs if len(eval_N) else None, cfg, tokenizer, tokenizer.pad_id, info,
               process_index, process_count)


def _record_data(cfg: DataConfig, run_dir: str, model_vocab_size: int | None, process_index: int,
                 process_count: int) -> Data:
  t0 = time.perf_counter()
  files = _expand_record_paths(cfg.paths)
  # Without DataConfig.tokenizer, shards from launch/pretokenize.py bring their own (for samples and exports).
  tokenizer_path = cfg.tokenizer if cfg.tokenizer is not None else token_shards.tokenizer_of(files)
  # Checked against the shards' manifests before it is copied: a refused tokenizer left in the run directory would
  # make copy_into refuse the corrected relaunch ("differs from the requested tokenizer").
  source = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
  if source is not None and model_vocab_size is not None:
    source.check_fits(model_vocab_size)
  t1 = time.perf_counter()
  # The data line names a few files, not a thousand shards.
  what = f"ArrayRecord {', '.join(files) if len(files) <= 3 else f'{files[0]}, ..., {files[-1]} ({len(files)} files)'}"
  hashes, counts, fingerprint = [], [], hashlib.sha256()
  for f in files:
    try:
      n = len(grain.sources.ArrayRecordDataSource([f]))
    except (OSError, RuntimeError, ValueError) as e:  # array_record reports a corrupt file as a RuntimeError
      raise ValueError(f"ArrayRecord file {f} cannot be read: {type(e).__name__}: {e}") from None
    if n == 0:
      raise ValueError(f"ArrayRecord file {f}: no records")
    counts.append(n)
    hashes.append(_mix64(np.uint64(name_hash(os.path.basename(f))) ^ np.arange(n, dtype=np.uint64)))
    fingerprint.update(f"{os.path.basename(f)}\0{os.path.getsize(f)}\0{n}\0".encode())
  # Shards written by launch/pretokenize.py: their manifest names the tokenizer and the largest id, and their records
  # keep the name hashes of the documents they came from, so they split as that text would.
  name_hashes = token_shards.check_shards(files, counts, source, model_vocab_size)
  tokenizer = copy_into(tokenizer_path, run_dir, model_vocab_size) if tokenizer_path is not None else None
  hashes_N = np.concatenate([h if named is None else named for h, named in zip(hashes, name_hashes, strict=True)])
  train_N, eval_N = _split_indices(hashes_N, cfg.eval_fraction, what)
  max_id = None if model_vocab_size is None else model_vocab_size - 1
  train_docs = _RecordDocuments(files, counts, train_N, max_id)
  # Scanning every record would read the whole file; reading until one batch is covered checks the size (and the
  # vocabulary of what was read) up front, and the pipeline checks the vocabulary of every later record.
  positions = 0
  for i in range(len(train_docs)):
    positions += max(len(train_docs[i]) - 1, 0)
    if positions >= cfg.batch_size * cfg.seq_len:
      break
  _check_batch_tokens(positions, cfg, what)
  info = CorpusInfo(
      description=what, num_docs=len(hashes_N), num_train_docs=len(train_N), num_eval_docs=len(eval_N),
      num_train_tokens=None, num_eval_tokens=None, num_bytes=None, cache_file=None, cache_hit=False,
      tokenizer_seconds=t1 - t0, tokenize_seconds=0.0, fingerprint=fingerprint.hexdigest())
  eval_docs = _RecordDocuments(files, counts, eval_N, max_id) if len(eval_N) else None
  pad_id = tokenizer.pad_id if tokenizer is not None else 0
  return _data(train_docs, eval_docs, cfg, tokenizer, pad_id, info, process_index, process_count)


def _data(train_docs, eval_docs, cfg, tokenizer, pad_id, info, process_index, process_count) -> Data:
  kw = dict(pad_id=pad_id, process_index=process_index, process_count=process_count)
  return Data(train=_pipeline(train_docs, cfg, train=True, **kw),
              eval=None if eval_docs is None else _pipeline(eval_docs, cfg, train=False, **kw),
              tokenizer=tokenizer, info=info, local_batch_size=cfg.batch_size // process_count, seq_len=cfg.seq_len)


def _main():
  """Builds the pipeline once and reports corpus size and timings (a function, so the iterators die before
  interpreter teardown, where grain's prefetch iterators fail to close)."""
  import argparse

  parser = argparse.ArgumentParser(description="Build the data pipeline once and report corpus size and timings.")
  parser.add_argument("run_dir")
  parser.add_argument("--paths", nargs="*", default=None)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--all", action="store_true", help="the whole default corpus (default_corpus_bytes=None)")
  args = parser.parse_args()
  t = time.perf_counter()
  data = make_data(DataConfig(paths=args.paths, seq_len=args.seq_len, batch_size=args.batch_size,
                              vocab_size=args.vocab_size, default_corpus_bytes=None if args.all else 12 * 2**20),
                   args.run_dir, process_index=0, process_count=1)
  t_build = time.perf_counter() - t
  it = iter(data.train)
  t = time.perf_counter()
  batch = next(it)
  t_first = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(20):
    next(it)
  print(data.info)
  print(f"make_data {t_build:.2f} s; first batch {t_first:.3f} s; next 20 batches {time.perf_counter() - t:.3f} s; "
        f"shapes { {k: (v.shape, v.dtype.name) for k, v in batch.items()} }")


if __name__ == "__main__":
  _main()
