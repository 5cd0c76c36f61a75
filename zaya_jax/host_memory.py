"""Host memory allocator settings for XLA:CPU runs: keep freed memory in the process.

XLA:CPU allocates each call's temporaries with malloc and frees them when the call ends. By default glibc hands
blocks over 128 KiB-32 MiB back to the kernel (mmap'd blocks on free, the heap's top past the trim threshold), so the
next call faults every page in again: the tiny training step took ~9,250 minor page faults per step (36 MB of
first touches) and spent ~25% of its time in them. Raising the mmap and trim thresholds and padding the heap keeps
those pages mapped; the step then takes no page faults (measured in WORKSPACE.md, "Host memory").

The cost is resident memory: up to `trim_threshold` of freed heap stays with the process instead of going back to
the system. Entry points (launch/, the benchmarks) call `retain_freed_memory()` once at start-up, before JAX
allocates; the library itself never changes process-wide allocator settings on import.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def retain_freed_memory(*, mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20) -> bool:
  """Sets glibc malloc to serve blocks below `mmap_threshold` bytes from its heap, keep up to `trim_threshold`
  bytes of free heap, and grow the heap `top_pad` bytes at a time. Returns whether it applied: False where the C
  library is not glibc (macOS, musl), where nothing changes."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
  return all(mallopt(param, value) == 1 for param, value in settings)
