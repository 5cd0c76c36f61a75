"""Joining the processes of a multi-host run (jax.distributed), from flags or the cluster's environment.

Precedence: explicit arguments (the launcher's --coordinator_address/--num_processes/--process_id flags), then the
variables of launch/cluster/launch_multinode.sh (ZAYA_COORDINATOR_ADDRESS, ZAYA_NUM_PROCESSES, ZAYA_PROCESS_ID),
then SLURM (SLURM_NTASKS > 1: JAX reads SLURM_* itself and takes the first node of the job as coordinator). With
none of these, a run is a single process and nothing is initialised.

Call `initialize` before anything touches a device. On CPU the processes talk through gloo (JAX's default CPU
collectives), which is what the two-process test uses.
"""

from __future__ import annotations

import dataclasses
import os

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
  if env.get("ZAYA_COORDINATOR_ADDRESS"):
    missing = [k for k in ("ZAYA_NUM_PROCESSES", "ZAYA_PROCESS_ID") if not env.get(k)]
    if missing:
      raise ValueError(f"ZAYA_COORDINATOR_ADDRESS is set but {missing} are not")
    return DistributedConfig(env["ZAYA_COORDINATOR_ADDRESS"], int(env["ZAYA_NUM_PROCESSES"]),
                             int(env["ZAYA_PROCESS_ID"])), "ZAYA_* environment"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
    return DistributedConfig(), "SLURM"
  return None, "single process"


def initialize(cfg: DistributedConfig | None = None) -> str:
  """Joins the run's processes (see the module docstring); returns how the setup was found."""
  source = "arguments"
  if cfg is None or (cfg.coordinator_address is None and cfg.num_processes is None):
    found, source = from_env()
    cfg = found if cfg is None or found is None else dataclasses.replace(
        found, initialization_timeout=cfg.initialization_timeout)
  if cfg is None:
    return source
  if cfg.coordinator_address is not None and (cfg.num_processes is None or cfg.process_id is None):
    raise ValueError(f"a coordinator address ({cfg.coordinator_address}) needs num_processes and process_id too")
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id,
      local_device_ids=None if cfg.local_device_ids is None else list(cfg.local_device_ids),
      initialization_timeout=cfg.initialization_timeout)
  return source
