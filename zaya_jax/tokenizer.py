"""Tokenizer: a Hugging Face `tokenizers.Tokenizer` plus the special ids the data pipeline needs.

Three ways in:
- `load_tokenizer(path)`: an existing `tokenizer.json` (a file, or a folder holding one — e.g. ZAYA1's / Gemma 3's).
  eos and pad come from the explicit arguments, else the folder's `tokenizer_config.json`, else well-known names.
- `copy_into(path, run_dir)`: `load_tokenizer` of a copy in the run directory, which then reproduces the ids alone.
- `load_or_train(run_dir, texts, vocab_size)`: the first call trains a byte-level BPE on `texts()` and saves it as
  `run_dir/tokenizer.json`; later calls load that file (identical ids; `texts` is not called).

The trained BPE has `<pad>` = 0 and `<eos>` = 1 and no post-processor, so `encode` adds nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
# Looked up (in order) when neither the caller nor tokenizer_config.json names the token.
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_MIN_BPE_VOCAB = 256 + 2  # the byte alphabet + <pad>, <eos>


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """`hf` is the library object (use it directly for anything not wrapped here); ids are plain ints."""

  hf: tokenizers.Tokenizer
  path: str  # the tokenizer.json it was loaded from
  eos_id: int
  pad_id: int
  bos_id: int | None = None

  @functools.cached_property
  def vocab_size(self) -> int:
    """Ids are < vocab_size (max id + 1: added tokens may sit above the base vocabulary)."""
    return max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of the tokenizer.json bytes: keys caches of token ids."""
    with open(self.path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  def encode(self, text: str) -> list[int]:
    """Ids of `text` with the tokenizer's own post-processor (Gemma's adds <bos>; the trained BPE adds nothing)."""
    return self.hf.encode(text).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` over many texts in parallel (the library's thread pool); int32 arrays."""
    return [np.asarray(e.ids, np.int32) for e in self.hf.encode_batch_fast(list(texts))]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def check_fits(self, model_vocab_size: int) -> None:
    check_vocab_fits(self.vocab_size, model_vocab_size, what=f"tokenizer {self.path}")


def check_vocab_fits(vocab_size: int, model_vocab_size: int, what: str = "tokenizer") -> None:
  """An id the embedding table does not have would index out of bounds silently under jit: refuse it here."""
  if vocab_size > model_vocab_size:
    raise ValueError(f"{what} has vocabulary size {vocab_size} > the model's vocab_size {model_vocab_size}; "
                     f"use a model with vocab_size >= {vocab_size} or a smaller tokenizer")


def _tokenizer_file(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  return path


def _config_token(config: dict, key: str) -> str | None:
  """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
  value = config.get(key)
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _find_id(hf: tokenizers.Tokenizer, explicit: str | None, configured: str | None, names: Sequence[str],
             what: str, path: str) -> int | None:
  if explicit is not None:
    token_id = hf.token_to_id(explicit)
    if token_id is None:
      raise ValueError(f"{what} token {explicit!r} is not in the vocabulary of {path}")
    return token_id
  for name in ((configured,) if configured else ()) + tuple(names):
    token_id = hf.token_to_id(name)
    if token_id is not None:
      return token_id
  return None


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None, pad_token: str | None = None
                   ) -> Tokenizer:
  """Loads `path` (a tokenizer.json, or a folder containing one). Without a pad token, pad = eos (pads are masked)."""
  file = _tokenizer_file(path)
  try:
    hf = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # the library raises a bare Exception on malformed JSON
    raise ValueError(f"cannot read tokenizer {file}: {e}") from e
  config = {}
  config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
  if os.path.isfile(config_file):
    with open(config_file) as f:
      config = json.load(f)
  eos_id = _find_id(hf, eos_token, _config_token(config, "eos_token"), _EOS_NAMES, "eos", file)
  if eos_id is None:
    raise ValueError(f"no end-of-document token found in {file} (looked for {_EOS_NAMES}); pass eos_token=")
  pad_id = _find_id(hf, pad_token, _config_token(config, "pad_token"), _PAD_NAMES, "pad", file)
  bos_id = _find_id(hf, None, _config_token(config, "bos_token"), _BOS_NAMES, "bos", file)
  return Tokenizer(hf=hf, path=file, eos_id=eos_id, pad_id=eos_id if pad_id is None else pad_id, bos_id=bos_id)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike,
              model_vocab_size: int | None = None) -> Tokenizer:
  """Trains a byte-level BPE (GPT-2 style: every byte is a base token, so any text encodes) and saves it to `path`;
  one with more tokens than `model_vocab_size` is refused before it is saved (a small corpus can give fewer tokens
  than asked, so only the trained one tells)."""
  if vocab_size < _MIN_BPE_VOCAB:
    raise ValueError(f"BPE vocab_size {vocab_size} < {_MIN_BPE_VOCAB} (256 byte tokens + {PAD_TOKEN} + {EOS_TOKEN})")
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  hf.train_from_iterator(texts, trainer)
  if model_vocab_size is not None:
    check_vocab_fits(hf.get_vocab_size(), model_vocab_size, what=f"the BPE trained for vocab_size {vocab_size}")
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # unique across hosts sharing the run dir
  hf.save(tmp)
  os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
  return load_tokenizer(path, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


# Beside a BPE trained in a run directory: the vocab_size it was trained for (a small corpus can give fewer tokens,
# so the file's own size does not tell).
TRAINED_FOR_FILE = "tokenizer_trained_for.json"


def load_or_train(run_dir: str | os.PathLike, texts: Callable[[], Iterable[str]], vocab_size: int,
                  model_vocab_size: int | None = None) -> Tokenizer:
  """`run_dir/tokenizer.json` if present, else a BPE trained on `texts()` and saved there (unless it has more tokens
  than `model_vocab_size`: then nothing is saved that would block a corrected relaunch). A cached one trained for
  another vocab_size is refused (a launch killed before its first checkpoint, relaunched with a larger vocabulary,
  would otherwise reuse it silently)."""
  path = os.path.join(os.fspath(run_dir), TOKENIZER_FILE)
  trained_for = os.path.join(os.fspath(run_dir), TRAINED_FOR_FILE)
  if os.path.isfile(path):
    tokenizer = load_tokenizer(path)
    asked = None
    if os.path.isfile(trained_for):  # absent in run directories from before this record
      with open(trained_for) as f:
        asked = json.load(f).get("vocab_size")
    if tokenizer.vocab_size > vocab_size or asked not in (None, vocab_size):
      was = f"was trained for vocab_size {asked}" if asked is not None else f"has {tokenizer.vocab_size} tokens"
      raise ValueError(f"cached {path} {was}, but this launch asks for vocab_size {vocab_size}; delete it (and the "
                       "token caches beside it) to retrain, or use another workdir")
    return tokenizer
  tokenizer = train_bpe(texts(), vocab_size, path, model_vocab_size)
  tmp = f"{trained_for}.{uuid.uuid4().hex}.tmp"  # as train_bpe writes: hosts sharing the run dir, no half file
  with open(tmp, "w") as f:
    json.dump({"vocab_size": vocab_size}, f)
  os.replace(tmp, trained_for)
  return tokenizer


# What a tokenizer folder holds besides tokenizer.json: eos/pad names and the chat template (transformers' layout).
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def transformers_config(tokenizer: Tokenizer) -> dict:
  """A tokenizer_config.json for a folder that has none (a BPE trained here), so that transformers' AutoTokenizer
  loads tokenizer.json as it is, with these special tokens, instead of guessing a class from the model type."""
  name = tokenizer.hf.id_to_token
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "eos_token": name(tokenizer.eos_id), "pad_token": name(tokenizer.pad_id)}
  if tokenizer.bos_id is not None:
    config["bos_token"] = name(tokenizer.bos_id)
  return config


def side_files(folder: str | os.PathLike) -> list[str]:
  """The TOKENIZER_SIDE_FILES that `folder` has."""
  return [p for p in (os.path.join(os.fspath(folder), name) for name in TOKENIZER_SIDE_FILES) if os.path.isfile(p)]


def copy_into(path: str | os.PathLike, run_dir: str | os.PathLike, model_vocab_size: int | None = None) -> Tokenizer:
  """Copies tokenizer.json (+ its TOKENIZER_SIDE_FILES: eos/pad names, chat template) into `run_dir` and loads it.

  The source is read (and checked against `model_vocab_size`) first: a file that fails is never copied, so it
  cannot block later launches in the run directory. A different tokenizer.json already in `run_dir` is an error:
  the run's checkpoints were trained on its ids.
  """
  src = _tokenizer_file(path)
  source = load_tokenizer(src)
  if model_vocab_size is not None:
    source.check_fits(model_vocab_size)
  dst = os.path.join(os.fspath(run_dir), TOKENIZER_FILE)
  if os.path.isfile(dst) and not os.path.samefile(src, dst):
    with open(src, "rb") as a, open(dst, "rb") as b:
      if a.read() != b.read():
        raise ValueError(f"{dst} differs from the requested tokenizer {src}: this run's data and checkpoints use the "
                         "ids of the one there; use a new run directory for the other")
  elif not os.path.isfile(dst):
    os.makedirs(os.fspath(run_dir), exist_ok=True)
    for side_file in side_files(os.path.dirname(src)):
      shutil.copyfile(side_file, os.path.join(os.fspath(run_dir), os.path.basename(side_file)))
    tmp = f"{dst}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
  return load_tokenizer(dst)
