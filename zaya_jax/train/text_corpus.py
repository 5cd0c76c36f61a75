"""Text corpora read as documents and encoded: what the text path of `data.make_data` and launch/pretokenize.py share.

    for name, text in iter_text_documents(["/corpus/texts", "/corpus/*.txt.gz"], doc_separator="\n\n"): ...
    ids_M, offsets_N1, hashes_N = encode_documents(tokenizer, docs)

Reading (`iter_text_documents`): files, folders (walked recursively, hidden entries skipped, linked folders followed
once) and globs; `.gz`, `.bz2` and `.xz` decompressed; binary files (a NUL byte in the first 8 KiB) skipped and text
that is not valid UTF-8 read with U+FFFD, both listed in `skipped`. A document's name is its path relative to the
given folder or glob root (+ "#k" per `doc_separator` piece): names key the held-out split and the token cache.
`default_documents` is the embedded corpus (data.py's module doc lists what it holds).

Encoding (`encode_documents`): the tokenizer's own post-processor (Gemma's adds <bos>), eos appended, documents of
fewer than 2 ids dropped, in `encode_chunks` of at most ENCODE_CHUNK documents and ENCODE_CHUNK_CHARS characters; a
longer document is encoded alone, and refused by name when the memory available cannot hold that call.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import lzma
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from zaya_jax import host_memory
from zaya_jax.tokenizer import Tokenizer

# Token-id files: data.py reads them as documents of ids; a folder of them given as text is refused, not skipped.
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
# An encode_batch call's documents and characters: the library's Encoding objects take ~100 bytes per token (a
# batch of 200 documents, 97 MB of text, peaked at 2.8 GB).
ENCODE_CHUNK, ENCODE_CHUNK_CHARS = 1024, 2**22
# A document longer than a chunk is encoded in one call, which holds ~116-132 bytes per byte of its UTF-8 text (a
# byte-level BPE on Python source, 8 to 64 MiB in one document; WORKSPACE.md "Tokenizing"; text of 3-byte characters
# that are a token each measured ~120): one 100 MB text file without a doc_separator takes ~12 GB.
ENCODE_BYTES_PER_TEXT_BYTE = 140
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "encodings", "pydoc_data"})
_FORTUNE_SEPARATOR = "\n%\n"


_DECOMPRESS = {".gz": ("gzip", gzip.decompress), ".bz2": ("bzip2", bz2.decompress), ".xz": ("xz", lzma.decompress)}


def _binary(head: bytes) -> bool:
  """A NUL byte in the first 8 KiB: skipped as binary (UTF-16 text too)."""
  return b"\0" in head[:8192]


def _read_text(path: str, skipped: list[str] | None = None) -> str | None:
  """The file as text (.gz, .bz2 and .xz decompressed), or None when it looks binary (a NUL byte in its first 8 KiB).
  Undecodable bytes become U+FFFD rather than failing the run. Each file skipped or read lossily is described in
  `skipped`, when given, so that the caller can report it."""
  with open(path, "rb") as f:
    data = f.read()
  suffix = os.path.splitext(path)[1]
  if suffix in _DECOMPRESS:
    kind, decompress = _DECOMPRESS[suffix]
    try:
      data = decompress(data)
    except (OSError, EOFError, lzma.LZMAError) as e:  # BadGzipFile is an OSError; a cut file raises EOFError
      raise ValueError(f"data file {path} is not a readable {kind} file ({e}); remove it or fix it") from None
  if _binary(data):
    if skipped is not None:
      skipped.append(f"{path} (binary)")
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    if skipped is not None:
      skipped.append(f"{path} (not UTF-8: undecodable bytes read as U+FFFD)")
    return data.decode("utf-8", errors="replace")


def _walk(root: str) -> list[str]:
  """Files under root (hidden ones skipped), in sorted order. Linked folders are followed, as linked files are read;
  a folder reached again (a link loop, or two links to one place) is walked once."""
  files, walked = [], set()
  for d, dirs, names in os.walk(root, followlinks=True):
    walked.add(os.path.realpath(d))
    dirs[:] = sorted(x for x in dirs if not x.startswith(".") and os.path.realpath(os.path.join(d, x)) not in walked)
    walked.update(os.path.realpath(os.path.join(d, x)) for x in dirs)
    files += [os.path.join(d, n) for n in sorted(names) if not n.startswith(".")]
  return files


def glob_root(pattern: str) -> str:
  """The folder before the first wildcard: names of matched files are relative to it."""
  parts = pattern.split(os.sep)
  for i, part in enumerate(parts):
    if glob.has_magic(part):
      # "/data*/x": the root is "/", not the working directory (names key the eval split and the token cache).
      return os.sep.join(parts[:i]) or (os.sep if os.path.isabs(pattern) else ".")
  return os.path.dirname(pattern)


def _split(name: str, text: str, separator: str | None) -> list[tuple[str, str]]:
  if separator is None:
    return [(name, text)] if text else []
  return [(f"{name}#{k}", piece) for k, piece in enumerate(text.split(separator)) if piece.strip()]


def iter_text_documents(paths: Sequence[str], doc_separator: str | None = None, *,
                        skipped: list[str] | None = None) -> Iterator[tuple[str, str]]:
  """(name, text) per document, one file read at a time. Names are paths relative to the given folder / glob root (a
  file: its basename). Files skipped as binary, or read with undecodable bytes replaced, are listed in `skipped` when
  it is given. A missing path raises before the first document; a path with no text raises once its files are read
  (after the documents of earlier paths)."""
  if doc_separator == "":  # str.split's own error would not name it
    raise ValueError("doc_separator: must be a non-empty string or None")
  # Every path's files first: a missing path, a path given twice or a folder of ArrayRecord files fails before any
  # reading (launch/pretokenize.py would otherwise tokenize the earlier paths first, then delete their shards).
  resolved, earlier = [], set()
  for path in paths:
    path = os.path.expanduser(path)
    if glob.has_magic(path):
      matches = sorted(glob.glob(path, recursive=True))
      if not matches:
        raise FileNotFoundError(f"data path: no files match {path!r}")
      root = glob_root(path)
      files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
      named = [(os.path.relpath(f, root), f) for f in files]
    elif os.path.isdir(path):
      base = os.path.basename(os.path.normpath(path))
      named = [(os.path.join(base, os.path.relpath(f, path)), f) for f in _walk(path)]
    elif os.path.isfile(path):
      named = [(os.path.basename(path), path)]
    else:
      raise FileNotFoundError(f"data path not found: {path}")
    records = [f for _, f in named if f.endswith(ARRAY_RECORD_SUFFIXES)]
    if records:  # walked as text they would be skipped as binary
      shards = os.path.join(os.path.dirname(records[0]), "*" + ARRAY_RECORD_SUFFIXES[0])
      raise ValueError(f"data path {path} holds ArrayRecord files (e.g. {records[0]}): give them as files or a glob "
                       f"(e.g. {shards}), not in a folder of text")
    reals = {os.path.realpath(f) for _, f in named if os.path.isfile(f)}
    if reals and reals <= earlier:
      raise ValueError(f"data path {path}: every file in it was already read through an earlier data path; "
                       "give each file once")
    earlier |= reals
    resolved.append((path, named))
  if doc_separator is None:  # a file is one document: one too long to encode is refused before anything is read
    for _, named in resolved:
      for name, file in named:
        plain = os.path.isfile(file) and os.path.splitext(file)[1] not in _DECOMPRESS
        size = os.path.getsize(file) if plain else 0
        if size > ENCODE_CHUNK_CHARS:  # smaller ones share a chunk of <= 4 Mi characters
          with open(file, "rb") as f:
            if not _binary(f.read(8192)):
              _check_encode_fits(name, size)
  seen = set()
  for path, named in resolved:
    found, repeated = 0, 0
    for name, file in named:
      real = os.path.realpath(file)
      if real in seen or not os.path.isfile(real):
        repeated += real in seen
        continue
      seen.add(real)
      text = _read_text(file, skipped)
      if text is not None:
        pieces = _split(name, text, doc_separator)
        found += len(pieces)
        yield from pieces
    if not found and repeated:
      raise ValueError(f"data path {path}: every file in it was already read through an earlier data path; "
                       "give each file once")
    if not found:
      raise ValueError(f"data path {path}: no text (empty, binary, or only blank documents)")


def text_documents(paths: Sequence[str], doc_separator: str | None = None, *, skipped: list[str] | None = None
                   ) -> list[tuple[str, str]]:
  """`iter_text_documents` as a list (the whole corpus in memory: make_data's text path)."""
  return list(iter_text_documents(paths, doc_separator, skipped=skipped))


def default_documents(stdlib_root: str | None = None, share_root: str = "/usr/share") -> list[tuple[str, str]]:
  """The embedded corpus (module doc): stdlib sources, pydoc topics, and Debian text packages where installed."""
  import pydoc_data.topics  # the stdlib's own copy of the language reference topics

  stdlib_root = stdlib_root or sysconfig.get_paths()["stdlib"]
  docs = []
  for d, dirs, names in os.walk(stdlib_root):
    dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith("."))
    for n in sorted(names):
      if n.endswith(".py"):
        text = _read_text(os.path.join(d, n))
        if text:
          docs.append((f"stdlib/{os.path.relpath(os.path.join(d, n), stdlib_root)}", text))
  docs += [(f"pydoc_topics/{k}", v) for k, v in sorted(pydoc_data.topics.topics.items()) if v.strip()]
  for source in sorted(glob.glob(os.path.join(share_root, "doc", "python3*", "html", "_sources"))):
    for f in _walk(source):
      if f.endswith(".txt"):
        text = _read_text(f)
        if text:
          docs.append((f"python-doc/{os.path.relpath(f, source)}", text))
  fortunes = os.path.join(share_root, "games", "fortunes")
  seen = set()
  for f in (_walk(fortunes) if os.path.isdir(fortunes) else []):
    real = os.path.realpath(f)
    if f.endswith((".dat", ".u8")) or real in seen:  # .dat: strfile indexes; .u8: UTF-8 copies of the same cookies
      continue
    seen.add(real)
    text = _read_text(f)
    if text:
      docs += _split(f"fortunes/{os.path.relpath(f, fortunes)}", text, _FORTUNE_SEPARATOR)
  for f in sorted(glob.glob(os.path.join(share_root, "doc", "jargon-text", "jargon*.txt*"))):
    text = _read_text(f)
    if text:
      docs.append((f"jargon/{os.path.basename(f)}", text))
  return docs


