"""The train step on a mesh: `step.train_step` (the one definition of the math) jitted with the plan's shardings.

  plan = ShardingPlan.from_config(ParallelConfig(mesh="data:2,expert:2,tensor:2"))
  trainer, state = step.create_initialised(..., state_shardings=plan.state_shardings)  # built sharded
  # (or step.create(model, ...) + place(plan, state) for a built model; create_abstract + a checkpoint restore)
  train = jit_sharded_train_step(plan, trainer, state)
  state, metrics = train(state, global_batch(plan, local_rows))

Each process passes only its own rows of the batch (`make_data(..., process_index, process_count)` gives them);
`global_batch` assembles the global arrays without moving data between hosts. The compiler inserts the collectives
that the shardings imply: gradient all-reduce (data), reduce-scatter + all-gather of parameters (fsdp, and of the
updates under ZeRO-1), the all-to-all of the MoE dispatch (expert) and the tensor-parallel reductions.

B global batch, T sequence.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from zaya_jax.parallel.expert import dispatch_axes
from zaya_jax.sharding import ShardingError, ShardingPlan, with_shardings
from zaya_jax.train.step import Trainer, TrainState, step_compiler_options, train_step


def validate(plan: ShardingPlan, state: TrainState, global_batch_size: int | None = None, grad_accum: int = 1) -> None:
  """Every split dimension divides, the batch (each micro-batch) splits evenly and the MoE dispatch can use the
  rules' axes; raises ShardingError naming axis and sizes."""
  plan.state_shardings(state)  # resolving the specs checks every parameter and optimizer-state dimension
  dispatch_axes(plan)
  if global_batch_size is not None:
    plan.check_batch(global_batch_size, grad_accum)


def place(plan: ShardingPlan, state: TrainState) -> TrainState:
  """The state with every array on its devices. Each process passes the same full values (as after
  `step.create` with one seed); a process builds only the shards its devices hold."""
  shardings = plan.state_shardings(state)

  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, state, shardings)


def abstract_state(plan: ShardingPlan, state) -> TrainState:
  """ShapeDtypeStructs with the plan's shardings: the target of an Orbax restore onto this mesh."""
  return with_shardings(state, plan.state_shardings(state))


def batch_sharding(plan: ShardingPlan) -> NamedSharding:
  return NamedSharding(plan.mesh, plan.batch_spec(2))


def process_rows(plan: ShardingPlan, global_batch_size: int, seq_len: int) -> tuple[int, int]:
  """[start, stop) of the global rows this process's devices hold; they must be the contiguous block that the data
  module gives it (rows process_index * B / process_count onwards), else the mesh's device order is wrong."""
  sharding = batch_sharding(plan)
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size, seq_len)).values():
    start, stop, _ = index[0].indices(global_batch_size)
    rows.update(range(start, stop))
  start, stop = min(rows), max(rows) + 1
  local = global_batch_size // jax.process_count()
  expected = (jax.process_index() * local, (jax.process_index() + 1) * local)
  if len(rows) != stop - start or (start, stop) != expected:
    raise ShardingError(f"process {jax.process_index()} holds batch rows {sorted(rows)[:4]}.. of {global_batch_size} "
                        f"on mesh {plan.describe()}, but reads rows [{expected[0]}, {expected[1]}); make the batch "
                        "axes span the hosts outermost (e.g. --dcn_mesh=data:<hosts>)")
  return start, stop


def global_batch(plan: ShardingPlan, local_batch: dict) -> dict:
  """Global [B, T] arrays from this process's [B / process_count, T] rows, split over the batch axes."""
  local_rows, seq_len = np.shape(next(iter(local_batch.values())))
  global_size = local_rows * jax.process_count()
  plan.check_batch(global_size)
  process_rows(plan, global_size, seq_len)
  sharding = batch_sharding(plan)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_size, seq_len))
          for k, v in local_batch.items()}


def jit_sharded_train_step(plan: ShardingPlan, trainer: Trainer, state: TrainState, *, donate: bool = True):
  """`train_step` jitted with the state and batch shardings of `plan` (state donated); metrics come back replicated.

  The model is traced under `plan.activate()`, which switches on the activation constraints and the shard_map MoE
  dispatch; the plan is closed over, so each plan gets its own compiled program.
  """
  state_shardings = plan.state_shardings(state)
  batch_shard = batch_sharding(plan)

  def step(state, batch):
    with plan.activate():
      return train_step(trainer, state, batch)

  return jax.jit(step, in_shardings=(state_shardings, batch_shard), out_shardings=(state_shardings,
                                                                                     plan.replicated()),
                 donate_argnums=(0,) if donate else (),
                 compiler_options=step_compiler_options(plan.mesh.devices.flat[0].platform))
