"""The MoE experts on a mesh: tokens stay on their data shard, travel to their expert's owner and come back.

M tokens of a device's shard, D hidden, X experts (Xl = X / e per device), e the `expert` axis size, C the slots a
device reserves per destination, F expert width (Fl = F / t per device, t the `tensor` axis size).

Inside one `jax.shard_map` over the whole mesh, each device:
  1. gives each routed token a slot in the bucket of the device that owns its expert (skip-slot tokens go nowhere);
  2. exchanges the buckets over `expert`: a padded `all_to_all` (every bucket has C rows) or a ragged one (only the
     routed rows travel; `jax.lax.ragged_all_to_all`, which XLA:CPU lacks: there an all-gather emulation with the
     same semantics stands in, to test the path);
  3. runs its Xl experts on what it received (sort by local expert, two grouped matmuls on its F/t slice, a psum
     over `tensor` for the down projection's partial sums);
  4. sends the results back with the reverse all-to-all and weights each token by its router probability.
Dropless by default: C = M, room for every local token in any one bucket. A capacity (`capacity_factor`) bounds C;
the tokens that find their bucket full are dropped (output zero) and counted. The ragged exchange is dropless only
(its receive buffer holds e x M rows, the worst case, but only routed rows are sent).

`exchange`: "padded" (the default of ParallelConfig.expert_exchange), "ragged", or "auto" (ragged where the backend
has the op, GPU and TPU, and no capacity is set; padded otherwise).

Gradients: shard_map's transpose sums the weight gradients over the axes a weight is replicated on (data, fsdp)
and reverses the all-to-alls; `check_vma=False` because the grouped matmul's loops carry unvarying zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zaya_jax.model.moe import swiglu
from zaya_jax.ops.gmm import gmm
from zaya_jax.sharding import ShardingError


def capacity(tokens_per_device: int, experts_axis_size: int, capacity_factor: float | None) -> int:
  """Rows per destination bucket: every local token (dropless) or capacity_factor x the even share."""
  if capacity_factor is None:
    return tokens_per_device
  return max(1, min(tokens_per_device, math.ceil(capacity_factor * tokens_per_device / experts_axis_size)))


EXCHANGES = ("auto", "padded", "ragged")


def resolve_exchange(exchange: str, capacity_factor: float | None = None) -> str:
  """"auto": ragged where the backend has the op (GPU, TPU) and no capacity is asked for; padded otherwise."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert exchange {exchange!r} is not one of {EXCHANGES}")
  if exchange == "auto":
    return "padded" if jax.default_backend() == "cpu" or capacity_factor is not None else "ragged"
  return exchange


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name: str):
  """`jax.lax.ragged_all_to_all` (same arguments, sender-side output offsets); on CPU, which lacks the op, the same
  result from an all-gather of every peer's rows and a scatter."""
  if jax.default_backend() != "cpu":
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis_name)
  del recv_sizes  # implied by the peers' send sizes
  me = jax.lax.axis_index(axis_name)
  rows_ER = jax.lax.all_gather(operand, axis_name)  # every peer's rows [e, R, ...]
  from_E, sizes_E, to_E = (jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes,
                                                                                output_offsets))
  r_R = jnp.arange(operand.shape[0])
  src_ER = jnp.minimum(from_E[:, None] + r_R, operand.shape[0] - 1)
  dst_ER = jnp.where(r_R < sizes_E[:, None], to_E[:, None] + r_R, output.shape[0])  # past the end: not written
  rows = rows_ER[jnp.arange(rows_ER.shape[0])[:, None], src_ER]
  return output.at[dst_ER.reshape(-1)].set(rows.reshape(-1, *operand.shape[1:]), mode="drop")


def _local_experts(x_RD, ids_R, gate_up_XF2D, down_XIDF, backend: str, tensor_axis: str | None):
  """Rows x_RD through local expert ids_R (ids_R == Xl: an empty slot, output zero)."""
  Xl = gate_up_XF2D.shape[0]
  order_R = jnp.argsort(ids_R, stable=True)  # empty slots sort last and belong to no group
  group_sizes_X = jnp.bincount(ids_R, length=Xl + 1)[:Xl]
  xs_RD = jnp.take(x_RD, order_R, axis=0)
  # [Xl, Fl, 2, D] -> [Xl, 2Fl, D]: this device's gate/up row pairs, interleaved as the full layout is.
  gate_up = gate_up_XF2D.reshape(Xl, -1, gate_up_XF2D.shape[-1])
  gate_up_R2F = gmm(xs_RD, gate_up, group_sizes_X, backend=backend, transpose_rhs=True)
  y_RD = gmm(swiglu(gate_up_R2F), down_XIDF, group_sizes_X, backend=backend, transpose_rhs=True)
  if tensor_axis is not None:
    y_RD = jax.lax.psum(y_RD, tensor_axis)  # each device holds the partial sum of its F/t columns
  return jnp.take(y_RD, jnp.argsort(order_R), axis=0)


