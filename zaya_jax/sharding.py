"""Where every array lives on a device mesh: the one place that declares sharding.

Mesh axes, outermost to innermost (the innermost should be the fastest links):
  data    plain data parallel; with `zero1` the optimizer state is also split over it (ZeRO-1, as ZAYA1 was trained)
  fsdp    data parallel whose replicas also split the parameters, gradients and optimizer state (ZeRO-3 / FSDP)
  expert  experts split over it; tokens travel to their expert's owner and back (jax.shard_map + all-to-all)
  tensor  attention heads, expert FFN width and the vocabulary split over it (Megatron-style)
The batch is split over data x fsdp x expert; each of those axes is a data-parallel axis for the dense parts.

Parameters carry logical axis names (`zaya_jax.model.layers.param`); `ShardingRules`, a frozen table, maps each
name onto mesh axes. One table serves every strategy: a strategy is a mesh shape (axes of size 1 shard nothing)
plus the `zero1` switch, so strategies compose by giving several axes a size above 1, e.g.
`--mesh=data:2,expert:2,tensor:2`.

The mesh uses Auto axes on purpose (jax.make_mesh defaults to Explicit): under Explicit axes every einsum, gather
and sort of the model would need an `out_sharding`; with Auto axes the compiler propagates shardings from the
parameters and the batch, `with_sharding_constraint` pins the main activations, and the MoE dispatch, where the
layout matters most, is written by hand with `jax.shard_map` (zaya_jax/parallel/expert.py).

Every check runs before anything compiles and names the axis and the sizes (`ShardingError`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")


class ShardingError(ValueError):
  """A mesh, rule or array shape that does not fit; raised before compiling."""


# -- mesh --------------------------------------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
  """"data:2,fsdp:2,expert:2,tensor:1" -> sizes of all four axes (unnamed axes are 1; one size may be -1)."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, size = part.partition(":")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ShardingError(f"mesh {text!r}: {part!r} is not axis:size with axis one of {MESH_AXES}")
    if name in seen:
      raise ShardingError(f"mesh {text!r}: axis {name!r} is given twice")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise ShardingError(f"mesh {text!r}: size {size!r} of axis {name!r} is not an integer") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ShardingError(f"mesh {text!r}: axis {name!r} has size {sizes[name]}; sizes are >= 1 (or -1: the rest)")
    seen.add(name)
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ShardingError(f"mesh {text!r}: at most one axis may have size -1")
  return sizes


def format_mesh(sizes: dict[str, int]) -> str:
  return ",".join(f"{a}:{sizes[a]}" for a in MESH_AXES)


def _fill(sizes: dict[str, int], devices: int, what: str) -> dict[str, int]:
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if devices % known:
      raise ShardingError(f"{what} {format_mesh(sizes)}: the fixed axes ({known} devices) do not divide the "
                          f"{devices} devices")
    sizes = {k: devices // known if v == -1 else v for k, v in sizes.items()}
  total = math.prod(sizes.values())
  if total != devices:
    raise ShardingError(f"{what} {format_mesh(sizes)} spans {total} devices "
                        f"({' x '.join(str(sizes[a]) for a in MESH_AXES)}), but there are {devices} devices"
                        + ("; to train on the one device without a mesh, pass an empty one (--mesh=)"
                           if devices == 1 else ""))
  return sizes


def make_mesh(mesh: str | dict[str, int], dcn_mesh: str | dict[str, int] | None = None, *,
              devices: list | None = None) -> Mesh:
  """A mesh with the four named axes (Auto typed) over all devices, or over `devices`.

  `dcn_mesh` splits each axis further across hosts (slices): axis size = ici size x dcn size, with the dcn part
  outermost, so only that axis's collectives cross the slow network (put the data axis there).
  """
  devices = list(jax.devices() if devices is None else devices)
  ici = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
  dcn = parse_mesh(dcn_mesh) if isinstance(dcn_mesh, str) else dict(dcn_mesh or dict.fromkeys(MESH_AXES, 1))
  dcn = _fill(dcn, jax.process_count() if any(v == -1 for v in dcn.values()) else math.prod(dcn.values()),
              "dcn_mesh")
  slices = math.prod(dcn.values())
  if slices > 1 and slices != jax.process_count():  # each dcn slice is one process's devices (one node)
    raise ShardingError(f"dcn_mesh {format_mesh(dcn)} spans {slices} processes (one per node), but this run has "
                        f"{jax.process_count()}")
  if len(devices) % slices:
    raise ShardingError(f"dcn_mesh {format_mesh(dcn)} has {slices} slices, which do not divide the "
                        f"{len(devices)} devices")
  ici = _fill(ici, len(devices) // slices, "mesh" if slices == 1 else "mesh (per dcn slice)")
  types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(tuple(ici[a] for a in MESH_AXES), MESH_AXES, axis_types=types, devices=devices)
  from jax.experimental import mesh_utils

  grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES],
                                              devices, process_is_granule=True)
  return Mesh(grid, MESH_AXES, axis_types=types)


