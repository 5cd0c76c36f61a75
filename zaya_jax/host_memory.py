"""Host memory allocator settings for XLA:CPU runs: keep freed memory in the process.

XLA:CPU allocates each call's temporaries with malloc and frees them when the call ends. By default glibc gives
them back to the kernel (blocks above the mmap threshold, 128 KiB rising to at most 32 MiB, are unmapped on free;
free heap past the trim threshold is released), so the next call faults every page in again: the tiny training
step took ~9,300 minor page faults per step. Raising the thresholds and padding the heap keeps those pages mapped
(measured in WORKSPACE.md, "Host memory": 0.97-1.44x per workload and run on a noisy 2-core host).

The thresholds are not enough on their own. JAX dispatches XLA:CPU calls asynchronously to worker threads,
and a worker thread's arena holds at most 64 MiB, so larger temporaries (the small20m step's [2048, 8192] logits)
were still mmap'd and faulted in at every call: 149k faults per step. Running each call on the calling (main)
thread instead (`jax_cpu_enable_async_dispatch=False`) puts its temporaries in the main arena: 15-80 faults per step.
JAX applies it to computations on one device only: sharded CPU runs (a `--mesh` over forced CPU devices) still
dispatch to worker threads. The cost is that Python waits for each CPU call instead of queueing the next one, which
the training loop and the benchmarks do not rely on (they read each step's loss); but very small calls ran slower
that way (a tiny-model step of 8x32 tokens 10-35%; at 8x128 tokens the same within noise), so a program made of
such calls may pass `calls_on_caller_thread=False` (the test suite does).

`available_memory()` is what the process may still allocate before the kernel kills it: the system's MemAvailable,
or less under a cgroup memory limit (a container, a Slurm job). text_corpus refuses a document whose encoding would
not fit in it.

The cost of the thresholds is resident memory: up to `trim_threshold` of freed heap stays with the process instead
of going back to the system. Entry points (launch/, the benchmarks) call `retain_freed_memory()` once at start-up,
before JAX allocates; the library itself never changes process-wide allocator settings on import.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

import jax

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


def _backends_exist() -> bool:
  from jax._src import xla_bridge  # private: JAX has no public way to ask whether its clients exist yet

  check = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(check and check())


def retain_freed_memory(*, mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20, arena_max: int | None = None,
                        calls_on_caller_thread: bool = True) -> bool:
  """Sets glibc malloc to serve blocks below `mmap_threshold` bytes from its heap, keep up to `trim_threshold`
  bytes of free heap, grow the heap `top_pad` bytes at a time, and, if given, use at most `arena_max` arenas;
  with `calls_on_caller_thread`, JAX runs each CPU call on the thread that makes it (see the module docstring).

  Call it first thing in main, before the first JAX computation: the dispatch setting only takes effect before JAX
  creates its CPU client (a warning says so otherwise). Returns whether the allocator settings applied: False where
  the C library is not glibc (macOS, musl), where nothing changes.

  Arenas, measured on the 2-core host (WORKSPACE.md): limiting them (`arena_max=2`) was the other way to keep the
  worker threads' large temporaries mapped (the small20m step 1.14x faster) but slowed batched decoding 1.2x, and one
  arena serialised the tiny step's two compute threads (+20%). So the default leaves the arenas alone."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if calls_on_caller_thread:
    if _backends_exist():
      logging.warning("retain_freed_memory: JAX's CPU client already exists, so its calls stay on worker threads, "
                      "whose temporaries above 64 MiB are page-faulted in at every call; call it before the first "
                      "JAX computation.")
    else:
      jax.config.update("jax_cpu_enable_async_dispatch", False)
  mallopt = ctypes.CDLL(None).mallopt
  settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
  if arena_max is not None:
    settings += ((M_ARENA_MAX, arena_max),)
  return all(mallopt(param, value) == 1 for param, value in settings)


# cgroup v1 writes "no limit" as 2**63 - 1 rounded down to a page.
_NO_CGROUP_LIMIT = 2**60


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
  """The least (memory limit - usage) over this process's cgroup and its parents, for the v2 hierarchy and the v1
  memory controller; None where no limit is set or nothing can be read. A folder in /proc/self/cgroup that the mount
  does not hold (a container sees its own cgroup as the root) is skipped, its parents read."""
  headroom = []
  for entry in (_read(proc_cgroup) or "").splitlines():
    fields = entry.split(":", 2)  # hierarchy id : controllers : path
    if len(fields) != 3:
      continue
    _, controllers, path = fields
    if controllers == "":
      base, limit_name, usage_name = root, "memory.max", "memory.current"
    elif "memory" in controllers.split(","):
      base, limit_name, usage_name = os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
      continue
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
      folder = os.path.join(base, *parts[:depth])
      limit, usage = _read(os.path.join(folder, limit_name)), _read(os.path.join(folder, usage_name))
      if not (limit and usage and limit.isdigit() and usage.isdigit()):  # unreadable, or v2's "max": no limit
        continue
      if int(limit) < _NO_CGROUP_LIMIT:
        headroom.append(int(limit) - int(usage))
  return min(headroom) if headroom else None


def _mem_available() -> int | None:
  for line in (_read("/proc/meminfo") or "").splitlines():
    if line.startswith("MemAvailable:"):
      kib = line.split()[1]
      return int(kib) * 1024 if kib.isdigit() else None
  return None


def available_memory() -> int | None:
  """Bytes the process can still allocate (module doc); None where neither figure can be read."""
  figures = [f for f in (_mem_available(), cgroup_headroom()) if f is not None]
  return min(figures) if figures else None
