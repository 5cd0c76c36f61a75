"""Multi-host set-up without a cluster: where each process's settings come from (flags, ZAYA_*, SLURM), and the
dry-run planner's per-device bytes for ZAYA1-8B (fresh processes: it fakes one CPU device per mesh position)."""

import os
import re
import socket
import subprocess
import sys

import pytest

from zaya_jax.parallel import distributed
from zaya_jax.parallel.distributed import DistributedConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = {"SLURM_NTASKS": "32", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "mi300x-[001-004]",
         "SLURM_STEP_NODELIST": "mi300x-[001-004]"}


def test_settings_come_from_zaya_variables_then_slurm_then_nothing():
  cfg, source = distributed.from_env({"ZAYA_COORDINATOR_ADDRESS": "10.0.0.1:12355", "ZAYA_NUM_PROCESSES": "4",
                                      "ZAYA_PROCESS_ID": "3", **SLURM})
  assert (cfg, source) == (DistributedConfig("10.0.0.1:12355", 4, 3), "ZAYA_* environment")
  with pytest.raises(ValueError, match=r"set but \['ZAYA_PROCESS_ID'\] not"):
    distributed.from_env({"ZAYA_COORDINATOR_ADDRESS": "10.0.0.1:12355", "ZAYA_NUM_PROCESSES": "4"})
  # Any partial set is refused (it would otherwise fall back to SLURM, or to one process, silently); so are ranks
  # out of range and counts that are not numbers, by the variable's name.
  with pytest.raises(ValueError, match=r"set but \['ZAYA_COORDINATOR_ADDRESS'\] not"):
    distributed.from_env({"ZAYA_NUM_PROCESSES": "2", "ZAYA_PROCESS_ID": "1", **SLURM})
  zaya = {"ZAYA_COORDINATOR_ADDRESS": "10.0.0.1:12355", "ZAYA_NUM_PROCESSES": "2"}
  with pytest.raises(ValueError, match="ZAYA_PROCESS_ID=5 must be below ZAYA_NUM_PROCESSES=2"):
    distributed.from_env({**zaya, "ZAYA_PROCESS_ID": "5"})
  with pytest.raises(ValueError, match="ZAYA_NUM_PROCESSES='two' is not"):
    distributed.from_env({**zaya, "ZAYA_NUM_PROCESSES": "two", "ZAYA_PROCESS_ID": "1"})
  # A multi-node batch script's shell (no srun): the job's task count without a step's variables.
  with pytest.raises(ValueError, match="start the launch with srun"):
    distributed.from_env({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"})
  assert distributed.from_env({}) == (None, "single process")
  assert distributed.from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == (None, "single process")


def test_slurm_with_one_task_per_node_drives_every_visible_gpu():
  # sbatch_mi300x.sh's layout: JAX's own SLURM detection would give the process only GPU SLURM_LOCALID.
  one_per_node = {**SLURM, "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "1(x4)"}
  cfg, source = distributed.from_env({**one_per_node, "HIP_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
  assert cfg.local_device_ids == tuple(range(8)) and cfg.coordinator_address is None and "one task per node" in source
  assert distributed.from_env({**one_per_node, "SLURM_GPUS_ON_NODE": "4"})[0].local_device_ids == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="no GPU count is visible"):
    distributed.from_env(one_per_node)
  # A task per GPU: JAX's rule (the task's SLURM_LOCALID) stands.
  cfg, source = distributed.from_env({**SLURM, "SLURM_TASKS_PER_NODE": "8(x4)", "HIP_VISIBLE_DEVICES": "0,1"})
  assert (cfg, source) == (DistributedConfig(), "SLURM")


def test_partial_multihost_arguments_are_refused_before_joining():
  with pytest.raises(ValueError, match=r"\['process_id'\] missing"):
    distributed.initialize(DistributedConfig("10.0.0.1:12355", 2, None))
  with pytest.raises(ValueError, match=r"\['coordinator_address', 'process_id'\] missing"):
    distributed.initialize(DistributedConfig(None, 2, None))

  with pytest.raises(ValueError, match=r"'10.0.0.1' is not host:port"):
    distributed.initialize(DistributedConfig("10.0.0.1", 2, 1))
  for rank in (2, -1):  # refused at once: it waited out the timeout, then blamed the network
    with pytest.raises(ValueError, match=rf"process_id {rank} is not a rank of num_processes 2"):
      distributed.initialize(DistributedConfig("10.0.0.1:12355", 2, rank, initialization_timeout=60))


def test_an_unreachable_coordinator_or_a_taken_port_is_named_instead_of_an_abort(free_port):
  # Without the check, JAX's client aborts the process from C++ (DEADLINE_EXCEEDED on RegisterTask).
  with pytest.raises(ValueError, match=rf"process 1 of 2: nothing answers at the coordinator localhost:{free_port} "
                                       r"after 1 s .* is process 0 running"):
    distributed.initialize(DistributedConfig(f"localhost:{free_port}", 2, 1, initialization_timeout=1))
  with socket.socket() as taken:
    taken.bind(("", free_port))
    taken.listen()
    with pytest.raises(ValueError, match=rf"process 0 runs the coordinator on port {free_port} .* the port is taken"):
      distributed.initialize(DistributedConfig(f"localhost:{free_port}", 2, 0))
    distributed.check_coordinator(DistributedConfig(f"localhost:{free_port}", 2, 1))  # process 1 finds it listening


def plan(*args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--config=zaya1_8b",
                         "--compile_layers=0", *args], capture_output=True, text=True, timeout=240,
                        env={**os.environ, "PYTHONPATH": ROOT})
  return proc.returncode, proc.stdout, proc.stderr


def gib(out: str, row: str) -> float:
  value, unit = re.search(rf"^  {row}\s+([\d.]+) (GiB|MiB)", out, re.M).groups()
  return float(value) / (1 if unit == "GiB" else 1024)


def test_planner_zero1_on_one_and_sixteen_mi300x_nodes():
  rc, one_node, err = plan("--mesh=data:8", "--zero1")
  assert rc == 0, err
  rc, sixteen, err = plan("--mesh=data:8", "--dcn_mesh=data:16", "--zero1")
  assert rc == 0, err
  assert "8,840,488,784 parameters" in one_node and "= 128 devices" in sixteen
  # The planner's default (1 sequence per device) is not what the config trains with: it says how to launch it.
  assert "grad_accum 128: 1 sequence(s) per device" in one_node and "--set=step.grad_accum=128" in one_node
  rc, configured, err = plan("--mesh=data:8", "--set=step.grad_accum=1")  # an override is planned as given
  assert rc == 0 and "grad_accum 1: 128 sequence(s) per device" in configured and "note:" not in configured, err
  for out in (one_node, sixteen):
    assert gib(out, "parameters") == pytest.approx(8_840_488_784 * 4 / 2**30, abs=0.01)  # fp32 masters, replicated
    assert "FITS (with 10% headroom, activations not counted)" in out and "DOES NOT FIT" not in out
  # ZeRO-1 splits the optimizer state over the data axis: 16x more ways across 16 nodes; without it, replicated.
  assert gib(sixteen, "optimizer state") * 16 == pytest.approx(gib(one_node, "optimizer state"), rel=0.05)
  assert gib(configured, "optimizer state") == pytest.approx(8 * gib(one_node, "optimizer state"), rel=0.02)
  # Accumulating over micro-batches holds a gradient copy, split like the optimizer state under ZeRO-1 (estimated
  # here: --compile_layers=0); one micro-batch needs none.
  accumulator = "gradient accumulator \\(not compiled: --compile_layers=0\\)"
  assert gib(one_node, accumulator) == pytest.approx(gib(one_node, "parameters") / 8, rel=0.01)
  assert gib(configured, accumulator) == 0
  rc, out, err = plan("--mesh=data:3")
  assert rc == 1 and err.startswith("error: batch size 1024 does not split over the batch axes data=3 (3 parts)")
  assert "Traceback" not in err and "grad_accum" not in err, err  # not a grad_accum derived from the bad split
  # The config's parallel settings are planned as train.py runs them (--mesh and --zero1 are their shorthands).
  rc, via_set, err = plan("--set=parallel.mesh=data:8", "--set=parallel.dcn_mesh=data:16", "--set=parallel.zero1=True")
  assert rc == 0 and via_set == sixteen, err
  rc, default_mesh, err = plan("--dcn_mesh=data:16", "--zero1")  # the per-node mesh defaults to data:8
  assert rc == 0 and default_mesh == sixteen, err
  # A plan that does not fit names the memory settings it leaves off; one that fits, or uses them all, does not.
  rc, small, err = plan("--mesh=data:8", "--zero1", "--device_memory_gb=40")
  assert rc == 0 and "DOES NOT FIT" in small, err
  assert "leaves off" in small and "--set=model.remat=full" in small and "--zero1" not in small.split("leaves off")[1]
  assert "leaves off" not in one_node
  rc, out, err = plan("--mesh=data:8", "--zero1", "--device_memory_gb=40", "--set=model.remat=dots",
                      "--set=step.logits_chunk=512")
  assert rc == 0 and "DOES NOT FIT" in out and "leaves off" not in out, err
  rc, out, err = plan("--batch=-4")
  assert rc == 1 and "--batch" in err and "Traceback" not in err


def test_planner_extrapolates_step_temporaries_from_two_compiled_depths():
  # A 4-layer tiny model on data:2: compiled at 1 and 2 layers and extrapolated linearly to 4, against the same
  # plan at --compile_layers=4, which compiles 2 and 4 layers (its 4-layer row is then the compiled figure itself).
  common = ("--config=tiny", "--mesh=data:2", "--set=model.num_layers=4")
  runs = {}
  for run, args in ((2, ["--compile_layers=2"]), (4, ["--compile_layers=4"]),
                    ("remat", ["--compile_layers=2", "--set=model.remat=full"])):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), *common, *args],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    runs[run] = proc.stdout
  compiled = {(run, int(n)): float(v) for run, out in runs.items()
              for n, v in re.findall(r"compiled (\d) layer\(s\): temporaries ([\d.]+) MiB", out)}
  assert set(compiled) == {(2, 1), (2, 2), (4, 2), (4, 4), ("remat", 1), ("remat", 2)}
  # The compile keeps jax.checkpoint's recomputation out of the forward pass, as a GPU compiler does: each layer adds
  # less with remat (measured, grad_accum 4, from 1 to 2 layers: 1.10 against 2.12 MiB).
  assert compiled["remat", 2] - compiled["remat", 1] < 0.75 * (compiled[2, 2] - compiled[2, 1])
  # "auto" backends are compiled as a GPU runs them (the kernels in interpret mode): the default --target.
  assert all("backends: attention pallas, experts pallas (for a gpu" in out for out in runs.values())
  row = "step temporaries of 4 layers, accumulator included"
  extrapolated, measured = gib(runs[2], row) * 1024, gib(runs[4], row) * 1024
  one, two = compiled[2, 1], compiled[2, 2]
  assert compiled[4, 2] == pytest.approx(two, abs=0.01)
  assert extrapolated == pytest.approx(one + 3 * (two - one), abs=0.03)  # printed to 0.01 MiB
  assert measured == pytest.approx(compiled[4, 4], abs=0.01)
  assert two > one and extrapolated == pytest.approx(measured, rel=0.05)
