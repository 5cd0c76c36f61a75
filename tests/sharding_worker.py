"""Multi-device checks for tests/test_sharding.py, in their own process (the device count is fixed at JAX start-up).

  python tests/sharding_worker.py strategies OUT.json          # 8 CPU devices: every strategy vs one device
  python tests/sharding_worker.py train RANK WORKDIR PORT       # one of two processes with 4 CPU devices each
  python tests/sharding_worker.py restore WORKDIR OUT.json      # 8 devices: restore the two-process checkpoint

Writes its findings as JSON; the assertions live in the test. The tiny model has 8 experts so that every axis of an
8-device mesh divides it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import time

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("4" if MODE == "train" else "8"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from model_draws import with_key_temperatures  # noqa: E402  (tests/, this script's folder)

from zaya_jax.config import AttentionConfig, MoEConfig, ZayaConfig  # noqa: E402
from zaya_jax.model.decoder import ZayaForCausalLM  # noqa: E402
from zaya_jax.sharding import (  # noqa: E402
  ParallelConfig,
  ShardingError,
  ShardingPlan,
  ShardingRules,
  device_bytes,
  parse_mesh,
  total_bytes,
)
from zaya_jax.train import sharded  # noqa: E402
from zaya_jax.train import step as step_lib  # noqa: E402
from zaya_jax.train.balancing import BalancingConfig  # noqa: E402
from zaya_jax.train.optim import OptimizerConfig  # noqa: E402

CFG = ZayaConfig.tiny(vocab_size=512, attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
                      moe=MoEConfig(num_experts=8, intermediate_size=48, router_hidden_size=16))
B, T = 8, 16
STRATEGIES = {  # name -> (mesh, zero1)
    "dp": ("data:8", False),  # placed only: its step is zero1's with the optimizer state whole (saves a compile)
    "zero1": ("data:8", True),
    "fsdp": ("fsdp:8", False),
    "tp": ("tensor:8", False),
    "ep": ("expert:8", False),
    "data2_expert2_tensor2_zero1": ("data:2,expert:2,tensor:2", True),
}


def capture_grads() -> optax.GradientTransformation:
  """Keeps the step's raw gradients in the optimizer state, so one compiled step yields both."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def make_trainer(steps: int = 10):
  model = with_key_temperatures(ZayaForCausalLM(CFG, rngs=nnx.Rngs(0)), seed=0)
  trainer, _ = step_lib.create(model, OptimizerConfig(lr=1e-3, warmup_steps=0), step_lib.StepConfig(),
                               BalancingConfig(kp=1e-2), steps, seed=0)
  trainer = trainer.__class__(**{**trainer.__dict__, "optimizer": optax.chain(capture_grads(), trainer.optimizer)})
  _, params, biases = step_lib.split_model(model)
  return trainer, step_lib.init_state(trainer, params, biases, 0)


def make_batch(seed: int, rows: int = B) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, CFG.vocab_size, (rows, T), dtype=np.int32)
  seg = np.ones((rows, T), np.int32)
  seg[:, T // 2:] = 2  # two packed documents per row
  seg[0, -3:] = 0  # and some padding
  mask = (seg > 0).astype(np.int32)
  return dict(input_ids=ids, segment_ids=seg, targets=np.roll(ids, -1, axis=1), loss_mask=mask)


def flat(tree) -> dict[str, np.ndarray]:
  return {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
          for k, v in nnx.to_flat_state(tree)}


def rel_err(a: dict, b: dict) -> float:
  return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in b)


