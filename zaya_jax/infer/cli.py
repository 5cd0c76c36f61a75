"""Shared code of the inference command lines (launch/generate.py, launch/rsa.py): loading, prompts, problems, reports.

  from zaya_jax.infer import cli

  loaded = cli.load_model("runs/tiny")                      # an Orbax run directory (config.json + checkpoints/)
  loaded = cli.load_model("/models/ZAYA1-8B")               # or a Hugging Face folder (model_type zaya)
  chat = cli.chat_format(loaded, True)                      # the folder's chat template (None when False)
  outs = cli.generate_completions(loaded, ["2 + 2 ="], chat=chat, max_new_tokens=32,
                                  sampling=SamplingConfig(temperature=0.0), n=1, seed=0)
  problems = cli.read_problems("aime.jsonl")                # {"problem" | "question": ..., "answer": ...} per line
  report = cli.solve_problem(cfg, pieces, decode_fn, loaded.tokenizer, problems[0], key, loaded.stop_ids)
  summary = cli.summarize([report])                         # mean correct, majority@N, pass@N, tokens per problem

Bad input raises `CLIError` (or the ValueError of the library function that found it) with a message that names the
flag, file, line or path at fault; `main_wrapper` turns those into one `error: ...` line on stderr and exit code 1.
`AtomicJsonl` writes --output to a temporary sibling and renames it into place only on success, so a failed run never
leaves a half-written file under the requested name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from zaya_jax import host_memory
from zaya_jax.checkpoint.hf import CheckpointError, load_hf, read_hf_config
from zaya_jax.config import ZayaConfig
from zaya_jax.infer import answers as ans
from zaya_jax.infer import prompts as P
from zaya_jax.infer import rsa
from zaya_jax.infer.generate import generate
from zaya_jax.infer.sampling import SamplingConfig
from zaya_jax.model.decoder import ZayaForCausalLM
from zaya_jax.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

TEMPLATES: dict[str, P.AggregationTemplate] = {
  t.name: t for t in (P.RSA_REFERENCE, P.RSA_HARNESS, P.MARKOVIAN_ZAYA, P.PACORE_ZAYA, P.DELETHINK)
}


class CLIError(Exception):
  """Bad input to a command line: the message says what is wrong and where."""


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
# Input files.


def _lines(path: str, flag: str) -> list[tuple[int, str]]:
  """(1-based line number, text) of the non-blank lines; CLIError when unreadable or empty."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [(i, line.rstrip("\r\n")) for i, line in enumerate(f, 1)]
  except FileNotFoundError:
    raise CLIError(f"--{flag}={path} does not exist") from None
  except (OSError, UnicodeDecodeError) as e:
    raise CLIError(f"--{flag}={path} cannot be read: {e}") from None
  lines = [(i, line) for i, line in lines if line.strip()]
  if not lines:
    raise CLIError(f"--{flag}={path} is empty (no non-blank lines)")
  return lines


