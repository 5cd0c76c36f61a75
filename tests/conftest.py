import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

from zaya_jax import host_memory

# As the entry points do: XLA:CPU's per-call temporaries stay mapped, not page-faulted in again at every call.
host_memory.retain_freed_memory()

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