def name_hash(name: str) -> int:
  """64-bit hash of a document's name: its side of the held-out split (data._split_indices)."""
  return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def encode_chunks(docs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
  """Consecutive documents in lists of at most ENCODE_CHUNK documents and ENCODE_CHUNK_CHARS characters (a longer
  document is a list of its own): what one encode_batch call takes."""
  chunk, chars = [], 0
  for doc in docs:
    if len(doc[1]) > ENCODE_CHUNK_CHARS:
      _check_encode_fits(doc[0], len(doc[1].encode("utf-8", "surrogateescape")))
    if chunk and (len(chunk) == ENCODE_CHUNK or chars + len(doc[1]) > ENCODE_CHUNK_CHARS):
      yield chunk
      chunk, chars = [], 0
    chunk.append(doc)
    chars += len(doc[1])
  if chunk:
    yield chunk


def _check_encode_fits(name: str, size: int) -> None:
  """Refuses a document of `size` bytes of text whose one encode call would not fit in memory (the kernel would kill
  the process with no word of why), naming it and the remedy."""
  need, available = size * ENCODE_BYTES_PER_TEXT_BYTE, host_memory.available_memory()
  if available is not None and need > available:
    raise ValueError(
        f"document {name} holds {size:,} bytes of text: the tokenizer takes ~{need / 2**30:.1f} GiB to encode "
        f"one document, and this process can allocate {available / 2**30:.1f} GiB. Split it into "
        "documents (a doc_separator: --set=data.doc_separator=$'\\n\\n' for training, --doc_separator for "
        "launch/pretokenize.py) or into smaller files")


def encode_documents(tokenizer: Tokenizer, docs: list[tuple[str, str]], special_tokens_in_text: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids_M, offsets_N1, hashes_N): every document ends in eos; documents with < 2 ids (nothing to predict) dropped.
  By default documents are plain text: a literal "<eos>" or "<pad>" in a file is encoded as the characters it is, not
  as the special token, which would end a document early or feed a pad id as input. `special_tokens_in_text` parses
  them as the special tokens (chat-formatted text with "<start_of_turn>" markers)."""
  pieces, hashes = [], []
  literal = tokenizer.hf.encode_special_tokens
  tokenizer.hf.encode_special_tokens = not special_tokens_in_text
  try:
    for chunk in encode_chunks(docs):
      for (name, _), ids_L in zip(chunk, tokenizer.encode_batch([text for _, text in chunk])):
        if len(ids_L) == 0 or ids_L[-1] != tokenizer.eos_id:
          ids_L = np.append(ids_L, np.int32(tokenizer.eos_id))
        if len(ids_L) >= 2:
          pieces.append(ids_L)
          hashes.append(name_hash(name))
  finally:
    tokenizer.hf.encode_special_tokens = literal
  offsets_N1 = np.zeros(len(pieces) + 1, np.int64)
  np.cumsum([len(p) for p in pieces], out=offsets_N1[1:])
  ids_M = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
  return ids_M, offsets_N1, np.asarray(hashes, np.uint64)
