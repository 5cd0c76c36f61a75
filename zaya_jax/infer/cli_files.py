"""Input and output files of the inference command lines: prompts, problems, and JSON-lines results written atomically.

    prompts = read_prompts("prompts.txt")          # one per line, or {"prompt": ...} per line of a .jsonl
    problems = read_problems("aime.jsonl")         # {"problem" | "question": ..., "answer": ...} per line
    with AtomicJsonl("out.jsonl", settings, overwrite=False) as out: out.write({...})

Bad input raises `CLIError` naming the flag, file and line at fault. `AtomicJsonl` writes --output to a temporary
sibling and renames it into place only on success, so a failed run never leaves a half-written file under the
requested name (a resumable one keeps its finished lines for --resume).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass


class CLIError(Exception):
  """Bad input to a command line: the message says what is wrong and where."""


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
