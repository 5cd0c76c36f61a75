"""Joining the processes of a multi-host run (jax.distributed), from flags or the cluster's environment.

Precedence: explicit arguments (the launcher's --coordinator_address/--num_processes/--process_id flags), then the
variables of launch/cluster/launch_multinode.sh (ZAYA_COORDINATOR_ADDRESS, ZAYA_NUM_PROCESSES, ZAYA_PROCESS_ID),
then SLURM (SLURM_NTASKS > 1: JAX reads SLURM_* itself and takes the first node of the job as coordinator). With
none of these, a run is a single process and nothing is initialised.

Devices per process: JAX's SLURM detection assumes one task per GPU and gives each process only the GPU of its
SLURM_LOCALID. launch/cluster/sbatch_mi300x.sh runs one task per node (a process is a host, the granule of
--dcn_mesh), so with one task per node every visible GPU (HIP_/ROCR_/CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE)
is the process's. With several tasks per node JAX's one-GPU-per-task rule stands.

Call `initialize` before anything touches a device. With an explicit coordinator address it first checks that the
run can form (`check_coordinator`), since JAX's client aborts the process from C++ when it cannot. On CPU the
processes talk through gloo (JAX's default CPU collectives), which is what the two-process tests use.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: every local accelerator
  initialization_timeout: int = 300  # seconds to wait for all processes


def from_env(env=None) -> tuple[DistributedConfig | None, str]:
  """(config, where it came from): ZAYA_* variables, else SLURM auto-detection, else (None, "single process")."""
  env = os.environ if env is None else env
  zaya = ("ZAYA_COORDINATOR_ADDRESS", "ZAYA_NUM_PROCESSES", "ZAYA_PROCESS_ID")
  if any(env.get(k) for k in zaya):  # a partial set would silently fall back to SLURM or a single process
    missing = [k for k in zaya if not env.get(k)]
    if missing:
      raise ValueError(f"{[k for k in zaya if k not in missing]} set but {missing} not: the three go together")
    numbers = {}
    for k in zaya[1:]:
      if not env[k].strip().isdigit():
        raise ValueError(f"{k}={env[k]!r} is not a non-negative integer")
      numbers[k] = int(env[k])
    if numbers["ZAYA_PROCESS_ID"] >= numbers["ZAYA_NUM_PROCESSES"]:
      raise ValueError(f"ZAYA_PROCESS_ID={numbers['ZAYA_PROCESS_ID']} must be below "
                       f"ZAYA_NUM_PROCESSES={numbers['ZAYA_NUM_PROCESSES']} (ranks count from 0)")
    return DistributedConfig(env["ZAYA_COORDINATOR_ADDRESS"], numbers["ZAYA_NUM_PROCESSES"],
                             numbers["ZAYA_PROCESS_ID"]), "ZAYA_* environment"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
    if "SLURM_STEP_NODELIST" not in env or "SLURM_LOCALID" not in env:
      # A batch script's own shell has the job's task count but not a step's variables, which JAX's detection reads.
      raise ValueError("SLURM job of several tasks, but this process is not one of a job step's tasks: start the "
                       "launch with srun (launch/cluster/sbatch_mi300x.sh does)")
    tasks_per_node = re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", "") or env.get("SLURM_NTASKS_PER_NODE", ""))
    if tasks_per_node is None or int(tasks_per_node.group()) != 1:
      return DistributedConfig(), "SLURM"
    return DistributedConfig(local_device_ids=_visible_gpus(env)), "SLURM, one task per node"
  return None, "single process"


def _visible_gpus(env) -> tuple[int, ...]:
  """Indices of the GPUs a one-task-per-node process drives: all that are visible to it."""
  for name in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
    if env.get(name):
      return tuple(range(len(env[name].split(","))))
  if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
    return tuple(range(int(env["SLURM_GPUS_ON_NODE"])))
  raise ValueError("SLURM runs one task per node, but no GPU count is visible: set HIP_VISIBLE_DEVICES (or "
                   "--gpus-per-node, which sets SLURM_GPUS_ON_NODE) so the process drives every GPU of its node")


def initialize(cfg: DistributedConfig | None = None) -> str:
  """Joins the run's processes (see the module docstring); returns how the setup was found."""
  source = "arguments"
  if cfg is not None:
    given = {"coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
             "process_id": cfg.process_id}
    missing = [k for k, v in given.items() if v is None]
    if 0 < len(missing) < 3:
      raise ValueError(f"multi-host arguments go together: {missing} missing "
                       f"(given {[k for k in given if k not in missing]})")
    if not missing and not (cfg.num_processes >= 1 and 0 <= cfg.process_id < cfg.num_processes):
      # Otherwise check_coordinator would wait out the whole timeout, then blame the network.
      raise ValueError(f"process_id {cfg.process_id} is not a rank of num_processes {cfg.num_processes} "
                       "(ranks count from 0)")
  if cfg is None or cfg.coordinator_address is None:
    found, source = from_env()
    cfg = found if cfg is None or found is None else dataclasses.replace(
        found, initialization_timeout=cfg.initialization_timeout)
  if cfg is None:
    return source
  if cfg.coordinator_address is not None:
    check_coordinator(cfg)
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id,
      local_device_ids=None if cfg.local_device_ids is None else list(cfg.local_device_ids),
      initialization_timeout=cfg.initialization_timeout)
  return source


def check_coordinator(cfg: DistributedConfig, *, retry_seconds: float = 1.0) -> None:
  """Raises ValueError naming the address when the run cannot form, before JAX's client would abort the process
  from C++ (a DEADLINE_EXCEEDED check failure on RegisterTask): process 0 needs the coordinator's port free; every
  other process needs something listening there within `initialization_timeout` (process 0 may start later)."""
  host, _, port = cfg.coordinator_address.rpartition(":")
  host = host.strip("[]")  # [::1]:1234
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator_address {cfg.coordinator_address!r} is not host:port")
  if cfg.process_id == 0:
    with socket.socket() as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a relaunch may reuse a TIME_WAIT port
      try:
        s.bind(("", int(port)))  # where JAX's coordinator binds: every interface
      except OSError as e:
        raise ValueError(f"process 0 runs the coordinator on port {port} ({cfg.coordinator_address}), but the port "
                         f"is taken ({e.strerror}): pick another port for the whole run") from None
    return
  deadline = time.monotonic() + cfg.initialization_timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(retry_seconds, 0.1)):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ValueError(f"process {cfg.process_id} of {cfg.num_processes}: nothing answers at the coordinator "
                         f"{cfg.coordinator_address} after {cfg.initialization_timeout} s ({e.strerror or e}); is "
                         f"process 0 running, and is {host} reachable from this host?") from None
      time.sleep(retry_seconds)
