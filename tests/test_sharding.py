"""Mesh-parallel training: every strategy equals one device, memory per device is as promised, expert dispatch drops
nothing, two processes train and save what one process restores onto another mesh, and bad meshes fail early.

The multi-device checks run in subprocesses (tests/sharding_worker.py) with forced CPU devices: the device count is
fixed when JAX starts. They inherit conftest.py's fast-compile XLA flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType

from zaya_jax.config import ZayaConfig
from zaya_jax.sharding import (
  MESH_AXES,
  ParallelConfig,
  ShardingError,
  ShardingPlan,
  ShardingRules,
  device_bytes,
  make_mesh,
  parse_mesh,
  with_shardings,
)
from zaya_jax.train import step as step_lib
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.optim import OptimizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
# Each strategy alone and one combination (each compile costs ~15 s of a 2-core CI machine). Plain data parallelism
# is only placed (its bytes are checked): its step is ZeRO-1's with the optimizer state whole.
STRATEGIES = ("dp", "zero1", "fsdp", "tp", "ep", "data2_expert2_tensor2_zero1")
STEPPED = STRATEGIES[1:]


def worker_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS: conftest.py's fast compiles
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_worker(*args, timeout: int):
  proc = subprocess.run([sys.executable, WORKER, *args], env=worker_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "strategies.json"
  run_worker("strategies", str(out), timeout=600)
  return json.loads(out.read_text())


@pytest.mark.parametrize("name", STEPPED)
def test_strategy_step_equals_single_device(results, name):
  r = results[name]
  assert results["devices"] == 8
  assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
  assert abs(r["grad_norm"] - r["ref_grad_norm"]) <= 1e-5 * r["ref_grad_norm"], r
  assert r["grad_rel_err"] <= 1e-5, r  # per parameter, ||g - g_ref|| / ||g_ref||
  assert r["param_rel_err"] <= 1e-5, r  # after the AdamW update
  assert r["counts_equal"], "routing differs from one device"


def test_strategies_hold_the_promised_bytes_per_device(results):
  params, opt = results["params_total"], results["opt_total"]
  r = {name: results[name] for name in STRATEGIES}
  # Plain data parallel: everything replicated.
  assert r["dp"]["params_device"] == params and r["dp"]["opt_device"] == opt
  # ZeRO-1 over 8: parameters replicated, optimizer state 1/8 (+ the step counters' bytes).
  assert r["zero1"]["params_device"] == params
  assert r["zero1"]["opt_device"] <= opt / 8 + 64, (r["zero1"]["opt_device"], opt / 8)
  # FSDP over 8: parameters and optimizer state 1/8, except the small replicated ones (convs, routers: < 5%).
  assert r["fsdp"]["params_device"] <= params / 8 + 0.05 * params
  assert r["fsdp"]["opt_device"] <= opt / 8 + 0.05 * opt
  # Tensor parallel over 8: embedding, query heads and expert widths split; the kv projections (replicated by the
  # default rules), norms, convs and routers stay whole: ~8% of this small model's parameters.
  assert params / 8 < r["tp"]["params_device"] <= params / 8 + 0.09 * params
  # Expert parallel over 8: each device keeps 1/8 of the expert weights and all the rest.
  assert r["ep"]["params_device"] < params / 2
  experts = results["expert_bytes"]
  assert r["ep"]["params_device"] == params - experts + experts // 8
  # Without ZeRO-1 the AdamW moments (two per parameter) are split exactly as the parameters are; the remainder is
  # the step counters, whole on every device.
  counters = opt - 2 * params
  assert 0 < counters <= 64
  for name in ("dp", "fsdp", "tp", "ep"):
    assert r[name]["opt_device"] == 2 * r[name]["params_device"] + counters, name
  # data 2 x expert 2 x tensor 2 with ZeRO-1: the optimizer state splits once more, over data.
  combo = r["data2_expert2_tensor2_zero1"]
  assert combo["opt_device"] <= 1.05 * combo["params_device"] < 2 * combo["params_device"]


def test_hf_checkpoint_loads_straight_onto_the_mesh(results):
  r = results["init_from"]  # create_from_hf on data 2 x expert 2 x tensor 2 with ZeRO-1
  assert r["step"] == 0 and r["sharded_params"] > 0, r
  assert r["shards_equal"], "a device holds a shard that differs from the saved tensor's slice"
  assert r["placed_as_planned"], "the loaded state is not placed as a freshly initialised one would be"


@pytest.mark.parametrize("mesh", ["expert:8", "expert:4,tensor:2"])
def test_expert_dispatch_is_dropless_or_counts_every_drop(results, mesh):
  d = results["dispatch"][mesh]
  # Dropless: every routed token reaches its expert and comes back (60% of the tokens want one expert).
  assert d["dropped"] == 0 and d["zero_rows_where_routed"] == 0
  assert d["max_abs_err"] <= 1e-5
  # With a capacity: the drops are exactly the host-side count, the kept tokens are exact, the dropped are zero.
  assert d["dropped_with_capacity"] == d["expected_dropped"] > 0
  assert d["kept_max_abs_err"] <= 1e-5 and d["dropped_rows_zero"]


def test_the_plan_is_active_while_the_step_traces(results):
  # Values cannot tell: a step traced outside its plan computes the same numbers, without its activation
  # constraints and, under an expert axis, with every expert's weights gathered instead of the tokens exchanged.
  for name in STEPPED:
    assert results[name]["constraints"] > 0, name
  assert results["ep"]["all_to_all"] >= 2 and results["zero1"]["all_to_all"] == 0  # at least out and back once


def test_expert_dispatch_follows_the_rules(results):
  d = results["dispatch"]["replicated_experts"]
  # capacity_factor 1.0 over one expert group per device: nothing is dropped when no token leaves its device.
  assert d["max_abs_err"] <= 1e-5 and d["dropped"] == 0 and d["all_to_all"] == 0
  assert "must also split the batch" in results["dispatch"]["expert_axis_outside_batch"]
  assert "'tensor'" in results["dispatch"]["width_axis_inside_batch"]
  assert "would add other tokens' rows" in results["dispatch"]["width_axis_inside_batch"]


def test_zero1_splits_the_gradient_accumulator_over_data(results):
  # The micro-batch loop carries each device's 1/8 of the summed gradients (sharding.constrain_gradients), not a
  # whole copy of them: launch/plan.py's figures count on it.
  r = results["zero1_accumulator"]
  saved = r["carried_f32_bytes"]["dp"] - r["carried_f32_bytes"]["zero1"]
  assert 0.9 * 7 / 8 * r["params_bytes"] <= saved <= r["params_bytes"], r


def test_remat_dots_keeps_the_dispatched_experts_matmuls(results):
  # Both grouped matmuls' outputs (named by ops.gmm inside the dispatch's shard_map) leave it as saved residuals;
  # the dot-saving policy alone keeps nothing of the experts, which it recomputes in the backward pass.
  assert results["dispatch"]["remat_kept_from_dispatch"] == {"dots": 2, "dot_policy_alone": 0}


def test_tensor_parallel_experts_move_no_weights(results):
  d = results["dispatch"]["tensor:8"]
  assert d["max_abs_err"] <= 1e-5
  # gate_up_proj's rows are gate/up pairs, so its declared split over `tensor` is the one the SwiGLU needs. With the
  # reference's halves, every call paired them up with an all-to-all of the expert weights.
  assert d["all_to_all"] == 0, d


def test_cca_keeps_heads_and_batch_on_their_devices(results):
  for mesh, d in results["attention_tp"].items():
    assert d["out_rel_err"] <= 1e-6 and d["grad_rel_err"] <= 1e-5, d
    local_batch = d["batch"] // 4  # data:4
    # An activation's or the whole batch's size in some dim, also merged into one dim (B*T).
    activation = {d["seq"], local_batch * d["seq"], d["batch"] * d["seq"]}
    whole_batch = {d["batch"], d["batch"] * d["seq"]}
    arrays = [(kind, dims) for kind, results_dims in d["collectives"] for dims in results_dims]
    # Before, the convs' heads-major layout merged batch and time, and XLA gathered the whole batch there: on
    # data:4 too, where the gradients' all-reduce is all data parallelism needs.
    assert not [a for a in arrays if whole_batch & set(a[1])], (mesh, d["collectives"])
    if mesh == "data:4":
      assert {kind for kind, _ in d["collectives"]} == {"all-reduce"}, d["collectives"]
      assert not [a for a in arrays if activation & set(a[1])], d["collectives"]
      continue
    # Tensor parallelism: Megatron's two all-reduces, the output projection's partial sums forward and the input
    # gradient backward. Each device runs its own query heads through projection, convs, qk-mean and attention;
    # before, the [q|k|v] projection ran as one matmul whose slices straddled the devices (collective-permutes of
    # activations).
    assert sum(kind == "all-reduce" and dims == [local_batch, d["seq"], 64] for kind, dims in arrays) == 2, d
    assert not [a for a in arrays if a[0] in ("collective-permute", "all-to-all") and activation & set(a[1])], (
        d["collectives"])


def test_rules_that_give_heads_and_batch_one_axis_still_compile(results):
  d = results["attention_heads_on_a_batch_axis"]
  # The key temperature's gradient, a sum over every score, is the least exact: 8e-6 on plain data:8, 1.4e-5 here.
  assert d["out_rel_err"] <= 1e-6 and d["grad_rel_err"] <= 3e-5, d


def test_ragged_exchange_equals_padded_and_lowers_to_ragged_all_to_all(results):
  r = results["ragged"]
  for mesh in ("expert:8", "data:2,expert:2,tensor:2"):
    assert r[mesh]["value_diff"] <= 1e-5 * abs(r[mesh]["value"]) and r[mesh]["grad_max_diff"] <= 1e-5, mesh
  # Forward: tokens out and ids out, results back (3); backward: the transposes of the two float exchanges (2).
  assert r["ops_cuda"] >= 5 and r["ops_rocm"] >= 5


def test_unsplittable_shapes_fail_with_axis_and_sizes(results):
  e = results["errors"]
  assert "embed_tokens.weight" in e["vocab"] and "500" in e["vocab"] and "tensor=8" in e["vocab"]
  assert "batch size 12" in e["batch"] and "data=8" in e["batch"]
  # 8 rows split over data=8, but two micro-batches of 4 do not: as the planner (launch/plan.py), the loop refuses.
  assert "micro-batches of 4 sequences (batch size 8 / grad_accum 2)" in e["micro_batch"]
  assert "data=8" in e["micro_batch"]
  assert "data:3" in e["mesh"] and "3 devices" in e["mesh"] and "8 devices" in e["mesh"]


def test_mesh_parsing_and_validation_before_compiling():
  assert parse_mesh("data:2,expert:2") == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
  for bad, words in (("data:2,model:2", "model"), ("data:0", "size 0"), ("data:x", "'x'"), ("data:2,data:2", "twice"),
                     ("data:-1,fsdp:-1", "-1")):
    with pytest.raises(ShardingError, match=words):
      parse_mesh(bad)
  with pytest.raises(ShardingError, match=f"spans 3 devices .* but there are {jax.device_count()} devices"):
    make_mesh("data:3")
  one_device = ShardingPlan.from_config(ParallelConfig(mesh=f"data:{jax.device_count()}"))
  with pytest.raises(ShardingError, match=r"batch size 1024 is not a multiple of grad_accum=3"):  # not the mesh's fault
    one_device.check_batch(1024, 3)
  with pytest.raises(ValueError, match=r"ParallelConfig\.mesh"):
    ParallelConfig(mesh="tensor=2")
  with pytest.raises(ValueError, match=r"ParallelConfig\.dcn_mesh = 'data:2' needs a mesh"):
    ParallelConfig(dcn_mesh="data:2")
  with pytest.raises(ShardingError, match=r"dcn_mesh data:2.* spans 2 processes .* but this run has 1"):
    make_mesh("data:-1", "data:2")
  # ZAYA1-8B's shapes against a 3-way tensor axis, on an abstract mesh (no devices needed): the heads do not split.
  _, abstract = step_lib.create_abstract(ZayaConfig.zaya1_8b(), OptimizerConfig(), step_lib.StepConfig(),
                                         BalancingConfig(), 10, 0)
  mesh = AbstractMesh((1, 1, 1, 3), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  with pytest.raises(ShardingError, match=r"dim \d \('(heads|mlp)'\) has size \d+, which mesh axes tensor=3"):
    ShardingPlan(mesh).state_shardings(abstract)
  # tensor:8 splits the 8 query heads whole; tensor:16 would halve each, refused before anything is built. The 2 kv
  # heads are replicated by the default rules (a split over 8 would cut inside them).
  attention = ZayaConfig.zaya1_8b().attention
  for size, ok in ((8, True), (16, False)):
    plan = ShardingPlan(AbstractMesh((1, 1, 1, size), MESH_AXES, axis_types=(AxisType.Auto,) * 4))
    if ok:
      plan.check_heads(attention)
      plan.state_shardings(abstract)  # every dimension divides
    else:
      with pytest.raises(ShardingError, match=r"rule heads=\('tensor',\): mesh axes tensor=16 \(16 parts\) would "
                                              r"cut inside the 8 query heads"):
        plan.check_heads(attention)
  with pytest.raises(ShardingError, match=r"would cut inside the 2 kv heads"):
    ShardingPlan(AbstractMesh((1, 1, 1, 4), MESH_AXES, axis_types=(AxisType.Auto,) * 4),
                 ShardingRules(kv=("tensor",))).check_heads(attention)
  # The ragged exchange where the backend has it (GPU, TPU), and dropless only: a capacity takes the padded one.
  from zaya_jax.parallel.expert import resolve_exchange

  assert resolve_exchange("auto") == "padded"  # CPU
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_exchange("auto") == "ragged" and resolve_exchange("auto", 1.0) == "padded"
  # ... and ZeRO-1 over 8 x 16 hosts leaves about 1/128 of the optimizer state per device.
  mesh = AbstractMesh((128, 1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  plan = ShardingPlan(mesh, zero1=True)
  sharded = with_shardings(abstract, plan.state_shardings(abstract))
  opt_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))
  assert device_bytes(sharded.opt_state) <= opt_total / 128 * 1.01
  assert device_bytes(sharded.params) == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))


def test_two_processes_train_save_and_one_process_restores_on_another_mesh(tmp_path, free_port):
  procs = [subprocess.Popen([sys.executable, WORKER, "train", str(rank), str(tmp_path), str(free_port)],
                            env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:  # a hung peer must not outlive the test
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  trained = json.loads((tmp_path / "train.json").read_text())
  assert trained["process_count"] == 2
  assert trained["data_owners"] == [[0], [1]]  # the dcn part of `data` runs across the processes, nothing else does
  init_from = json.loads((tmp_path / "init_from.json").read_text())  # each process placed its part of a folder
  assert init_from["shards_equal"] and init_from["placed_as_planned"] and init_from["sharded_params"] > 0, init_from
  run_worker("restore", str(tmp_path), str(tmp_path / "restore.json"), timeout=240)
  restored = json.loads((tmp_path / "restore.json").read_text())
  assert restored["mesh"] != trained["mesh"] and restored["on_new_mesh"]
  assert restored["step"] == 3 and restored["num_params"] > 50
  assert restored["params_identical"]
  next_loss = trained["losses"][3]  # the two processes' step after the checkpoint, on the same batch
  assert abs(restored["next_loss"] - next_loss) <= 1e-5 * abs(next_loss), (restored["next_loss"], next_loss)