def dispatch_axes(plan) -> tuple[str | None, str | None]:
  """The mesh axes that split the experts and their FFN width: the plan's rules for "experts" and "mlp" (the
  parameters' own layout, so no weight moves), one axis each at most. Tokens travel between the devices of the expert
  axis, so it must also split the batch (otherwise every device along it would send the same tokens); the devices
  along the width axis sum their partial outputs of the same tokens, so it must not (they would add other tokens'
  rows). Raises ShardingError; `sharded.validate` calls it before anything is compiled."""
  experts, mlp = plan.mesh_axes("experts"), plan.mesh_axes("mlp")
  if len(experts) > 1 or len(mlp) > 1:
    raise ShardingError(f"the MoE dispatch splits the experts over one mesh axis and their width over one: rules "
                        f"experts={plan.rules.experts}, mlp={plan.rules.mlp} give {experts} and {mlp}")
  if experts and experts[0] not in plan.batch_axes:
    raise ShardingError(f"the experts' mesh axis {experts[0]!r} must also split the batch (rules batch="
                        f"{plan.rules.batch}): tokens are exchanged along it")
  if mlp and mlp[0] in plan.batch_axes:
    raise ShardingError(f"the experts' FFN-width mesh axis {mlp[0]!r} (rules mlp={plan.rules.mlp}) also splits the "
                        f"batch (rules batch={plan.rules.batch}): its devices hold different tokens, so summing their "
                        "partial outputs would add other tokens' rows; split the width over an axis outside the batch "
                        "(tensor), or not at all")
  return (experts or (None,))[0], (mlp or (None,))[0]


