"""What every study script here shares: atomic JSON files, JSON-lines logs that survive a kill, the settings a
saved run differs in, and the commit a result came from."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import jax
import numpy as np
from absl import flags, logging


def median_seconds(fn, *args, reps: int) -> float:
  """Median wall time of `reps` calls of a jitted fn, after two untimed calls (compile, warm-up)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def rel_err(x, ref) -> float:
  """||x - ref|| / ||ref|| in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def status_mib(field: str) -> float:
  """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024  # kB
  raise KeyError(field)


def reset_peak_rss() -> bool:
  """Resets VmHWM (the peak RSS) to the current RSS; False where the kernel does not let us. `getrusage`'s
  ru_maxrss cannot be reset, and in a process started from a large parent it holds the parent's RSS at exec time."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def write_text(path: str, text: str) -> None:
  """Atomically (a temporary file, renamed): a results file is whole or absent. Creates the folder."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers of one path never share a temporary
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, obj) -> None:
  """`write_text` of obj as indented JSON with sorted keys."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut by a kill (append_jsonl removes it before writing again)
  return rows


def drop_cut_last_line(path: str) -> None:
  """Truncates a JSON-lines file after its last newline: a kill mid-write leaves a partial last line, and the next
  append would otherwise continue it into one unreadable line."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(path: str, row: dict) -> None:
  drop_cut_last_line(path)
  with open(path, "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")


def settings_key(obj) -> str:
  """A short stable hash of JSON-able settings."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    # Tracked files only: the studies write their results into the tree, and untracked files are not code that ran.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def apply_quick(quick_values: dict) -> None:
  """--quick: these flag values, except for the flags given explicitly on the command line."""
  if flags.FLAGS.quick:
    for name, value in quick_values.items():
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = value


def quiet_library_logging() -> None:
  """Orbax and grain log every save at INFO: a study shows only its progress lines unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
