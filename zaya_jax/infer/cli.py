"""Shared code of the inference command lines (launch/generate.py, launch/rsa.py): loading models and tokenizers,
prompts, generation, and the entry-point wrapper. Their files are cli_files.py's; RSA over problems is rsa_eval.py's.

  from zaya_jax.infer import cli

  loaded = cli.load_model("runs/tiny")                      # an Orbax run directory (config.json + checkpoints/)
  loaded = cli.load_model("/models/ZAYA1-8B")               # or a Hugging Face folder (model_type zaya)
  chat = cli.chat_format(loaded, True)                      # the folder's chat template (None when False)
  outs = cli.generate_completions(loaded, ["2 + 2 ="], chat=chat, max_new_tokens=32,
                                  sampling=SamplingConfig(temperature=0.0), n=1, seed=0)

Bad input raises `CLIError` (cli_files.py; or the ValueError of the library function that found it) with a message
that names the flag, file, line or path at fault; `main_wrapper` turns those into one `error: ...` line on stderr and
exit code 1.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from zaya_jax import host_memory
from zaya_jax.checkpoint.hf import CheckpointError, load_hf, read_hf_config
from zaya_jax.config import ZayaConfig
from zaya_jax.infer import prompts as P
from zaya_jax.infer.cli_files import CLIError
from zaya_jax.infer.generate import generate
from zaya_jax.infer.sampling import SamplingConfig
from zaya_jax.model.decoder import ZayaForCausalLM
from zaya_jax.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Models and tokenizers.


class LoadedModel:
  """A model folder's tokenizer and config, read at once, and its weights, loaded on first use of `.model`: flag
  errors that need only the tokenizer or the context (a prompt too long, a budget past the context, a missing chat
  template) are found before gigabytes load."""

  def __init__(self, *, path: str, kind: str, tokenizer: Tokenizer, config: ZayaConfig,
               load_weights: Callable[[], ZayaForCausalLM], step: int | None = None):
    self.path = path  # the model folder
    self.kind = kind  # "run" (Orbax run directory) or "hf" (Hugging Face folder)
    self.step = step  # a run directory's checkpoint step (the latest when none was asked for); None for "hf"
    self.tokenizer = tokenizer
    self.config = config
    self._load_weights = load_weights

  def describe(self) -> str:
    return (f"{self.path} (run directory, checkpoint step {self.step})" if self.kind == "run" else
            f"{self.path} (Hugging Face folder)")

  @functools.cached_property
  def fingerprint(self) -> str:
    """Identifies the weights without reading them all: a hash of the config and of each weight file's name, size,
    first and last 64 KiB and 16 blocks spread over it. A retrained checkpoint written over the same folder (or a
    run directory's later step) differs; a copy of the folder elsewhere does not."""
    if self.kind == "run":
      root = os.path.join(self.path, "checkpoints", str(self.step))
      files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    else:
      root = self.path
      files = sorted(os.path.join(root, f) for f in os.listdir(root)
                     if f.endswith(".safetensors") or f == "model.safetensors.index.json")
    digest = hashlib.sha256()
    for file in [os.path.join(self.path, "config.json"), *files]:
      size = os.path.getsize(file)
      digest.update(f"{os.path.relpath(file, self.path)}\0{size}\0".encode())
      ends, inside = {0: 65536, max(size - 65536, 0): 65536}, {o: 4096 for o in range(0, size, max(size // 16, 1))}
      with open(file, "rb") as f:
        for offset, length in sorted({**inside, **ends}.items()):  # the ends (safetensors' header) read in full
          f.seek(offset)
          digest.update(f.read(length))
    return digest.hexdigest()[:16]

  @functools.cached_property
  def model(self) -> ZayaForCausalLM:
    try:
      return self._load_weights()
    except (CheckpointError, FileNotFoundError) as e:
      raise CLIError(f"cannot load --model={self.path}: {e}") from None

  @property
  def context(self) -> int:
    """Positions the model supports: a prompt plus its generated tokens must fit."""
    return int(self.config.max_position_embeddings)

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    """Generation stops at any of: the config's eos ids, the tokenizer's eos, and the eos ids of the folder's
    generation_config.json, which is where Hugging Face chat models list their end-of-turn token (Gemma 3's, ZAYA1's
    tokenizer, ends a turn with <end_of_turn>, not <eos>): without it a chat reply runs on to the budget."""
    ids = _ids(self.config.eos_token_id) | {int(self.tokenizer.eos_id)}
    ids |= _ids(_generation_config(self.path).get("eos_token_id"), "generation_config.json eos_token_id",
                self.config.vocab_size)
    return tuple(sorted(ids))

  @property
  def tokenizer_dir(self) -> str:
    return os.path.dirname(self.tokenizer.path)


def _ids(value, what: str = "eos_token_id", vocab: int | None = None) -> set[int]:
  """Token ids from a config field: None, one id or a list of ids; CLIError naming the field when malformed."""
  values = [] if value is None else list(value) if isinstance(value, tuple | list) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (vocab is None or v < vocab)
             for v in values):
    raise CLIError(f"{what} must be token ids in the vocabulary, got {value!r}")
  return {int(v) for v in values}


def _generation_config(path: str) -> dict:
  """The model folder's generation_config.json ({} when absent)."""
  file = os.path.join(path, "generation_config.json")
  if not os.path.isfile(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CLIError(f"{file} is not readable JSON: {e}") from None
  if not isinstance(raw, dict):
    raise CLIError(f"{file} must hold a JSON object, got {type(raw).__name__}")
  return raw


_NEITHER = ("is neither an Orbax run directory (config.json + checkpoints/, written by launch/train.py) nor a Hugging "
            "Face folder (config.json with model_type 'zaya' + model.safetensors)")


def model_kind(path: str) -> str:
  """'run' or 'hf' from the folder's contents (nothing loaded); CLIError naming what is missing otherwise."""
  if not os.path.exists(path):
    raise CLIError(f"--model={path} does not exist")
  if not os.path.isdir(path):
    raise CLIError(f"--model={path} is a file; it {_NEITHER}")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise CLIError(f"--model={path} {_NEITHER}: it has no config.json")
  try:
    with open(config_file, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CLIError(f"{config_file} is not readable JSON: {e}") from None
  if isinstance(raw, dict) and raw.get("model_type") == "zaya":
    return "hf"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "run"
  model_type = raw.get("model_type") if isinstance(raw, dict) else None
  why = f"its config.json has model_type {model_type!r}" if model_type else "its config.json has no model_type 'zaya'"
  raise CLIError(f"--model={path} {_NEITHER}: {why} and it has no checkpoints/ folder")


def _tokenizer_source(path: str, tokenizer_path: str | None) -> str:
  """The tokenizer.json to use; CLIError naming the path when it is missing (checked before any weights load)."""
  if tokenizer_path:
    file = os.path.join(tokenizer_path, TOKENIZER_FILE) if os.path.isdir(tokenizer_path) else tokenizer_path
    if not os.path.isfile(file):
      raise CLIError(f"--tokenizer={tokenizer_path}: {file} does not exist")
    return file
  file = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(file):
    raise CLIError(f"--model={path} has no tokenizer: {file} is missing (prompts must be encoded with the model's "
                   "tokenizer); copy tokenizer.json (and tokenizer_config.json) into the folder or pass --tokenizer")
  return file


def load_model(path: str, *, tokenizer_path: str | None = None, step: int | None = None) -> LoadedModel:
  """A run directory (latest or given step) or a Hugging Face folder: its tokenizer and config now, checked against
  each other; its weights when `.model` is first used."""
  path = os.path.abspath(os.fspath(path))
  kind = model_kind(path)
  token_file = _tokenizer_source(path, tokenizer_path)
  try:
    tokenizer = load_tokenizer(token_file)
    if kind == "run":
      from zaya_jax.train.checkpointing import load_run, resolve_step  # Orbax, grain: only for run directories
      from zaya_jax.train.experiment import load_json

      try:
        config = load_json(os.path.join(path, "config.json")).model
      except (TypeError, ValueError) as e:  # a config.json without the ExperimentConfig fields
        raise CLIError(f"--model={path}: config.json is not a launch/train.py run config ({e})") from None
      step = resolve_step(path, step)  # now: the weights load later, and a run may go on saving meanwhile

      def load_weights():
        return load_run(path, step=step)[0]
    else:
      if step is not None:
        raise CLIError(f"--step={step} applies to run directories; --model={path} is a Hugging Face folder")
      try:  # as load_hf reads it (the weights' names decide a stray legacy key; their dtype a missing one)
        config = read_hf_config(path)
      except CheckpointError:  # weight files that do not open: their error comes when they load, after flag checks
        config = ZayaConfig.from_hf(path)

      def load_weights():
        return load_hf(path)
    tokenizer.check_fits(config.vocab_size)
  except (CheckpointError, FileNotFoundError) as e:
    raise CLIError(f"cannot load --model={path}: {e}") from None
  loaded = LoadedModel(path=path, kind=kind, tokenizer=tokenizer, config=config, load_weights=load_weights, step=step)
  _ = loaded.stop_ids  # a malformed generation_config.json is named now, not after the weights load
  return loaded


def chat_format(loaded: LoadedModel, chat: bool) -> P.ChatFormat | None:
  """The tokenizer folder's chat template when `chat`, else None; CLIError when asked for and absent."""
  if not chat:
    return None
  try:
    return P.load_chat_template(loaded.tokenizer_dir)
  except (ValueError, OSError) as e:
    raise CLIError(f"--chat: {e}") from None


def encode_prompt(tokenizer: Tokenizer, text: str, chat: P.ChatFormat | None) -> list[int]:
  """Ids of one prompt. A rendered chat template already holds its special tokens (bos included), so it is encoded
  without the tokenizer's post-processor, as transformers' apply_chat_template does; plain text gets it."""
  if chat is None:
    return tokenizer.encode(text)
  return tokenizer.hf.encode(chat.user(text), add_special_tokens=False).ids


def sampling_config(temperature: float, top_k: int | None, top_p: float, flag_prefix: str = "") -> SamplingConfig:
  """From the flags (named `--{flag_prefix}temperature` etc. in errors); top_k 0 or None means no limit."""
  if top_k is not None and top_k < 0:
    raise CLIError(f"--{flag_prefix}top_k must be >= 1, or 0 for no limit; got {top_k}")
  try:
    return SamplingConfig(temperature=float(temperature), top_k=top_k or None, top_p=float(top_p))
  except ValueError as e:
    raise CLIError(str(e).replace("SamplingConfig.", f"--{flag_prefix}")) from None


# ---------------------------------------------------------------------------------------------------------------
# Generation.


@dataclass(frozen=True)
class Completion:
  prompt_index: int
  sample: int
  prompt: str
  prompt_tokens: int
  completion: str
  tokens: int  # generated, a stop token included
  stopped: bool  # ended with a stop token (else cut at max_new_tokens)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def decoded_text(tokenizer: Tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[str, bool]:
  """Decoded text without a final stop token (special tokens such as </think> are kept); whether it stopped."""
  ids = list(ids)
  stopped = bool(ids) and ids[-1] in stop_ids
  return tokenizer.decode(ids[:-1] if stopped else ids), stopped


def check_fits_context(lengths: Sequence[int], max_new: int, context: int, what: Callable[[int], str]) -> None:
  """Every prompt plus max_new - 1 fed-back tokens must fit the model's positions (the decode cache)."""
  for i, n in enumerate(lengths):
    if n == 0:
      raise CLIError(f"{what(i)} encodes to no tokens")
    if n + max_new - 1 > context:
      raise CLIError(f"{what(i)} has {n} tokens; with --max_new_tokens={max_new} it needs {n + max_new - 1} "
                     f"positions, more than the model's context of {context} (max_position_embeddings); shorten it "
                     "or lower --max_new_tokens")


def generate_completions(loaded: LoadedModel, prompts: Sequence[str], *, chat: P.ChatFormat | None,
                         max_new_tokens: int, sampling: SamplingConfig, n: int = 1, seed: int = 0,
                         batch_size: int = 8, describe: Callable[[int], str] | None = None) -> list[Completion]:
  """n samples of every prompt, batch_size rows per generate call. Every call has the same shape (rows padded to the
  longest prompt, the last batch filled with inactive rows) so the program compiles once; call b uses fold_in(key(seed),
  b), so samples depend on the seed and on batch_size. describe(i) names prompt i in errors."""
  if n < 1 or batch_size < 1 or max_new_tokens < 1:
    raise CLIError(f"--n, --batch_size and --max_new_tokens must be >= 1, got {n}, {batch_size}, {max_new_tokens}")
  describe = describe or (lambda i: f"prompt {i + 1}")
  ids = [encode_prompt(loaded.tokenizer, p, chat) for p in prompts]
  check_fits_context([len(x) for x in ids], max_new_tokens, loaded.context, describe)
  rows = [(p, s) for p in range(len(prompts)) for s in range(n)]
  width, batch = max(len(x) for x in ids), min(batch_size, len(rows))
  key, out = jax.random.key(seed), []
  for b, start in enumerate(range(0, len(rows), batch)):
    stop_if_terminated()
    chunk = rows[start:start + batch]
    # Static shape: the last batch is filled with inactive rows (length 0), which generate nothing and never keep
    # the decode loop going.
    prompts_BL = np.full((batch, width), loaded.tokenizer.pad_id, np.int32)
    lens_B = np.zeros((batch,), np.int32)
    for r, (p, _) in enumerate(chunk):
      prompts_BL[r, :len(ids[p])] = ids[p]
      lens_B[r] = len(ids[p])
    res = generate(loaded.model, prompts_BL, lens_B, key=jax.random.fold_in(key, b), max_new_tokens=max_new_tokens,
                   sampling=sampling, stop_token_ids=loaded.stop_ids)
    tokens_BN, lengths_B = np.asarray(res.tokens_BN), np.asarray(res.lengths_B)
    for r, (p, s) in enumerate(chunk):
      text, stopped = decoded_text(loaded.tokenizer, tokens_BN[r, :lengths_B[r]].tolist(), loaded.stop_ids)
      out.append(Completion(p, s, prompts[p], len(ids[p]), text, int(lengths_B[r]), stopped))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Entry points.


class Terminated(Exception):
  """A SIGTERM (preemption), acted on between units of work: the entry point exits 128 + signum."""

  def __init__(self, signum: int):
    super().__init__(f"signal {signum}")
    self.signum = signum


_terminations: list[int] = []  # signals received by main_wrapper's handler, not yet acted on


def stop_if_terminated() -> None:
  """Raises Terminated when a SIGTERM came: called between units of work (a problem's round, a batch of prompts), so
  that --output keeps what is finished. Raising from the signal handler itself could land inside JAX's C++ callbacks
  (a garbage-collection hook swallowed it; other places crashed the interpreter)."""
  if _terminations:
    raise Terminated(_terminations[0])


def main_wrapper(main: Callable[[list[str]], int]) -> Callable[[list[str]], None]:
  """For absl's app.run: bad input -> `error: <message>` on stderr and exit 1, without a traceback."""

  def wrapped(argv):
    import signal

    from absl import flags, logging
    from jinja2.exceptions import TemplateError

    def terminated(signum, frame):  # preemption: noted here, acted on at the next stop_if_terminated()
      _terminations.append(signum)
      signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
      # os.write, not print: the signal may land while sys.stderr is mid-write (print would raise "reentrant call").
      os.write(2, b"SIGTERM: stopping after the work in flight (a round, a batch); send it again to stop now\n")

    _terminations.clear()  # a run's own signals only (an entry point called twice in one process)
    signal.signal(signal.SIGTERM, terminated)

    host_memory.retain_freed_memory()  # decode temporaries stay mapped between calls (zaya_jax/host_memory.py)
    # Generated text may hold any character (a random model's bytes): never fail printing it on a narrow terminal.
    sys.stdout.reconfigure(errors="backslashreplace")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs INFO/WARNING lines on every restore: keep stdout readable
      logging.set_verbosity(logging.ERROR)
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]} (all options are --flags)", file=sys.stderr)
      sys.exit(1)
    try:
      code = main(argv)
    except (CLIError, CheckpointError, ValueError, OSError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    except TemplateError as e:  # a chat template that raises (e.g. "only user/assistant roles")
      print(f"error: --chat: the chat template failed: {e}", file=sys.stderr)
      sys.exit(1)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)
    except Terminated as e:
      sys.exit(128 + e.signum)
    sys.exit(code or 0)

  return wrapped


__all__ = ["CLIError", "Completion", "LoadedModel", "Terminated", "chat_format", "check_fits_context",
           "decoded_text", "encode_prompt", "generate_completions", "load_model", "main_wrapper", "model_kind",
           "sampling_config", "stop_if_terminated"]
