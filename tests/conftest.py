import os
import socket
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

from zaya_jax import host_memory

# Compiling is a large part of this suite on a 2-core machine, and LLVM's optimisations a large part of a compile:
# without them tests/test_variants.py, test_parity.py and test_gmm.py together took 72 and 119 s against 156 s, and the
# whole suite 10-11.8 min against 12.9 (session 9). Compiled steps run ~3.5x slower, which only long loops notice.
# XLA:CPU keeps fast-math off at every level, and every parity test passes alike; the benchmarks under experiments/
# compile at the default level. Set before JAX creates its CPU client, and inherited by the processes tests start.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit the controller's
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# As the entry points do: XLA:CPU's per-call temporaries stay mapped, not page-faulted in again at every call. But with
# JAX's asynchronous dispatch kept: the tests run steps of a few hundred tokens, whose temporaries fit a worker
# thread's arena anyway, and such steps ran 10-35% slower on the caller thread (a tiny-model train step of 8x32
# tokens: 12.6-15.1 vs 9.7-13.6 ms, alternating child processes; the PID and accumulation tests 79-80 vs 67-74 s).
# tests/test_host_memory.py checks the caller-thread default in processes of its own.
host_memory.retain_freed_memory(calls_on_caller_thread=False)

# One persistent XLA compilation cache per test session, shared with the subprocesses tests start (they inherit the
# environment): identical programs (the same train step in a driver process and in-process) compile once. Fresh per
# session, so nothing stale crosses runs.
# Under pytest-xdist the workers of one run share it too (keyed by the run's id).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN_ID:
  _CACHE = os.path.join(tempfile.gettempdir(), f"zaya_jax_xla_cache_{_RUN_ID}")
  os.makedirs(_CACHE, exist_ok=True)
else:
  _CACHE = tempfile.mkdtemp(prefix="zaya_jax_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture
def free_port() -> int:
  """A localhost TCP port nothing listens on: the coordinator of a multi-process test's jax.distributed."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
