"""Peak host memory of `load_hf` on a generated checkpoint of at least `--size_mb` MiB.

The checkpoint is a random `ZayaForCausalLM` written by `save_hf` (sharded, with an index). It is loaded
in a fresh subprocess so that nothing the generator allocated counts; that process takes its baseline
RSS right before `load_hf`, after the imports and after JAX has started its CPU client, and reports
(peak - baseline) / checkpoint bytes. Every loaded tensor is then checked byte for byte against the
saved one (blake2b digests), or against it cast to `--load_param_dtype`.

Peak RSS is the kernel's high-water mark (VmHWM), reset right before loading by writing "5" to
/proc/self/clear_refs. `getrusage().ru_maxrss` cannot be reset and, in a process started from a large
parent, also holds the parent's RSS at exec time, so it is only recorded for reference. A psutil thread
sampling RSS every millisecond is a cross-check, and the fallback where clear_refs is not writable.

  python experiments/load_memory.py                    # >= 1100 MiB, results/load_memory.json
  python experiments/load_memory.py --size_mb=200 --shard_mb=64 --out=/tmp/small.json
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: this checkout
from experiments.common import reset_peak_rss, status_mib, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("size_mb", 1100, "Smallest checkpoint size to generate, in MiB.")
flags.DEFINE_integer("shard_mb", 400, "max_shard_bytes for save_hf, in MiB (below the size: sharded + index).")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "dtype of the generated checkpoint.")
flags.DEFINE_string("load_param_dtype", None, "param_dtype passed to load_hf (default: the checkpoint's).")
flags.DEFINE_string("ckpt_dir", None, "Where to write the checkpoint (default: a temporary folder, removed after).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results", "load_memory.json"),
                    "Results JSON.")
flags.DEFINE_enum("mode", "all", ["all", "measure"],
                  "all: generate, then measure in a fresh subprocess. measure: load --ckpt_dir and print JSON.")

MiB = 2**20
RATIO_LIMIT = 1.3  # (peak - baseline) / checkpoint bytes, from the project's requirements


# -- host memory ---------------------------------------------------------------------------------------

class _RssSampler:
  """Highest RSS seen by a thread polling every `interval` s (misses spikes shorter than that)."""

  def __init__(self, interval: float = 1e-3):
    import psutil

    self._proc, self._interval, self.peak = psutil.Process(), interval, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      time.sleep(self._interval)

  def __enter__(self):
    self.peak = self._proc.memory_info().rss
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)


# -- the model -----------------------------------------------------------------------------------------

def _config(num_layers: int, param_dtype: str):
  from zaya_jax.config import AttentionConfig, MoEConfig, ZayaConfig

  # ZAYA1-like proportions, scaled down: experts dominate and no tensor is a large share of the whole
  # (the largest, the embedding and each gate_up_proj, are 32 MiB in fp32: 3% at 1.1 GB), as in the
  # 8B model (its embedding is ~6%).
  return ZayaConfig(
      vocab_size=16384, hidden_size=512, num_layers=num_layers,
      attention=AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64),
      moe=MoEConfig(num_experts=16, intermediate_size=512, router_hidden_size=64),
      max_position_embeddings=4096, dtype=param_dtype, param_dtype=param_dtype)


def _param_bytes(cfg) -> int:
  import jax
  from flax import nnx

  from zaya_jax import ZayaForCausalLM

  state = nnx.state(nnx.eval_shape(lambda: ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))))
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def _config_for_size(size_bytes: int, param_dtype: str):
  """The fewest layers whose parameters reach `size_bytes`."""
  one, two = _param_bytes(_config(1, param_dtype)), _param_bytes(_config(2, param_dtype))
  per_layer, fixed = two - one, 2 * one - two
  return _config(max(1, math.ceil((size_bytes - fixed) / per_layer)), param_dtype)


def _digest(array) -> str:
  import numpy as np

  array = np.ascontiguousarray(array)
  return f"{array.dtype}{list(array.shape)}:" + hashlib.blake2b(array.reshape(-1).view(np.uint8)).hexdigest()


def _digests(model, cast_to: str | None = None) -> dict[str, set[str]]:
  """{checkpoint key: blake2b digests of the raw bytes}: as stored and, if `cast_to`, cast to that dtype
  (a loaded tensor matches the one of its own dtype; balancing biases, say, stay fp32)."""
  import jax.numpy as jnp
  import numpy as np

  from zaya_jax.checkpoint.hf import flat_params

  out = {}
  for key, var in flat_params(model).items():
    array = np.asarray(var[...])
    out[key] = {_digest(array)} | ({_digest(array.astype(jnp.dtype(cast_to)))} if cast_to else set())
  return out


# -- the two processes ---------------------------------------------------------------------------------

def measure(ckpt_dir: str, load_param_dtype: str | None) -> dict:
  """Loads `ckpt_dir` in this (fresh) process and returns the memory figures and the loaded digests."""
  import gc
  import resource

  import jax
  import jax.numpy as jnp

  from zaya_jax.checkpoint.hf import load_hf

  jnp.zeros(1).block_until_ready()  # the CPU client and its allocator exist before the baseline
  gc.collect()
  hwm_ok = reset_peak_rss()
  baseline = status_mib("VmRSS")
  with _RssSampler() as sampler:
    start = time.perf_counter()
    model = load_hf(ckpt_dir, param_dtype=load_param_dtype)
    jax.block_until_ready(jax.tree.leaves(model))  # transfers are asynchronous: wait before reading the peak
    load_s = time.perf_counter() - start
  peak_hwm = status_mib("VmHWM") if hwm_ok else None
  after = status_mib("VmRSS")
  return dict(
      baseline_rss_mib=baseline, peak_rss_mib=peak_hwm, sampled_peak_rss_mib=sampler.peak / MiB,
      rss_after_load_mib=after, ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      peak_source="VmHWM after clear_refs" if hwm_ok else "psutil sampling", load_s=load_s,
      digests={k: d.pop() for k, d in _digests(model).items()})


def run_all() -> dict:
  import gc

  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from zaya_jax import ZayaForCausalLM
  from zaya_jax.checkpoint.hf import flat_params, save_hf

  cfg = _config_for_size(FLAGS.size_mb * MiB, FLAGS.param_dtype)
  ckpt_dir = FLAGS.ckpt_dir or tempfile.mkdtemp(prefix="zaya_load_memory_")
  try:
    start = time.perf_counter()
    model = ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))
    # Norms and residual scales start as constants: perturb them so that every digest below means something.
    rng = np.random.default_rng(0)
    params = flat_params(model)
    for var in params.values():
      value = np.asarray(var[...])
      if value.size > 1 and np.ptp(value.astype(np.float32)) == 0:
        var[...] = jnp.asarray(value + 0.1 * rng.standard_normal(value.shape), value.dtype)
    largest_bytes = max(var[...].nbytes for var in params.values())
    saved = _digests(model, cast_to=FLAGS.load_param_dtype)
    save_hf(model, ckpt_dir, max_shard_bytes=FLAGS.shard_mb * MiB, overwrite=True)
    generate_s = time.perf_counter() - start
    del model, params, value
    gc.collect()

    files = sorted(os.listdir(ckpt_dir))
    shards = [f for f in files if f.endswith(".safetensors")]
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in shards)
    # A fresh interpreter: the generator's heap and JAX buffers above must not count.
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--mode=measure", f"--ckpt_dir={ckpt_dir}"]
    if FLAGS.load_param_dtype:
      cmd.append(f"--load_param_dtype={FLAGS.load_param_dtype}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"measuring subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
  finally:
    if FLAGS.ckpt_dir is None:
      shutil.rmtree(ckpt_dir, ignore_errors=True)

  loaded = child.pop("digests")
  peak = child["peak_rss_mib"] if child["peak_rss_mib"] is not None else child["sampled_peak_rss_mib"]
  mismatched = sorted(k for k in saved if loaded.get(k) not in saved[k])
  return dict(
      command=" ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
      config=dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                  num_experts=cfg.moe.num_experts, intermediate_size=cfg.moe.intermediate_size,
                  param_dtype=cfg.param_dtype, load_param_dtype=FLAGS.load_param_dtype),
      checkpoint_bytes=ckpt_bytes, checkpoint_mib=ckpt_bytes / MiB, num_shards=len(shards),
      index_file="model.safetensors.index.json" in files, num_tensors=len(saved),
      largest_tensor_mib=largest_bytes / MiB,
      generate_s=generate_s, **child,
      peak_minus_baseline_mib=peak - child["baseline_rss_mib"],
      ratio=(peak - child["baseline_rss_mib"]) * MiB / ckpt_bytes, ratio_limit=RATIO_LIMIT,
      peak_total_ratio=peak * MiB / ckpt_bytes,
      malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
      tensors_checked=len(saved), tensors_mismatched=mismatched, round_trip_ok=not mismatched and
      set(loaded) == set(saved))


def main(argv):
  del argv
  if FLAGS.mode == "measure":
    print(json.dumps(measure(FLAGS.ckpt_dir, FLAGS.load_param_dtype)))
    return
  results = run_all()
  write_json(FLAGS.out, results)
  print(json.dumps(results, indent=2))
  within = results["ratio"] <= results["ratio_limit"]
  print(f"(peak - baseline) host memory / checkpoint bytes = {results['ratio']:.3f}: "
        f"{'within' if within else 'OVER'} the limit of {results['ratio_limit']}"
        + ("" if within else f" (the largest tensor is {results['largest_tensor_mib'] / results['checkpoint_mib']:.0%}"
           " of the checkpoint; small checkpoints cannot meet it)"))


if __name__ == "__main__":
  app.run(main)
