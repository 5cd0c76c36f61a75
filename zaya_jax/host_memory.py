"""Host memory allocator settings for XLA:CPU runs: keep freed memory in the process.

XLA:CPU allocates each call's temporaries with malloc and frees them when the call ends. By default glibc gives
them back to the kernel (blocks above the mmap threshold, 128 KiB rising to at most 32 MiB, are unmapped on free;
free heap past the trim threshold is released), so the next call faults every page in again: the tiny training
step took ~9,300 minor page faults per step. Raising the thresholds and padding the heap keeps those pages mapped
(measured in WORKSPACE.md, "Host memory": 0.97-1.44x per workload and run on a noisy 2-core host).

The cost is resident memory: up to `trim_threshold` of freed heap stays with the process instead of going back to
the system. Entry points (launch/, the benchmarks) call `retain_freed_memory()` once at start-up, before JAX
allocates; the library itself never changes process-wide allocator settings on import.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


def retain_freed_memory(*, mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20, arena_max: int | None = None) -> bool:
  """Sets glibc malloc to serve blocks below `mmap_threshold` bytes from its heap, keep up to `trim_threshold`
  bytes of free heap, grow the heap `top_pad` bytes at a time, and, if given, use at most `arena_max` arenas.

  Arenas, measured on the 2-core host (WORKSPACE.md): with glibc's default (8 per core) XLA:CPU's worker threads get
  arenas of their own, whose heaps hold at most 64 MiB, so larger temporaries (the small20m step's [2048, 8192]
  logits) are still mmap'd and page-faulted in at every call (149k faults per step). `arena_max=2` removed them
  (that step 1.14x faster) but slowed batched decoding 1.2x and the tiny step's gain shrank; one arena serialised
  the tiny step's two compute threads (+20%). So the default leaves the arenas alone. Call it before threads start
  allocating (first thing in main). Returns whether it applied: False where the C library is not
  glibc (macOS, musl), where nothing changes."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
  if arena_max is not None:
    settings += ((M_ARENA_MAX, arena_max),)
  return all(mallopt(param, value) == 1 for param, value in settings)
