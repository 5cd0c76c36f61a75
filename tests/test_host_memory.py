"""Keeping freed host memory mapped: a jitted call's temporaries stop page-faulting in at every call."""

import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE

# A fresh process per setting (the allocator setting is process-wide and cannot be undone): minor page faults per
# call, after warm-up, of a jitted gradient of the tiny model (many temporaries of up to a few MB; a lone small matmul
# is a poor probe: glibc's dynamic mmap threshold sometimes keeps its blocks by itself), and of a call with an 80 MiB
# temporary (above what a worker thread's arena holds).
CHILD = """
import resource, sys
if sys.argv[1] == "retain":
  from zaya_jax import host_memory
  assert host_memory.retain_freed_memory()
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import zaya_jax
cfg = zaya_jax.ZayaConfig.tiny(vocab_size=1024)
graphdef, params = nnx.split(zaya_jax.ZayaForCausalLM(cfg, rngs=nnx.Rngs(0)))
ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (8, 128)))
def loss(p):
  logits = nnx.merge(graphdef, p)(ids).logits_BTV
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
grad = jax.jit(jax.grad(loss))
def faults_per_call(fn, *args):
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(10):
    jax.block_until_ready(fn(*args))
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10
x, w = jax.random.normal(jax.random.key(0), (2048, 64)), jax.random.normal(jax.random.key(1), (64, 10240))
large = jax.jit(lambda x, w: jax.nn.logsumexp(x @ w, axis=-1))  # the [2048, 10240] fp32 product: 80 MiB
print(faults_per_call(grad, params), faults_per_call(large, x, w))
"""


def faults_per_call(setting: str) -> tuple[float, float]:
  """(the tiny gradient's, the large temporary's) page faults per call in a fresh process."""
  # At XLA's default optimisation level, as users run: what a compiled program allocates depends on it.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip()
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]  # XLA reads a blank value as a file name
  out = subprocess.run([sys.executable, "-c", CHILD, setting], env=env, capture_output=True, text=True, timeout=120,
                       check=True)
  grad, large = map(float, out.stdout.strip().splitlines()[-1].split())
  return grad, large


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings: Linux only")
def test_retained_memory_stops_per_call_page_faults():
  (default, default_large), (retained, retained_large) = faults_per_call("default"), faults_per_call("retain")
  # Measured: ~8,600 per call with glibc's defaults (the temporaries' pages); retained 0-2 or ~850, once 1,742 (a
  # block of a few MB still mapped fresh in some processes), so the bound leaves room above that.
  assert default >= 1000, f"glibc's defaults took only {default} page faults per call: the premise no longer holds"
  assert retained <= default / 3, (default, retained)
  # The 80 MiB block: ~21,400 faults (its 4 KiB pages) by default. Retained, the call runs on the main thread, whose
  # arena keeps it; on JAX's asynchronous worker threads it was mmap'd afresh at every call whatever the thresholds.
  assert default_large >= 10_000, f"only {default_large} faults per call by default: the premise no longer holds"
  # Retained, alone: 0 (once ~900). Inside the full suite, while the other worker runs its tests: 2,305 and 4,177, for
  # a cause not pinned down; still 5x fewer than by default, hence a bound of a quarter.
  assert retained_large <= default_large / 4, (default_large, retained_large)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings: Linux only")
def test_late_call_warns_that_dispatch_is_unchanged(caplog):
  import jax

  from zaya_jax import host_memory

  jax.devices()  # the CPU client exists from here on
  dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
  with caplog.at_level("WARNING"):
    assert host_memory.retain_freed_memory()  # the allocator settings are conftest's; dispatch cannot change now
  assert "before the first JAX computation" in caplog.text
  assert jax.config.read("jax_cpu_enable_async_dispatch") == dispatch, "a late call changed the global setting"
