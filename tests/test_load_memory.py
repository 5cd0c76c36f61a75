"""Streamed loading keeps peak host memory under 1.3x the checkpoint's size, and loses nothing.

Runs `experiments/load_memory.py` on a ~185 MiB sharded checkpoint: it is generated in one process and
loaded by `load_hf` in a fresh one, whose baseline RSS is taken right before loading and whose peak is
the kernel's high-water mark from that moment (see the script). Every tensor is compared byte for byte.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "load_memory.py")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc (Linux)")
def test_load_peak_memory_and_round_trip(tmp_path):
  out = tmp_path / "load_memory.json"
  # 3 layers: ~185 MiB in fp32 over 6 shards; the largest tensor (32 MiB) is ~17% of it, so one stray
  # copy of a tensor per load, or host buffers piling up behind asynchronous transfers, would show.
  cmd = [sys.executable, SCRIPT, "--size_mb=160", "--shard_mb=48", f"--ckpt_dir={tmp_path / 'ckpt'}", f"--out={out}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())

  assert 150 * 2**20 <= result["checkpoint_bytes"] <= 250 * 2**20
  assert result["num_shards"] > 1 and result["index_file"]
  assert result["round_trip_ok"], result["tensors_mismatched"][:5]
  assert result["tensors_checked"] == result["num_tensors"] > 0
  assert result["ratio"] < 1.3, (
      f"peak - baseline = {result['peak_minus_baseline_mib']:.0f} MiB for a {result['checkpoint_mib']:.0f} MiB "
      f"checkpoint (ratio {result['ratio']:.3f}; peak from {result['peak_source']})")
