"""Dry-run memory planner: per-device bytes of a training setup on a mesh, and whether it fits. Allocates nothing.

  python launch/plan.py --config=zaya1_8b --mesh=data:8 --zero1                      # one MI300X node
  python launch/plan.py --config=zaya1_8b --mesh=data:8 --dcn_mesh=data:16 --zero1   # 16 nodes x 8
  python launch/plan.py --config=tiny --mesh=fsdp:2,expert:2,tensor:2 --batch=8 --seq_len=128

Parameters and optimizer state come from `jax.eval_shape` of the train state and the plan's shardings (exact). The
step's temporaries (the gradients, their accumulator over micro-batches, the optimizer update, activations) come from
XLA's memory analysis of the compiled sharded train step, micro-batch loop included, compiled on fake CPU devices (one
per mesh position); to keep the compile short, it compiles N/2 and N layers (N = `--compile_layers`, 4 by default)
and extrapolates from N to the model's depth by the growth per layer between the two (`--compile_layers=0` skips it
and estimates the gradients and their accumulator alone). The growth is measured away from the first layer because
it is smaller there: ZAYA1-8B on data:8, 4,096 tokens per device, grew 1.52 GiB from 1 to 2 layers and 1.96 GiB a
layer from 2 to 4 and from 4 to 8 (session 21, one micro-batch).
The model's "auto" backends resolve as on the `--target` device: on a GPU (the default) the Pallas attention and
grouped-matmul kernels, whose programs the CPU compile runs in interpret mode (block by block, with the kernels'
outputs and saved residuals: no [T, T] scores). The step compiles as training compiles it, so XLA:CPU keeps
`model.remat`'s recomputation apart from the forward pass, as GPU compilers do (`train.step.step_compiler_options`).
The CPU compiler is still not the GPU one (fusion and scheduling differ), so that figure is an estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "zaya1_8b", "Registered experiment config.")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides, as in launch/train.py.")
# As in launch/train.py: --mesh, --dcn_mesh and --zero1 are shorthands for --set=parallel.*=...
_MESH = flags.DEFINE_string("mesh", None, "Per-node mesh, e.g. data:2,fsdp:2,expert:2,tensor:1 (default: the "
                            "config's parallel.mesh, else data:8, one MI300X node).")
_DCN = flags.DEFINE_string("dcn_mesh", None, "Across nodes, e.g. data:16 (each axis is mesh x dcn_mesh).")
_ZERO1 = flags.DEFINE_bool("zero1", None, "Split the optimizer state over the data axis (ZeRO-1).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch in sequences (default: the config's).", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the config's).", lower_bound=1)
_ACCUM = flags.DEFINE_integer("grad_accum", None, "Micro-batches per step (default: the config's step.grad_accum when "
                              "it is set, by --set or in the config; else 1 sequence per device).", lower_bound=1)
_MEMORY = flags.DEFINE_float("device_memory_gb", 205.82, "Memory per device in GB of 1e9 bytes (MI300X: its \"192 GB\" "
                              "of HBM3 are 205.82e9 bytes, 191.7 GiB, as rocm-smi reports).", lower_bound=0.001)
_TARGET = flags.DEFINE_enum("target", "gpu", ["gpu", "cpu"], "The device whose choice the model's \"auto\" backends "
                            "take: gpu (Pallas kernels, run in interpret mode here) or cpu (XLA attention, tiled "
                            "experts).")
_LAYERS = flags.DEFINE_integer("compile_layers", 4, "Compile N/2 and N (at least 2) layers to measure the "
                               "temporaries' growth per layer (0: skip).", lower_bound=0)

GiB = 2**30


def _size(n: float) -> str:
  return f"{n / GiB:9.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:9.2f} MiB"


def _mesh_sizes(mesh: str, dcn: str) -> dict[str, int]:
  from zaya_jax.sharding import MESH_AXES, parse_mesh

  ici, across = parse_mesh(mesh), parse_mesh(dcn)
  if -1 in ici.values() or -1 in across.values():
    raise ValueError("the planner needs explicit axis sizes (no -1)")
  return {a: ici[a] * across[a] for a in MESH_AXES}


def _assigns(assignments, field: str) -> bool:
  """Whether one of the `dotted.field=value` overrides sets `field`."""
  return any(a.partition("=")[0].strip() == field for a in assignments)


def plan(argv) -> int:
  del argv
  from zaya_jax.train.experiment import get_experiment, override

  base = get_experiment(_CONFIG.value)
  assignments = list(_SET.value)
  for field, value in (("mesh", _MESH.value), ("dcn_mesh", _DCN.value), ("zero1", _ZERO1.value)):
    if value is not None:
      assignments.append(f"parallel.{field}={value!r}")
  if not (base.parallel.mesh or _assigns(assignments, "parallel.mesh")):
    # The planner's default, one MI300X node; first, since a dcn_mesh is refused without a mesh.
    assignments.insert(0, "parallel.mesh='data:8'")
  cfg = override(base, assignments)
  mesh = cfg.parallel.mesh
  sizes = _mesh_sizes(mesh, cfg.parallel.dcn_mesh)
  devices = math.prod(sizes.values())
  # LLVM's optimisations change the machine code, not XLA's buffer assignment: skip them, the compile is 3x faster.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true")
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)  # fake devices, one per mesh position: nothing is allocated

  from zaya_jax.ops import attention, gmm
  from zaya_jax.sharding import ShardingPlan, device_bytes, format_mesh, make_mesh, total_bytes, with_shardings
  from zaya_jax.train import sharded
  from zaya_jax.train import step as step_lib

  # The programs the target runs: what "auto" picks there (parameters and shardings do not depend on it).
  cfg = dataclasses.replace(cfg, model=cfg.model.replace(
      attention=dict(backend=attention.resolve_backend(cfg.model.attention.backend, _TARGET.value)),
      moe=dict(backend=gmm.resolve_backend(cfg.model.moe.backend, _TARGET.value))))

  batch = cfg.data.batch_size if _BATCH.value is None else _BATCH.value
  seq = cfg.data.seq_len if _SEQ.value is None else _SEQ.value
  # The plan train.py builds from the same settings (ShardingPlan.from_config), on this many fake devices.
  sharding_plan = ShardingPlan(make_mesh(sizes), zero1=cfg.parallel.zero1,
                               expert_exchange=cfg.parallel.expert_exchange)
  parts = math.prod(sharding_plan.size(a) for a in sharding_plan.batch_axes)
  configured = cfg.step.grad_accum
  chosen = _assigns(_SET.value, "step.grad_accum") or configured != 1
  if _ACCUM.value is None and not chosen:
    sharding_plan.check_batch(batch)  # before a grad_accum is derived from it: the batch itself must split
  accum = _ACCUM.value if _ACCUM.value is not None else (configured if chosen else max(1, batch // parts))
  sharding_plan.check_heads(cfg.model.attention)
  micro_per_device = batch // (parts * accum)

  _, abstract = step_lib.create_abstract(cfg.model, cfg.optimizer, cfg.step, cfg.balancing, cfg.loop.steps, 0)
  sharded.validate(sharding_plan, abstract, batch, accum)  # as train.py checks a run before it starts
  state = with_shardings(abstract, sharding_plan.state_shardings(abstract))
  params = device_bytes(state.params)
  opt = device_bytes(state.opt_state)
  # One micro-batch's gradients are laid out like the parameters; accumulating over micro-batches holds one more
  # copy across the micro-batch loop, split over `data` under ZeRO-1 (sharding.constrain_gradients). Both are
  # temporaries of the compiled step, which runs the micro-batch loop: these estimates stand in for them only when
  # nothing is compiled.
  grads = params
  accumulator = 0 if accum == 1 else device_bytes(with_shardings(
      abstract.params, sharding_plan.shardings(abstract.params, zero1=True)))
  other = device_bytes((state.biases, state.pid, state.step, state.key))

  count = sum(x.size for x in jax.tree.leaves(abstract.params))
  print(f"config {_CONFIG.value}: {count:,} parameters ({total_bytes(abstract.params) / GiB:.2f} GiB) "
        f"({cfg.model.param_dtype} masters, {cfg.model.dtype} compute), optimizer {cfg.optimizer.name}")
  print(f"mesh {format_mesh(sizes)} = {devices} devices (per node {mesh}"
        f"{', across nodes ' + cfg.parallel.dcn_mesh if cfg.parallel.dcn_mesh else ''})"
        f"{', ZeRO-1' if cfg.parallel.zero1 else ''}")
  print(f"batch {batch} x {seq} tokens, grad_accum {accum}: {micro_per_device} sequence(s) per device per micro-batch")
  print(f"backends: attention {cfg.model.attention.backend}, experts {cfg.model.moe.backend} (for a {_TARGET.value}"
        f"{'; the Pallas kernels run in interpret mode in this compile' if _TARGET.value == 'gpu' else ''})")
  if accum != configured:  # launch/train.py runs the config's value: say how to run what is planned here
    print(f"note: the config trains with grad_accum {configured}; launch with --set=step.grad_accum={accum} to "
          "train as planned")

  activations = None
  if _LAYERS.value > 0:
    temps = []
    # Two depths, so the per-layer growth is measured (one would count a single layer's temporaries for all).
    deepest = min(max(_LAYERS.value, 2), cfg.model.num_layers)
    depths = sorted({max(deepest // 2, 1), deepest})
    for layers in depths:
      model_cfg = cfg.model.replace(num_layers=layers, layer_types=cfg.model.layer_types[:layers])
      small = dataclasses.replace(cfg, model=model_cfg)
      step_cfg = dataclasses.replace(small.step, grad_accum=accum)  # the micro-batch loop and its accumulator too
      tr, ab = step_lib.create_abstract(small.model, small.optimizer, step_cfg, small.balancing, small.loop.steps, 0)
      st = with_shardings(ab, sharding_plan.state_shardings(ab))
      global_rows = micro_per_device * parts * accum
      spec = jax.ShapeDtypeStruct((global_rows, seq), jax.numpy.int32, sharding=sharded.batch_sharding(sharding_plan))
      b = {k: spec for k in step_lib.BATCH_KEYS}
      compiled = sharded.jit_sharded_train_step(sharding_plan, tr, st).lower(st, b).compile()
      stats = compiled.memory_analysis()
      temps.append(stats.temp_size_in_bytes)
      print(f"  compiled {layers} layer(s): temporaries {_size(stats.temp_size_in_bytes).strip()} per device")
    per_layer = (temps[-1] - temps[0]) / max(depths[-1] - depths[0], 1)
    activations = temps[-1] + per_layer * (cfg.model.num_layers - depths[-1])

  rows = [("parameters", params), ("optimizer state", opt), ("balancing/controller", other)]
  if activations is None:
    rows += [("gradient accumulator (not compiled: --compile_layers=0)", accumulator),
             ("gradients (activations not compiled: --compile_layers=0)", grads)]
  else:
    rows.append((f"step temporaries of {cfg.model.num_layers} layers, accumulator included", activations))
  total = sum(v for _, v in rows)
  budget = _MEMORY.value * 1e9
  for name, value in rows:
    print(f"  {name:<58} {_size(value)}")
  fits = total <= 0.9 * budget
  print(f"  {'total per device':<58} {_size(total)} of {budget / GiB:.1f} GiB "
        f"({100 * total / budget:.0f}%): {'FITS' if fits else 'DOES NOT FIT'} (with 10% headroom"
        + (", activations not counted)" if activations is None else ")"))
  levers = [flag for flag, unused in (("--set=model.remat=full (or dots)", cfg.model.remat == "none"),
                                      ("--set=step.logits_chunk=1024", cfg.step.logits_chunk == 0),
                                      ("--zero1", not cfg.parallel.zero1)) if unused]
  if not fits and levers:
    print(f"memory settings this plan leaves off (README, \"Train on a mesh, and on many hosts\"): {', '.join(levers)}")
  return 0


def main(argv) -> int:
  from zaya_jax.sharding import ShardingError

  try:
    return plan(argv)
  except (ValueError, ShardingError) as e:  # a mesh, batch or override that cannot work: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