# -- rules -------------------------------------------------------------------------------------------------------

# Logical names that never split: small or awkward to split (the CCA convs mix the q and k channels of a head;
# the router is a few MB in ZAYA1-8B and every token needs all of it; an MLA latent is every kv head's input).
REPLICATED_NAMES = frozenset({"conv", "conv_in", "taps", "kv_heads", "router", "router_in", "classes", "seq",
                              "latent"})


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axes (outer to inner). Names absent here are in REPLICATED_NAMES."""

  batch: tuple[str, ...] = ("data", "fsdp", "expert")  # activations' and the batch's leading dim
  embed: tuple[str, ...] = ("fsdp",)  # D of every weight: FSDP splits parameters along the hidden size
  vocab: tuple[str, ...] = ("tensor",)  # embedding / LM-head rows: vocab-parallel logits
  heads: tuple[str, ...] = ("tensor",)  # H*E: q_proj rows, o_proj columns
  # K*E (and K*E/2 per value half): k/v projection rows. Replicated: ZAYA1-8B has 2 kv heads, so tensor:4 or 8 cut
  # inside a head (XLA then moved activations at the L2 norm, RoPE and attention), for 1.5M parameters a layer.
  kv: tuple[str, ...] = ()
  mlp: tuple[str, ...] = ("tensor",)  # expert FFN width (F, or 2F of gate_up)
  experts: tuple[str, ...] = ("expert",)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      for axis in getattr(self, f.name):
        if axis not in MESH_AXES:
          raise ShardingError(f"ShardingRules.{f.name}: {axis!r} is not a mesh axis {MESH_AXES}")

  def mesh_axes(self, name: str | None) -> tuple[str, ...]:
    if name is None or name in REPLICATED_NAMES:
      return ()
    if name not in {f.name for f in dataclasses.fields(self)}:
      raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(self.table())}")
    return getattr(self, name)

  def table(self) -> dict[str, tuple[str, ...]]:
    return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **dict.fromkeys(REPLICATED_NAMES, ())}


# -- strategies --------------------------------------------------------------------------------------------------


EXPERT_EXCHANGES = ("auto", "padded", "ragged")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """How a run spreads over devices. `mesh=""` is the single-device path (no mesh, nothing changes)."""

  mesh: str = ""  # e.g. "data:2,fsdp:2,expert:2,tensor:1"; one axis may be -1 (all remaining devices)
  dcn_mesh: str = ""  # the cross-host part of each axis, e.g. "data:16" for 16 nodes
  zero1: bool = False  # split the optimizer state over `data` too (parameters stay replicated there)
  # How tokens reach their experts' owners (zaya_jax.parallel.expert). "padded" until the ragged exchange has run on
  # a GPU: so far it is checked on CPU (emulated) and lowered for cuda/rocm only. "auto": ragged on GPU/TPU.
  expert_exchange: str = "padded"

  def __post_init__(self):
    if self.expert_exchange not in EXPERT_EXCHANGES:
      raise ValueError(f"ParallelConfig.expert_exchange: {self.expert_exchange!r} is not one of {EXPERT_EXCHANGES}")
    for name in ("mesh", "dcn_mesh"):
      try:
        parse_mesh(getattr(self, name))
      except ShardingError as e:
        raise ValueError(f"ParallelConfig.{name}: {e}") from None
    if self.dcn_mesh and not self.mesh:  # the single-device path would ignore it
      raise ValueError(f"ParallelConfig.dcn_mesh = {self.dcn_mesh!r} needs a mesh (each node's part of the axes), "
                       "e.g. mesh='data:-1'")

  @property
  def enabled(self) -> bool:
    return bool(self.mesh)


# Named presets: (mesh over n devices, zero1). Composition is a mesh with several axes, e.g. "data:2,expert:2,...".
STRATEGIES = {
    "dp": ("data:-1", False),
    "zero1": ("data:-1", True),
    "fsdp": ("fsdp:-1", False),
    "tp": ("tensor:-1", False),
    "ep": ("expert:-1", False),
}


def strategy(name: str) -> ParallelConfig:
  if name not in STRATEGIES:
    raise ShardingError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
  mesh, zero1 = STRATEGIES[name]
  return ParallelConfig(mesh=mesh, zero1=zero1)


# -- the plan ----------------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[ShardingPlan | None] = contextvars.ContextVar("zaya_sharding_plan", default=None)


def active_plan() -> ShardingPlan | None:
  """The plan the model is being traced under (set by `ShardingPlan.activate`), else None: the single-device path."""
  return _ACTIVE.get()


def constrain_gradients(grads):
  """Under an active ZeRO-1 plan, pins gradients (a tree shaped like the parameters) to the optimizer state's layout,
  split over `data` too: each data replica keeps, and sums into, only its slice (a reduce-scatter instead of an
  all-reduce; "ZeRO-2"), so no device holds a whole gradient accumulator. The identity otherwise."""
  plan = active_plan()
  if plan is None or not plan.zero1:
    return grads
  return jax.lax.with_sharding_constraint(grads, plan.shardings(grads, zero1=True))


def constrain(x, logical: tuple[str | None, ...]):
  """Pins an activation's layout under an active plan; the identity (no op emitted) otherwise. A mesh axis that
  custom rules give two of its names (say "heads" and "batch") splits the first dim only: a constraint is a layout
  hint, and those rules are legal for the parameters."""
  plan = active_plan()
  if plan is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(plan.mesh, plan.spec(logical, repeated_axes="drop")))


def _path_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A mesh, the rule table and the ZeRO-1 switch: gives the NamedSharding of every array of training."""

  mesh: Mesh
  rules: ShardingRules = ShardingRules()
  zero1: bool = False
  expert_exchange: str = "padded"

  @classmethod
  def from_config(cls, cfg: ParallelConfig, *, devices=None, rules: ShardingRules = ShardingRules()) -> ShardingPlan:
    return cls(make_mesh(cfg.mesh, cfg.dcn_mesh or None, devices=devices), rules, cfg.zero1, cfg.expert_exchange)

  def size(self, axis: str) -> int:
    return self.mesh.shape[axis]

  def describe(self) -> str:
    return format_mesh(dict(self.mesh.shape)) + (" + zero1" if self.zero1 else "")

  @contextlib.contextmanager
  def activate(self) -> Iterator[ShardingPlan]:
    """Trace the model under this plan: activation constraints and the shard_map MoE dispatch switch on."""
    token = _ACTIVE.set(self)
    try:
      yield self
    finally:
      _ACTIVE.reset(token)

  # -- specs -----------------------------------------------------------------------------------------------------
  def mesh_axes(self, name: str | None) -> tuple[str, ...]:
    """The mesh axes of a logical name, without axes of size 1 (they split nothing)."""
    return tuple(a for a in self.rules.mesh_axes(name) if self.size(a) > 1)

  def spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...] | None = None, what: str = "array",
           repeated_axes: str = "raise") -> P:
    """The PartitionSpec of logical names; with `shape`, checks that each split dimension divides evenly. A mesh
    axis that two dims' names map to raises, or with repeated_axes="drop" splits only the first of them."""
    entries, used = [], {}
    for dim, name in enumerate(logical):
      axes = self.mesh_axes(name)
      if repeated_axes == "drop":
        axes = tuple(a for a in axes if a not in used)
      for a in axes:
        if a in used:
          raise ShardingError(f"{what}: mesh axis {a!r} would split both dim {used[a]} and dim {dim} "
                              f"(logical {logical})")
        used[a] = dim
      if shape is not None and axes:
        parts = math.prod(self.size(a) for a in axes)
        if shape[dim] % parts:
          sizes = " x ".join(f"{a}={self.size(a)}" for a in axes)
          raise ShardingError(f"{what}: dim {dim} ({name!r}) has size {shape[dim]}, which mesh axes {sizes} "
                              f"({parts} parts) do not divide; shape {tuple(shape)}")
      entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)

  def check_heads(self, attention) -> None:
    """Raises ShardingError unless the "heads" and "kv" splits fall on head boundaries of `attention` (an
    AttentionConfig): a split inside a head is legal for XLA but moves activations at every norm and rotation."""
    for name, heads in (("heads", attention.num_heads), ("kv", attention.num_kv_heads)):
      axes = self.mesh_axes(name)
      parts = math.prod(self.size(a) for a in axes)
      if heads % parts:
        sizes = " x ".join(f"{a}={self.size(a)}" for a in axes)
        raise ShardingError(f"rule {name}={self.rules.mesh_axes(name)}: mesh axes {sizes} ({parts} parts) would cut "
                            f"inside the {heads} {'query' if name == 'heads' else 'kv'} heads; use a smaller tensor "
                            f"axis or another rule")

  @property
  def batch_axes(self) -> tuple[str, ...]:
    return self.mesh_axes("batch")

  def batch_spec(self, ndim: int = 2) -> P:
    return self.spec(("batch",) + (None,) * (ndim - 1))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def _var_spec(self, var: nnx.Variable, path: str) -> P:
    names = var.get_metadata().get("out_sharding")
    shape = var.get_value().shape
    if not names:
      return P()
    if len(names) != len(shape):
      raise ShardingError(f"{path}: logical axes {names} do not match its shape {tuple(shape)}")
    return self.spec(tuple(names), shape, path)

  def _zero1_spec(self, spec: P, shape: tuple[int, ...]) -> P:
    """`spec` with the data axis added to the largest dimension it divides (optimizer state only).

    A leaf no dimension of which divides stays replicated over data: such leaves are small (scalars, biases of
    odd sizes) and `plan.py` reports their bytes.
    """
    data = self.size("data")
    if data == 1:
      return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      current = () if entries[dim] is None else (entries[dim],) if isinstance(entries[dim], str) else entries[dim]
      parts = math.prod(self.size(a) for a in current) * data
      if shape[dim] % parts == 0:
        entries[dim] = ("data", *current) if current else "data"
        return P(*entries)
    return spec

  def shardings(self, tree, *, zero1: bool = False):
    """NamedShardings for a pytree of nnx Variables (named by their logical axes) and plain arrays (replicated).

    With `zero1` (optimizer states), Variables also split over `data` where the plan says so.
    """
    def one(path, leaf):
      if isinstance(leaf, nnx.Variable):
        if not hasattr(leaf.get_value(), "shape"):
          return leaf  # e.g. optax's MaskedNode for parameters another optimizer branch owns: no array
        shape = leaf.get_value().shape
        if zero1 and len(leaf.get_metadata().get("out_sharding") or ()) != len(shape):
          return leaf.replace(NamedSharding(self.mesh, P()))  # a state shaped unlike its parameter (factored)
        spec = self._var_spec(leaf, _path_name(path))
        if zero1 and self.zero1:
          spec = self._zero1_spec(spec, shape)
        return leaf.replace(NamedSharding(self.mesh, spec))
      return self.replicated()
    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def state_shardings(self, state):
    """Shardings of a TrainState (concrete or abstract): parameters by their names, the optimizer state like the
    parameters (plus `data` under ZeRO-1), the rest (step, balancing biases, controller state, key) replicated."""
    return state._replace(
        step=self.replicated(), params=self.shardings(state.params), biases=self.shardings(state.biases),
        opt_state=self.shardings(state.opt_state, zero1=True), pid=jax.tree.map(lambda _: self.replicated(),
                                                                                 state.pid),
        key=self.replicated())

  def check_batch(self, global_batch_size: int, grad_accum: int = 1) -> None:
    """The batch (and each micro-batch) must split evenly over the batch axes and the processes."""
    parts = math.prod(self.size(a) for a in self.batch_axes)
    sizes = " x ".join(f"{a}={self.size(a)}" for a in self.batch_axes) or "none"
    if global_batch_size % grad_accum:
      raise ShardingError(f"batch size {global_batch_size} is not a multiple of grad_accum={grad_accum}")
    if global_batch_size % (parts * grad_accum):
      what = (f"batch size {global_batch_size} does" if grad_accum == 1 else
              f"micro-batches of {global_batch_size // grad_accum} sequences (batch size {global_batch_size} / "
              f"grad_accum {grad_accum}) do")
      raise ShardingError(f"{what} not split over the batch axes {sizes} ({parts} parts)")
    if global_batch_size % jax.process_count():
      raise ShardingError(f"batch size {global_batch_size} does not split over {jax.process_count()} processes")


# -- accounting --------------------------------------------------------------------------------------------------


def device_bytes(tree, device=None) -> int:
  """Bytes that one device holds of a pytree: concrete arrays by their shards on `device` (default: the first
  addressable one), ShapeDtypeStructs by their sharding's shard shape."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      device = device or leaf.addressable_shards[0].device
      total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    elif hasattr(leaf, "shape") and getattr(leaf, "sharding", None) is not None:
      total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    elif hasattr(leaf, "shape"):
      total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  return total


def total_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def with_shardings(abstract, shardings) -> Any:
  """ShapeDtypeStructs carrying shardings: a restore target, or the input of a compile without allocation."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