def strategies(out_path: str) -> None:
  results = {"devices": jax.device_count()}
  trainer, state0 = make_trainer()
  batch = make_batch(0)
  host0 = jax.device_get(state0)
  t0 = time.time()
  ref_state, ref_metrics = step_lib.jit_train_step(trainer, jax.tree.map(jnp.asarray, host0),
                                                   {k: jnp.asarray(v) for k, v in batch.items()})
  ref_grads, ref_params = flat(ref_state.opt_state[0]), flat(ref_state.params)
  results["single_device_s"] = time.time() - t0
  inner = lambda opt_state: opt_state[1]  # the real optimizer's state, without the captured grads
  results["params_total"] = total_bytes(host0.params)
  results["opt_total"] = total_bytes(inner(host0.opt_state))
  results["expert_bytes"] = sum(v.nbytes for k, v in flat(host0.params).items() if ".experts." in k)
  only = os.environ.get("ZAYA_STRATEGIES")
  for name, (mesh, zero1) in STRATEGIES.items():
    if only is not None and name not in only.split(","):
      continue
    t0 = time.time()
    plan = ShardingPlan.from_config(ParallelConfig(mesh=mesh, zero1=zero1))
    state = sharded.place(plan, host0)
    if name == "dp":
      results[name] = dict(mesh=plan.describe(), params_device=device_bytes(state.params),
                           opt_device=device_bytes(inner(state.opt_state)))
      continue
    train = sharded.jit_sharded_train_step(plan, trainer, state)
    # Values cannot show whether the plan was active while tracing: its activation constraints and the experts'
    # all-to-all dispatch are read from the program.
    program = train.lower(state, sharded.global_batch(plan, batch)).as_text()
    new_state, metrics = train(state, sharded.global_batch(plan, batch))
    grads, params = flat(new_state.opt_state[0]), flat(new_state.params)
    results[name] = dict(
        mesh=plan.describe(), seconds=time.time() - t0,
        loss=float(metrics["loss"]), ref_loss=float(ref_metrics["loss"]),
        grad_norm=float(metrics["grad_norm"]), ref_grad_norm=float(ref_metrics["grad_norm"]),
        grad_rel_err=rel_err(grads, ref_grads), param_rel_err=rel_err(params, ref_params),
        counts_equal=bool(np.array_equal(metrics["expert_load"], ref_metrics["expert_load"])),
        params_device=device_bytes(new_state.params), opt_device=device_bytes(inner(new_state.opt_state)),
        param_sharded_leaves=sum(len(s.sharding.device_set) > 1 and not s.sharding.is_fully_replicated
                                 for s in jax.tree.leaves(new_state.params)),
        all_to_all=program.count("all_to_all"),
        constraints=program.count("sharding_constraint") + program.count("@Sharding"))
    print(name, results[name], flush=True)
  results["zero1_accumulator"] = zero1_accumulator(trainer, host0)
  if not os.environ.get("ZAYA_SKIP_DISPATCH"):
    results["dispatch"] = dispatch_checks()
    results["attention_tp"] = {mesh: attention_tp_checks(mesh) for mesh in ("data:4", "data:4,tensor:2")}
    # Custom rules may give the heads an axis that also splits the batch: legal for the parameters, so the
    # activations' constraints must not refuse it.
    results["attention_heads_on_a_batch_axis"] = attention_tp_checks(
        "data:4,expert:2", batch=16, rules=ShardingRules(heads=("expert",)))
    results["ragged"] = ragged_checks()
    results["errors"] = error_checks()
    mesh, zero1 = STRATEGIES["data2_expert2_tensor2_zero1"]
    results["init_from"] = init_from_checks(ParallelConfig(mesh=mesh, zero1=zero1))
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


def zero1_accumulator(trainer, host0) -> dict:
  """The f32 bytes per device that the micro-batch loop carries (grad_accum 2, compiled on data:8, not run), with
  and without ZeRO-1: the summed gradients, and loop invariants such as the parameters and the loss's statistics."""
  trainer = dataclasses.replace(trainer, step_config=dataclasses.replace(trainer.step_config, grad_accum=2))
  carried = {}
  for zero1 in (False, True):
    plan = ShardingPlan.from_config(ParallelConfig(mesh="data:8", zero1=zero1))
    state = sharded.place(plan, host0)
    batch = sharded.global_batch(plan, make_batch(0, rows=2 * B))
    hlo = sharded.jit_sharded_train_step(plan, trainer, state).lower(state, batch).compile().as_text()
    loop = next(line for line in hlo.splitlines() if " while(" in line and 'op_name="jit(step)/while"' in line)
    carried["zero1" if zero1 else "dp"] = sum(math.prod(int(d) for d in dims.split(",") if d) * 4
                                              for dims in re.findall(r"f32\[([\d,]*)\]", loop.split(" while(")[0]))
  return dict(carried_f32_bytes=carried, params_bytes=total_bytes(host0.params))