def dispatch_combine(plan, h_MD, choice_M, weight_M, gate_up_X2FD, down_XDF, *, backend: str = "auto",
                     capacity_factor: float | None = None, exchange: str | None = None):
  """(y_MD, dropped): the experts' output for every token of the global [M, D] batch, and the dropped tokens.

  `choice_M` == X is the skip slot (output zero). Tokens are split over the plan's batch axes, experts and the FFN
  width over the mesh axes of the rules "experts" and "mlp" (by default `expert` and `tensor`; `dispatch_axes`).
  `exchange` defaults to the plan's.
  """
  exchange = resolve_exchange(exchange or plan.expert_exchange, capacity_factor)
  if exchange == "ragged" and capacity_factor is not None:
    raise ValueError("the ragged expert exchange is dropless: capacity_factor needs exchange='padded'")
  X, F2, D = gate_up_X2FD.shape
  F = F2 // 2
  expert_axis, tensor_axis = dispatch_axes(plan)
  e = plan.size(expert_axis) if expert_axis else 1
  batch = plan.batch_axes or None
  token_spec = P(batch, None)
  # The rows are gate/up pairs (model/moe.py): splitting the pairs over `tensor` is the parameter's own split, so
  # each device holds the gate and the up rows of its F/t columns and nothing moves.
  gate_up_XF2D = gate_up_X2FD.reshape(X, F, 2, D)

  def local_ragged(h_MD, choice_M, weight_M, gate_up_XIF2D, down_XIDF):
    M = h_MD.shape[0]
    Xl = gate_up_XIF2D.shape[0]
    routed_M = choice_M < X
    dest_M = jnp.where(routed_M, choice_M // Xl, e)  # skip-slot tokens sort after every destination, unsent
    order_M = jnp.argsort(dest_M, stable=True)
    send_E = jnp.bincount(dest_M, length=e + 1)[:e]
    sizes_EE = jax.lax.all_gather(send_E, expert_axis)  # [source, destination] rows
    me = jax.lax.axis_index(expert_axis)
    exclusive = lambda a, axis: jnp.cumsum(a, axis=axis) - a
    send_from_E = exclusive(send_E, 0)  # where each destination's rows start in my sorted rows
    recv_E = sizes_EE[:, me]
    recv_from_E = exclusive(recv_E, 0)  # where each source's rows start in my receive buffer
    lands_at_E = exclusive(sizes_EE, 0)[me]  # where my rows start in each destination's buffer
    back_at_E = exclusive(sizes_EE, 1)[:, me]  # where each source's rows start in its own sorted rows
    R = e * M  # the worst case: every device's tokens to me

    def forward(x, fill):
      return ragged_all_to_all(x, jnp.full((R, *x.shape[1:]), fill, x.dtype), send_from_E, send_E, lands_at_E,
                               recv_E, axis_name=expert_axis)

    recv_RD = forward(jnp.take(h_MD, order_M, axis=0), 0)
    recv_ids_R = forward(jnp.take(choice_M % Xl, order_M), Xl)  # unfilled rows: no local expert
    y_RD = _local_experts(recv_RD, recv_ids_R, gate_up_XIF2D, down_XIDF, backend, tensor_axis)
    back_MD = ragged_all_to_all(y_RD, jnp.zeros((M, D), y_RD.dtype), recv_from_E, recv_E, back_at_E, send_E,
                                axis_name=expert_axis)
    y_MD = jnp.take(back_MD, jnp.argsort(order_M), axis=0) * weight_M[:, None]
    return jnp.where(routed_M[:, None], y_MD, jnp.zeros_like(y_MD)), jnp.zeros((), jnp.int32)

  def local(h_MD, choice_M, weight_M, gate_up_XIF2D, down_XIDF):
    M = h_MD.shape[0]
    Xl = gate_up_XIF2D.shape[0]
    C = capacity(M, e, capacity_factor)
    routed_M = choice_M < X
    dest_M = jnp.where(routed_M, choice_M // Xl, 0)
    # The slot of a token in its destination's bucket: how many earlier local tokens chose that destination.
    onehot_ME = jax.nn.one_hot(dest_M, e, dtype=jnp.int32) * routed_M[:, None]
    slot_M = jnp.take_along_axis(jnp.cumsum(onehot_ME, axis=0) - onehot_ME, dest_M[:, None], axis=1)[:, 0]
    kept_M = routed_M & (slot_M < C)
    dropped = jnp.sum(routed_M & ~kept_M)
    index_M = jnp.where(kept_M, dest_M * C + slot_M, e * C)  # e * C: out of range, dropped by the scatter
    send_RD = jnp.zeros((e * C, D), h_MD.dtype).at[index_M].set(h_MD, mode="drop")
    send_ids_R = jnp.full((e * C,), Xl, jnp.int32).at[index_M].set(choice_M % Xl, mode="drop")
    if expert_axis is not None:
      def exchange(x):
        return jax.lax.all_to_all(x.reshape(e, C, *x.shape[1:]), expert_axis, 0, 0, tiled=True).reshape(x.shape)
      recv_RD, recv_ids_R = exchange(send_RD), exchange(send_ids_R)
    else:
      exchange = None
      recv_RD, recv_ids_R = send_RD, send_ids_R
    y_RD = _local_experts(recv_RD, recv_ids_R, gate_up_XIF2D, down_XIDF, backend, tensor_axis)
    back_RD = exchange(y_RD) if exchange is not None else y_RD
    y_MD = jnp.take(back_RD, jnp.minimum(index_M, e * C - 1), axis=0)
    # Weighted by the (unbiased) router probability as in the single-device path; skipped or dropped rows are zero.
    y_MD = y_MD * weight_M[:, None]
    y_MD = jnp.where(kept_M[:, None], y_MD, jnp.zeros_like(y_MD))
    # Each token shard counted its own tokens; devices that share a shard (other axes) counted the same ones.
    return y_MD, jax.lax.psum(dropped, plan.batch_axes) if plan.batch_axes else dropped

  fn = jax.shard_map(
      local_ragged if exchange == "ragged" and expert_axis is not None else local, mesh=plan.mesh,
      in_specs=(token_spec, P(batch), P(batch), P(expert_axis, tensor_axis, None, None),
                P(expert_axis, None, tensor_axis)),
      out_specs=(token_spec, P()), check_vma=False)
  return fn(h_MD, choice_M.astype(jnp.int32), weight_M, gate_up_XF2D, down_XDF)


def sharded_experts(plan, h_MD, choice_M, weight_M, gate_up_X2FD, down_XDF, *, backend: str = "auto"):
  """The dropless expert output on a mesh (what `Experts.__call__` returns on one device)."""
  return dispatch_combine(plan, h_MD, choice_M, weight_M, gate_up_X2FD, down_XDF, backend=backend)[0]