def _json_line(path: str, number: int, line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise CLIError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_prompts(path: str) -> list[str]:
  """Prompts of a .txt file (one per non-blank line) or a .jsonl file ({"prompt": ...} or a JSON string per line)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".txt", ".jsonl"):
    raise CLIError(f"--prompts_file={path}: expected a .txt (one prompt per line) or .jsonl file, got {ext or 'no'} "
                   "extension")
  lines = _lines(path, "prompts_file")
  if ext == ".txt":
    return [line for _, line in lines]
  out = []
  for number, line in lines:
    row = _json_line(path, number, line)
    text = row.get("prompt") if isinstance(row, dict) else row
    if not isinstance(text, str) or not text.strip():
      raise CLIError(f"{path}:{number}: expected {{\"prompt\": \"<non-empty text>\"}} or a JSON string, got "
                     f"{line[:80]!r}")
    out.append(text)
  return out


@dataclass(frozen=True)
class Problem:
  index: int  # 0-based position in the file
  line: int  # 1-based line number (0 for --problem)
  problem: str
  answer: str | None  # the reference answer; None: not scored


def read_problems(path: str) -> list[Problem]:
  """A JSON-lines problem file: one object per line with "problem" (or "question") and optionally "answer"."""
  out = []
  for number, line in _lines(path, "problems"):
    row = _json_line(path, number, line)
    if not isinstance(row, dict):
      raise CLIError(f"{path}:{number}: expected a JSON object with \"problem\" (or \"question\") and \"answer\", "
                     f"got {type(row).__name__}")
    text = row.get("problem", row.get("question"))
    if not isinstance(text, str) or not text.strip():
      raise CLIError(f"{path}:{number}: needs a non-empty string field \"problem\" (or \"question\"); has fields "
                     f"{sorted(row)}")
    answer = row.get("answer")
    if isinstance(answer, bool) or (answer is not None and not isinstance(answer, str | int | float)):
      raise CLIError(f"{path}:{number}: \"answer\" must be a string or a number, got {answer!r}")
    if isinstance(answer, str) and not answer.strip():
      raise CLIError(f"{path}:{number}: \"answer\" is empty (no answer could match it); leave the field out for "
                     "an unscored problem")
    out.append(Problem(len(out), number, text, None if answer is None else str(answer)))
  return out


def check_output_is_not_input(output: str | None, **inputs: str | None) -> None:
  """--output must not name an input file (with --overwrite it would replace the problems it reads)."""
  for flag, path in inputs.items():
    if output and path and os.path.exists(path) and os.path.exists(output) and os.path.samefile(output, path):
      raise CLIError(f"--output={output} is the --{flag} file; write the results elsewhere")


class AtomicJsonl:
  """JSON lines for --output, never half-written under its name: they go to a temporary sibling, flushed line by line,
  renamed into place on a clean exit. Opened first thing, so that an unwritable --output fails before any model work.

  An existing --output is refused unless `overwrite`. A failure removes the temporary file, unless `resumable`: then
  it is `<output>.partial`, and after a failure (an error, Ctrl-C, SIGTERM, a kill) it keeps every finished line, next
  to `<output>.partial.settings` (`settings`, the flags that shape the results). A rerun with `resume` and the same
  settings reads the lines back (`done`) and appends after them; without `resume` an existing partial file is refused,
  so that two runs never mix.
  """

  def __init__(self, path: str | None, *, overwrite: bool = False, resumable: bool = False, resume: bool = False,
               settings: dict | None = None):
    self.path, self.overwrite, self.resumable, self.resume = path, overwrite, resumable, resume
    self.settings = settings or {}
    self.done: list[dict] = []  # lines read back from a partial file (resume)
    self._file, self._written = None, 0

  @property
  def _settings_file(self) -> str:
    return self._file.name + ".settings"

  def __enter__(self):
    if not self.path:
      return self
    if os.path.isdir(self.path):
      raise CLIError(f"--output={self.path} is a folder; give the path of the JSON-lines file to write")
    folder = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(folder):
      raise CLIError(f"--output={self.path}: folder {folder} does not exist")
    if os.path.exists(self.path) and not self.overwrite:
      finished = " (the run that wrote it finished: nothing to resume)" if self.resume else ""
      raise CLIError(f"--output={self.path} exists{finished}; pass --overwrite to replace it (or another --output)")
    try:
      if self.resumable:
        self._open_partial(self.path + ".partial")
      else:
        # open(..., "x") creates it with the umask's permissions (a NamedTemporaryFile would be 0600, and stay so)
        self._file = open(os.path.join(folder, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp"), "x",
                          encoding="utf-8")
    except OSError as e:
      raise CLIError(f"--output={self.path} cannot be written: {e}") from None
    return self

  def _open_partial(self, partial: str) -> None:
    settings_file = partial + ".settings"
    if not os.path.exists(partial):
      with open(settings_file, "w", encoding="utf-8") as f:
        json.dump(self.settings, f, sort_keys=True)
      self._file = open(partial, "x", encoding="utf-8")  # closed in __exit__
      return
    if not self.resume:
      raise CLIError(f"{partial} holds the finished lines of an interrupted run: pass --resume to go on from them "
                     "(same flags), or delete it")
    try:
      with open(settings_file, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise CLIError(f"--resume: {settings_file} is unreadable ({e}); delete {partial} to start over") from None
    changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
    if changed:
      was = ", ".join(f"{k}={saved.get(k)!r} (now {self.settings.get(k)!r})" for k in changed)
      raise CLIError(f"--resume: {partial} was written with other settings: {was}; rerun with those, or delete it")
    with open(partial, "rb") as f:
      data = f.read()
    complete = data[:data.rfind(b"\n") + 1]  # a line cut by a kill is dropped and decoded again
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
      self.done.append(_json_line(partial, number, line))
    self._file = open(partial, "r+", encoding="utf-8")
    self._file.truncate(len(complete))
    self._file.seek(len(complete))

  def write(self, row: dict) -> None:
    if self._file is not None:
      self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
      self._file.flush()
      if self.resumable:
        os.fsync(self._file.fileno())
      self._written += 1

  def __exit__(self, exc_type, *_):
    if self._file is None:
      return
    self._file.close()
    if exc_type is not None:
      kept = len(self.done) + self._written
      if self.resumable and kept:
        print(f"kept {kept} finished line(s) in {self._file.name}: run again with --resume to go on from them",
              file=sys.stderr)
        return
      os.unlink(self._file.name)
      if self.resumable:
        os.unlink(self._settings_file)
      return
    try:
      os.replace(self._file.name, self.path)
    except OSError as e:  # e.g. a folder created at the path meanwhile: nothing half-written is left behind
      if not self.resumable:
        os.unlink(self._file.name)
      raise CLIError(f"--output={self.path} cannot be written: {e}") from None
    if self.resumable:
      os.unlink(self._settings_file)


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


def _text(tokenizer: Tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[str, bool]:
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
      text, stopped = _text(loaded.tokenizer, tokens_BN[r, :lengths_B[r]].tolist(), loaded.stop_ids)
      out.append(Completion(p, s, prompts[p], len(ids[p]), text, int(lengths_B[r]), stopped))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Markovian RSA: one problem, its report, the summary.


def rsa_config(*, n: int, c: int, t: int, tau: int, beta: int, beta_final: int | None, tail_source: str,
               end_think: Sequence[int], q_max: int, max_context: int, pad_id: int, seed: int,
               stop_ids: Sequence[int] = (), beta_first: int | None = None, keep_finished: bool = False
               ) -> rsa.RSAConfig:
  """RSAConfig from the flags; its validation message (C > N, τ > β, ...) with the flag names."""
  try:
    return rsa.RSAConfig(n=n, c=c, t=t, tau=tau, beta=beta, beta_final=beta_final, beta_first=beta_first,
                         tail_source=tail_source, keep_finished=keep_finished,
                         end_think=tuple(end_think), stop_ids=tuple(stop_ids), q_max=q_max, max_context=max_context,
                         pad_id=pad_id, seed=seed)
  except ValueError as e:
    raise CLIError(str(e).replace("RSAConfig.", "--")) from None


def check_rsa_context(cfg: rsa.RSAConfig, pieces: rsa.PromptPieces, context: int, longest_question: int) -> None:
  """Every decode call's prompt capacity + budget must fit the model's context: named in flags, not in fields."""
  bound = rsa.context_bound(cfg, pieces)
  if bound > context:
    prompt = (f"template {pieces.template_len} + question {cfg.q_max} (longest {longest_question} tokens) + --c × "
              f"--tau = {cfg.c} × {cfg.tau}" if cfg.t else
              f"round-0 template {pieces.initial_len} + question {cfg.q_max} (longest {longest_question} tokens)")
    raise CLIError(
      f"the RSA prompts do not fit the model's context of {context} (max_position_embeddings): {prompt} + "
      f"the largest budget (of --beta_first, --beta, --beta_final) {cfg.pool_width} makes {bound}; lower "
      + ("--tau, --c or the budgets" if cfg.t else "--beta or --beta_final"))


def _scores(answers: Sequence[str | None], majority: str | None, reference: str | None) -> dict:
  """correct (per candidate), mean_correct, majority_correct and pass against `reference`; all None without one."""
  if reference is None:
    return dict.fromkeys(("correct", "mean_correct", "majority_correct", "pass"))
  correct = tuple(bool(ans.is_equiv(a, reference)) for a in answers)
  return {"correct": correct, "mean_correct": sum(correct) / len(correct),
          "majority_correct": bool(ans.is_equiv(majority, reference)), "pass": any(correct)}


@dataclass(frozen=True)
class RoundReport:
  """One round's population, scored as the final one is (the RSA authors log these per loop): whether aggregation
  helps, and how fast the population agrees, show round by round."""

  answers: tuple[str | None, ...]  # in candidate order
  majority: str | None
  votes: int
  entropy: float  # of the normalised answers, missing ones as one class (answers.answer_entropy), nats
  generated: int  # new tokens this round
  prefilled: int  # prompt tokens this round
  max_context: int  # largest prompt + output of this round's calls

  def scores(self, reference: str | None) -> dict:
    """mean_correct, majority_correct and pass of this round against `reference` (None without one)."""
    scores = _scores(self.answers, self.majority, reference)
    del scores["correct"]  # a round's line stays short: its answers are there
    return scores

  def to_json(self, reference: str | None) -> dict:
    return {**dataclasses.asdict(self), **self.scores(reference)}

  @classmethod
  def from_json(cls, row: dict) -> RoundReport:
    fields = {f.name: row[f.name] for f in dataclasses.fields(cls)}
    return cls(**{**fields, "answers": tuple(fields["answers"])})


def score_round(texts: Sequence[str], finished: Sequence[bool], generated: int, prefilled: int, max_context: int,
                answer_after: str | None = None) -> RoundReport:
  """Answers (last \\boxed{} of each candidate's `answer_section`), their vote and entropy, and the round's tokens."""
  answers = tuple(ans.extract_boxed(answer_section(t, answer_after)) for t in texts)
  vote = ans.majority_vote(answers, finished)
  return RoundReport(answers, None if vote is None else vote.answer, 0 if vote is None else vote.count,
                     float(ans.answer_entropy(answers)), int(generated), int(prefilled), int(max_context))


@dataclass(frozen=True)
class ProblemReport:
  index: int
  problem: str
  reference: str | None
  answers: tuple[str | None, ...]  # extracted from the final population, in candidate order
  finished: tuple[bool, ...]  # the candidate stopped before its budget
  majority: str | None  # the normalised plurality answer (None: no candidate answered)
  votes: int
  generated: int  # newly decoded tokens over all rounds: D(q)
  prefilled: int  # prompt tokens sent over all rounds
  max_context: int  # largest prompt + output of any decode call
  rounds: tuple[RoundReport, ...] = ()  # every round's population, round 0 first (the last one is the final)

  @functools.cached_property
  def _scored(self) -> dict:  # once per report: each property below read it again (every answer's is_equiv)
    return _scores(self.answers, self.majority, self.reference)

  @property
  def correct(self) -> tuple[bool, ...] | None:
    return self._scored["correct"]

  @property
  def mean_correct(self) -> float | None:
    return self._scored["mean_correct"]

  @property
  def majority_correct(self) -> bool | None:
    return self._scored["majority_correct"]

  @property
  def passed(self) -> bool | None:
    return self._scored["pass"]

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "correct": self.correct, "mean_correct": self.mean_correct,
            "majority_correct": self.majority_correct, "pass": self.passed,
            "rounds": [r.to_json(self.reference) for r in self.rounds]}

  @classmethod
  def from_json(cls, row: dict) -> ProblemReport:
    """Inverse of to_json (its derived fields are recomputed): a report read back from a partial --output."""
    fields = {f.name: row[f.name] for f in dataclasses.fields(cls)}
    return cls(**{**fields, "answers": tuple(fields["answers"]), "finished": tuple(fields["finished"]),
                  "rounds": tuple(RoundReport.from_json(r) for r in fields["rounds"])})


def answer_section(text: str, after: str | None) -> str:
  """The part of a candidate scored for its answer: the whole text, or with `after` (the end-of-thinking marker) only
  what follows its last occurrence, empty without one (Delethink's rule: a trace cut inside its reasoning has no
  answer, however many tentative boxes it wrote)."""
  if after is None:
    return text
  _, marker, tail = text.rpartition(after)
  return tail if marker else ""


def report_problem(problem: Problem, texts: Sequence[str], finished: Sequence[bool], generated: int, prefilled: int,
                   max_context: int, answer_after: str | None = None, rounds: Sequence[RoundReport] = ()
                   ) -> ProblemReport:
  """Answers (last \\boxed{} of each candidate's `answer_section`), the vote and the accounting of one problem's final
  population; `rounds` the per-round reports."""
  final = score_round(texts, finished, generated, prefilled, max_context, answer_after)
  return ProblemReport(problem.index, problem.problem, problem.answer, final.answers, tuple(bool(f) for f in finished),
                       final.majority, final.votes, int(generated), int(prefilled), int(max_context), tuple(rounds))


def solve_problem(cfg: rsa.RSAConfig, pieces: rsa.PromptPieces, decode_fn: rsa.DecodeFn, tokenizer: Tokenizer,
                  problem: Problem, key: jax.Array, stop_ids: Sequence[int],
                  on_round: Callable[[int, RoundReport], None] | None = None, answer_after: str | None = None,
                  final_decode_fn: rsa.DecodeFn | None = None) -> tuple[ProblemReport, list[str]]:
  """Markovian RSA on one problem (host loop over rounds); (report, final texts). Every round's population is
  scored (`RoundReport`, passed to on_round as it finishes). `answer_after`: score only the text after this marker
  (see `answer_section`). `final_decode_fn`: the last round's decoder (its own sampling), default decode_fn."""
  question = P.encode_question(tokenizer.hf, problem.problem)
  rounds, texts = [], []

  def record(r: int, state: rsa.RSAState) -> None:
    texts[:] = [_text(tokenizer, seq, stop_ids)[0] for seq in rsa.pool_sequences(state)]
    rounds.append(score_round(texts, np.asarray(state.finished_N).tolist(), int(state.generated_R[r]),
                              int(state.prefilled_R[r]), int(state.max_context_R[r]), answer_after))
    if on_round is not None:
      on_round(r, rounds[-1])
    stop_if_terminated()

  state = rsa.run_loop(cfg, pieces, decode_fn, question, key=key, on_round=record, final_decode_fn=final_decode_fn)
  report = report_problem(problem, texts, np.asarray(state.finished_N).tolist(), int(state.generated),
                          int(state.prefilled), int(state.max_context), answer_after, rounds)
  return report, texts


def summarize(reports: Sequence[ProblemReport]) -> dict:
  """Means over problems: correctness over final candidates (the report's metric), majority@N and pass@N over the
  problems with a reference; tokens over all problems. `by_round`: the same per round (round 0 first), when every
  report has the same number of rounds."""
  scored = [r for r in reports if r.reference is not None]
  k = len(scored)

  def mean(values):
    return sum(values) / k if k else None

  count = max(len(reports), 1)
  summary = {
    "summary": True,
    "problems": len(reports),
    "scored": k,
    "n": len(reports[0].answers) if reports else 0,
    "mean_correct": mean([r.mean_correct for r in scored]),
    "majority_at_n": mean([float(r.majority_correct) for r in scored]),
    "pass_at_n": mean([float(r.passed) for r in scored]),
    "generated_per_problem": sum(r.generated for r in reports) / count,
    "prefilled_per_problem": sum(r.prefilled for r in reports) / count,
    "max_context": max((r.max_context for r in reports), default=0),
  }
  if reports and reports[0].rounds and len({len(r.rounds) for r in reports}) == 1:
    by_round = []
    for i in range(len(reports[0].rounds)):
      scores = [r.rounds[i].scores(r.reference) for r in scored]
      by_round.append({
        "mean_correct": mean([s["mean_correct"] for s in scores]),
        "majority_at_n": mean([float(s["majority_correct"]) for s in scores]),
        "pass_at_n": mean([float(s["pass"]) for s in scores]),
        "entropy": sum(r.rounds[i].entropy for r in reports) / count,
        "generated_per_problem": sum(r.rounds[i].generated for r in reports) / count,
      })
    summary["by_round"] = by_round
  return summary


def format_summary(s: dict) -> str:
  def num(x):
    return "n/a" if x is None else f"{x:.3f}"

  text = (f"summary over {s['problems']} problem(s), {s['scored']} with a reference: "
          f"mean correct {num(s['mean_correct'])}, "
          f"majority@{s['n']} {num(s['majority_at_n'])}, pass@{s['n']} {num(s['pass_at_n'])}, "
          f"{s['generated_per_problem']:.1f} generated and {s['prefilled_per_problem']:.1f} prefilled tokens per "
          f"problem, largest context {s['max_context']}")
  for r, row in enumerate(s.get("by_round", ())):
    text += (f"\n  round {r}: mean correct {num(row['mean_correct'])}, majority@{s['n']} {num(row['majority_at_n'])}, "
             f"pass@{s['n']} {num(row['pass_at_n'])}, answer entropy {row['entropy']:.3f} nats, "
             f"{row['generated_per_problem']:.1f} generated tokens per problem")
  return text


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


__all__ = ["TEMPLATES", "AtomicJsonl", "CLIError", "Completion", "LoadedModel", "Problem", "ProblemReport",
           "RoundReport", "Terminated", "chat_format", "check_output_is_not_input", "check_rsa_context",
           "encode_prompt", "format_summary", "generate_completions", "load_model", "main_wrapper", "model_kind",
           "read_problems", "read_prompts", "report_problem", "rsa_config", "sampling_config", "score_round",
           "solve_problem", "stop_if_terminated", "summarize"]