def dispatch_checks() -> dict:
  """The padded all-to-all dispatch against the single-device experts, dropless and with a capacity."""
  from zaya_jax.model.moe import Experts
  from zaya_jax.parallel.expert import capacity, dispatch_combine

  X, D, M = 8, 16, 256
  experts = Experts(MoEConfig(num_experts=X, intermediate_size=8, router_hidden_size=4), D, std=0.3,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  # Skewed routing: most tokens of every shard want expert 5 (owned by one device), some skip (class X).
  choice = np.where(rng.random(M) < 0.6, 5, rng.integers(0, X + 1, M)).astype(np.int32)
  weight = jnp.asarray(rng.random(M), jnp.float32)
  ref = np.asarray(experts(h, jnp.asarray(choice), weight))
  out = {}
  # Expert-only and expert x tensor; data x expert dispatch runs inside the combined strategy's train step.
  for mesh in ("expert:8", "expert:4,tensor:2"):
    plan = ShardingPlan.from_config(ParallelConfig(mesh=mesh))
    fn = jax.jit(lambda h, c, w, p=plan: dispatch_combine(p, h, c, w, experts.gate_up_proj[...],
                                                          experts.down_proj[...]))
    y, dropped = fn(h, jnp.asarray(choice), weight)
    out[mesh] = dict(max_abs_err=float(np.abs(np.asarray(y) - ref).max()), dropped=int(dropped),
                     zero_rows_where_routed=int(((np.abs(np.asarray(y)).sum(1) == 0) & (choice < X)).sum()))
    # With a capacity: count the expected drops on the host, per shard and destination in token order.
    e = plan.size("expert")
    shards = plan.size("data") * e
    local = M // shards
    cap = capacity(local, e, 1.0)
    y_cap, dropped_cap = jax.jit(lambda h, c, w, p=plan: dispatch_combine(
        p, h, c, w, experts.gate_up_proj[...], experts.down_proj[...], capacity_factor=1.0))(h, jnp.asarray(choice),
                                                                                            weight)
    expected, kept = 0, np.zeros(M, bool)
    for s in range(shards):
      seen = np.zeros(e, int)
      for m in range(s * local, (s + 1) * local):
        if choice[m] < X:
          dest = choice[m] // (X // e)
          if seen[dest] < cap:
            kept[m] = True
          else:
            expected += 1
          seen[dest] += 1
    y_cap = np.asarray(y_cap)
    out[mesh].update(capacity=cap, dropped_with_capacity=int(dropped_cap), expected_dropped=expected,
                     kept_max_abs_err=float(np.abs(y_cap[kept] - ref[kept]).max()),
                     dropped_rows_zero=bool((y_cap[~kept] == 0).all()))
  # remat "dots" keeps the experts' grouped matmuls on a mesh too: the names ops.gmm gives its outputs inside the
  # dispatch's shard_map reach the policy, which keeps them as extra outputs of the shard_map.
  from zaya_jax.model.decoder import _REMAT_SAVES

  plan = ShardingPlan.from_config(ParallelConfig(mesh="expert:8"))

  def kept_from_shard_map(policy) -> int:
    def loss(h):
      y = dispatch_combine(plan, h, jnp.asarray(choice), weight, experts.gate_up_proj[...], experts.down_proj[...])[0]
      return jnp.sin(y).sum()
    loss = jax.checkpoint(loss, policy=policy)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      jax.ad_checkpoint.print_saved_residuals(loss, h)
    return printed.getvalue().count("output of shard_map")
  out["remat_kept_from_dispatch"] = dict(
      dots=kept_from_shard_map(_REMAT_SAVES["dots"]),
      dot_policy_alone=kept_from_shard_map(jax.checkpoint_policies.dots_with_no_batch_dims_saveable))
  # Tensor parallelism with the weights split as the parameters declare them: nothing but the output's sum moves.
  plan = ShardingPlan.from_config(ParallelConfig(mesh="tensor:8"))
  weights = [jax.device_put(w[...], NamedSharding(plan.mesh, plan.spec(w.get_metadata()["out_sharding"], w.shape)))
             for w in (experts.gate_up_proj, experts.down_proj)]
  fn = jax.jit(lambda h, c, w, gu, dn, p=plan: dispatch_combine(p, h, c, w, gu, dn))
  hlo = fn.lower(h, jnp.asarray(choice), weight, *weights).compile().as_text()
  y = np.asarray(fn(h, jnp.asarray(choice), weight, *weights)[0])
  out["tensor:8"] = dict(max_abs_err=float(np.abs(y - ref).max()), all_to_all=hlo.count("all-to-all("),
                         all_gather=hlo.count("all-gather("))
  # Rules decide the dispatch's axes: experts and their width replicated on an expert x tensor mesh, every device
  # runs all experts on its own tokens (no exchange); an expert axis that does not split the batch is refused.
  plan = ShardingPlan.from_config(ParallelConfig(mesh="expert:4,tensor:2"), rules=ShardingRules(experts=(), mlp=()))
  fn = jax.jit(lambda h, c, w, p=plan: dispatch_combine(p, h, c, w, experts.gate_up_proj[...],
                                                        experts.down_proj[...], capacity_factor=1.0))
  hlo = fn.lower(h, jnp.asarray(choice), weight).compile().as_text()
  y, dropped = fn(h, jnp.asarray(choice), weight)
  out["replicated_experts"] = dict(max_abs_err=float(np.abs(np.asarray(y) - ref).max()), dropped=int(dropped),
                                   all_to_all=hlo.count("all-to-all("))
  plan = ShardingPlan.from_config(ParallelConfig(mesh="data:4,expert:2"), rules=ShardingRules(batch=("data",)))
  try:
    dispatch_combine(plan, h, jnp.asarray(choice), weight, experts.gate_up_proj[...], experts.down_proj[...])
    out["expert_axis_outside_batch"] = "accepted"
  except ShardingError as e:
    out["expert_axis_outside_batch"] = str(e)
  # The width split over an axis that also splits the batch: the partial sums would mix tokens (it gave errors of
  # ~3 before it was refused); refused by `dispatch_axes`, which `sharded.validate` runs before any compile.
  plan = ShardingPlan.from_config(ParallelConfig(mesh="expert:4,tensor:2"),
                                  rules=ShardingRules(batch=("data", "fsdp", "expert", "tensor")))
  try:
    dispatch_combine(plan, h, jnp.asarray(choice), weight, experts.gate_up_proj[...], experts.down_proj[...])
    out["width_axis_inside_batch"] = "accepted"
  except ShardingError as e:
    out["width_axis_inside_batch"] = str(e)
  return out


def attention_tp_checks(mesh: str, batch: int = 12, seq: int = 24, rules: ShardingRules | None = None) -> dict:
  """One CCA layer's value and gradients on `mesh` (over its number of devices) against one device, and the
  collectives of its compiled forward + backward as (kind, [result dims, ...]). `batch` and `seq` are sizes no
  weight has, so a shape that holds them is an activation's (`seq`) or the whole batch's (`batch`)."""
  from experiments.tp_collectives import collectives
  from zaya_jax.model.cca import CCAttention

  layer = with_key_temperatures(CCAttention(CFG.attention, CFG.hidden_size, "hybrid", std=0.3,
                                            param_dtype=jnp.float32, rngs=nnx.Rngs(2)), seed=1)
  graphdef, params = nnx.split(layer)
  h = jnp.asarray(np.random.default_rng(3).normal(size=(batch, seq, CFG.hidden_size)), jnp.float32)
  segment_ids = jnp.asarray(np.repeat([[1] * (seq // 2) + [2] * (seq - seq // 2)], batch, 0), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
  sizes = parse_mesh(mesh)
  plan = ShardingPlan.from_config(ParallelConfig(mesh=mesh), devices=jax.devices()[:math.prod(sizes.values())],
                                  rules=rules or ShardingRules())

  def loss(p, h, plan=None):
    def run():
      return nnx.merge(graphdef, p)(h, segment_ids, positions)
    if plan is None:
      out = run()
    else:
      with plan.activate():
        out = run()
    return jnp.sum(out * jnp.cos(out)), out

  # The outputs compared, not the scalar: its terms cancel, so its relative error says little.
  (_, ref_out), ref_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, h)
  placed = jax.device_put(params, plan.shardings(params))
  h_placed = jax.device_put(h, NamedSharding(plan.mesh, plan.spec(("batch", None, None))))
  fn = jax.jit(jax.value_and_grad(lambda p, h: loss(p, h, plan), argnums=(0, 1), has_aux=True))
  (_, out), grads = fn(placed, h_placed)
  found = collectives(fn.lower(placed, h_placed).compile().as_text())
  return dict(mesh=mesh, batch=batch, seq=seq,
              out_rel_err=rel_err({"out": np.asarray(out)}, {"out": np.asarray(ref_out)}),
              grad_rel_err=rel_err({"h": np.asarray(grads[1]), **flat(grads[0])},
                                   {"h": np.asarray(ref_grads[1]), **flat(ref_grads[0])}),
              collectives=[(kind, [dims for _, dims in arrays]) for kind, arrays in found])


def ragged_checks() -> dict:
  """The ragged exchange (CPU: its all-gather emulation) against the padded one, values and gradients; and the real
  `ragged_all_to_all` as the GPU programs contain it (lowered for cuda and rocm from here, values and gradients)."""
  from zaya_jax.parallel import expert

  X, D, M = 8, 16, 256
  rng = np.random.default_rng(3)
  h = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  choice = jnp.asarray(np.where(rng.random(M) < 0.6, 2, rng.integers(0, X + 1, M)).astype(np.int32))
  weight = jnp.asarray(rng.random(M), jnp.float32)
  gate_up = jnp.asarray(rng.normal(size=(X, 16, D)) * 0.3, jnp.float32)
  down = jnp.asarray(rng.normal(size=(X, D, 8)) * 0.3, jnp.float32)

  def loss(plan, exchange):
    return lambda h, gu, dn: jnp.sum(jnp.sin(expert.dispatch_combine(plan, h, choice, weight, gu, dn,
                                                                     exchange=exchange)[0]))

  out = {}
  for mesh in ("expert:8", "data:2,expert:2,tensor:2"):
    plan = ShardingPlan.from_config(ParallelConfig(mesh=mesh))
    runs = {ex: jax.jit(jax.value_and_grad(loss(plan, ex), argnums=(0, 1, 2)))(h, gate_up, down)
            for ex in ("padded", "ragged")}
    (v_pad, g_pad), (v_rag, g_rag) = runs["padded"], runs["ragged"]
    out[mesh] = dict(value_diff=float(abs(v_pad - v_rag)), value=float(v_pad),
                     grad_max_diff=max(float(jnp.abs(a - b).max()) for a, b in zip(g_pad, g_rag)))
  plan = ShardingPlan.from_config(ParallelConfig(mesh="expert:8"))
  real = expert.jax.default_backend
  expert.jax.default_backend = lambda: "gpu"  # pick the real op (and "auto" -> ragged) while lowering
  try:
    for platform in ("cuda", "rocm"):
      text = jax.jit(jax.value_and_grad(loss(plan, "auto"), argnums=(0, 1, 2))).trace(h, gate_up, down).lower(
          lowering_platforms=(platform,)).as_text()
      out[f"ops_{platform}"] = text.count("ragged_all_to_all")
  finally:
    expert.jax.default_backend = real
  return out


def error_checks() -> dict:
  from zaya_jax.sharding import ShardingError

  out = {}
  bad_cfg = CFG.replace(vocab_size=500)  # 500 rows do not split over tensor=8
  model = ZayaForCausalLM(bad_cfg, rngs=nnx.Rngs(0))
  _, state = step_lib.create(model, OptimizerConfig(), step_lib.StepConfig(), BalancingConfig(), 10, 0)
  plan = ShardingPlan.from_config(ParallelConfig(mesh="tensor:8"))
  for name, fn in (("vocab", lambda: sharded.validate(plan, state)),
                   ("batch", lambda: sharded.validate(ShardingPlan.from_config(ParallelConfig(mesh="data:8")),
                                                      make_trainer()[1], 12)),
                   ("micro_batch", lambda: sharded.validate(ShardingPlan.from_config(ParallelConfig(mesh="data:8")),
                                                            make_trainer()[1], 8, grad_accum=2)),
                   ("mesh", lambda: ShardingPlan.from_config(ParallelConfig(mesh="data:3")))):
    try:
      fn()
      out[name] = None
    except ShardingError as e:
      out[name] = str(e)
  return out


def init_from_checks(parallel: ParallelConfig, process_tag: str = "") -> dict:
  """A Hugging Face folder loaded straight onto a mesh (`create_from_hf`): every array is the saved model's and sits
  where the plan puts a freshly initialised state's. Each process writes (and reads) its own copy of the folder."""
  import tempfile

  from zaya_jax.checkpoint.hf import save_hf

  model = ZayaForCausalLM(CFG, rngs=nnx.Rngs(7))
  folder = os.path.join(tempfile.mkdtemp(prefix=f"init_from{process_tag}-"), "hf")
  save_hf(model, folder)
  plan = ShardingPlan.from_config(parallel)
  args = (OptimizerConfig(), step_lib.StepConfig(), BalancingConfig(), 10, 0)
  _, state = step_lib.create_from_hf(folder, CFG, *args, state_shardings=plan.state_shardings)
  _, fresh = step_lib.create_abstract(CFG, *args)
  want = plan.state_shardings(fresh)
  saved = flat(nnx.state(model))
  loaded = {**dict(_named(state.params)), **dict(_named(state.biases))}
  # Each process compares the shards its devices hold with the same slices of the saved arrays.
  shards_equal = set(loaded) == set(saved) and all(
      np.array_equal(np.asarray(shard.data), saved[k][shard.index])
      for k, array in loaded.items() for shard in array.addressable_shards)
  placed = all(leaf.sharding == s for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(want)))
  return {"shards_equal": bool(shards_equal), "placed_as_planned": bool(placed), "step": int(state.step),
          "sharded_params": sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(state.params)),
          "mesh": plan.describe()}


def _named(tree):
  return ((".".join(map(str, k)), v.get_value()) for k, v in nnx.to_flat_state(tree))


# What the two processes train on (4 devices each): data spans the processes through --dcn_mesh, the hybrid-mesh
# path of a multi-node launch (each process is a granule), expert and tensor inside each.
TWO_PROCESS_MESH = ("expert:2,tensor:2", "data:2", True)
# Where the single process restores it: a strategy of `strategies`, whose compiled step the session's persistent
# compilation cache (tests/conftest.py) already holds.
RESTORE_MESH = STRATEGIES["fsdp"]
STEPS = 3


def train_two_process(rank: int, workdir: str, port: int) -> None:
  """One of two processes: train STEPS steps on the shared mesh, save with Orbax, take one more step's loss."""
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  from zaya_jax.parallel.distributed import DistributedConfig, initialize

  initialize(DistributedConfig(f"localhost:{port}", 2, rank, initialization_timeout=60))
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  trainer, host0 = make_trainer()
  mesh, dcn_mesh, zero1 = TWO_PROCESS_MESH
  plan = ShardingPlan.from_config(ParallelConfig(mesh=mesh, dcn_mesh=dcn_mesh, zero1=zero1))
  state = sharded.place(plan, host0)
  train = sharded.jit_sharded_train_step(plan, trainer, state)
  rows = B // 2
  losses = []
  for step in range(STEPS + 1):
    local = {k: v[rank * rows:(rank + 1) * rows] for k, v in make_batch(step).items()}  # this host's rows only
    if step == STEPS:
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(os.path.join(workdir, "ckpt"), state)
      checkpointer.wait_until_finished()
      # Every host's view of the saved parameters as full arrays (process 0 writes them for the comparison).
      params = multihost_utils.process_allgather({k: v.get_value() for k, v in nnx.to_flat_state(state.params)},
                                                 tiled=True)
    state, metrics = train(state, sharded.global_batch(plan, local))
    losses.append(float(metrics["loss"]))
  init_from = init_from_checks(ParallelConfig(mesh=mesh, dcn_mesh=dcn_mesh, zero1=zero1), process_tag=f"-rank{rank}")
  init_from_ok = multihost_utils.process_allgather(np.asarray([init_from["shards_equal"],
                                                               init_from["placed_as_planned"]]))
  if rank == 0:
    init_from.update(shards_equal=bool(init_from_ok[:, 0].all()), placed_as_planned=bool(init_from_ok[:, 1].all()))
    with open(os.path.join(workdir, "init_from.json"), "w") as f:
      json.dump(init_from, f)
    np.savez(os.path.join(workdir, "params.npz"), **{".".join(map(str, k)): np.asarray(v) for k, v in params.items()})
    with open(os.path.join(workdir, "train.json"), "w") as f:
      data_owners = [sorted({d.process_index for d in row.flat}) for row in plan.mesh.devices]  # per data index
      json.dump({"losses": losses, "process_count": jax.process_count(), "mesh": plan.describe(),
                 "data_owners": data_owners}, f)
  multihost_utils.sync_global_devices("done")


def restore_elsewhere(workdir: str, out_path: str) -> None:
  """One process, 8 devices, another mesh: restore the two-process checkpoint and take the next step."""
  import orbax.checkpoint as ocp

  trainer, host0 = make_trainer()
  plan = ShardingPlan.from_config(ParallelConfig(mesh=RESTORE_MESH[0], zero1=RESTORE_MESH[1]))
  target = sharded.abstract_state(plan, jax.eval_shape(lambda: host0))
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "ckpt"), target)
  saved = np.load(os.path.join(workdir, "params.npz"))
  restored = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state.params)}
  identical = all(np.array_equal(saved[k], restored[k]) for k in saved.files) and set(saved.files) == set(restored)
  on_new_mesh = all(leaf.sharding == want.sharding for leaf, want in zip(jax.tree.leaves(state),
                                                                          jax.tree.leaves(target)))
  step = int(state.step)
  train = sharded.jit_sharded_train_step(plan, trainer, state)
  _, metrics = train(state, sharded.global_batch(plan, make_batch(STEPS)))
  with open(out_path, "w") as f:
    json.dump({"params_identical": bool(identical), "num_params": len(saved.files), "step": step,
               "on_new_mesh": bool(on_new_mesh), "next_loss": float(metrics["loss"]), "mesh": plan.describe()}, f)


if __name__ == "__main__":
  if MODE == "strategies":
    strategies(sys.argv[2])
  elif MODE == "train":
    train_two_process(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
  elif MODE == "restore":
    restore_elsewhere(sys.argv[2], sys.argv[3])
  else:
    raise SystemExit(f"unknown mode {MODE}")
