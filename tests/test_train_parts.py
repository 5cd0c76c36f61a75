"""Pure pieces of training: the PID controller, the balance loss, the optimizer's parameter classes and schedules.

L layers, X experts, X1 = X + 1 router classes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_draws import with_key_temperatures

from zaya_jax.config import ZayaConfig
from zaya_jax.model.decoder import abstract_model
from zaya_jax.ops import gmm as gmm_ops
from zaya_jax.train import balancing
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.optim import OptimizerConfig, decay_mask, learning_rate_schedule, make_optimizer, muon_dimensions
from zaya_jax.train.step import split_model


def test_pid_moves_overloaded_experts_down_and_leaves_the_skip_slot():
  cfg = BalancingConfig(kp=0.1, ki=0.01, kd=0.05, integral_limit=0.6)
  biases_LX1 = jnp.array([[0.0, 0.0, 0.0, 0.0, -1.0], [0.3, -0.2, 0.1, 0.0, -1.0]])
  counts_LX1 = jnp.array([[70, 10, 10, 10, 900], [25, 25, 25, 25, 0]])  # layer 1 is balanced already
  state = balancing.init_pid(2, 4)
  new_LX1, state = balancing.pid_update(cfg, state, biases_LX1, counts_LX1)
  error = np.array([0.7, 0.1, 0.1, 0.1]) - 0.25  # skip-slot tokens are not part of the load
  np.testing.assert_allclose(new_LX1[0, :4], -(0.1 * error + 0.01 * error + 0.05 * error), rtol=1e-6)
  np.testing.assert_array_equal(new_LX1[:, 4], [-1.0, -1.0])
  np.testing.assert_array_equal(new_LX1[1], biases_LX1[1])  # zero error: no move
  np.testing.assert_allclose(new_LX1[0, :4].sum(), 0.0, atol=1e-7)  # mean expert bias kept: skip odds unchanged
  for _ in range(100):  # anti-windup: the integral saturates, and the update stays centred
    new_LX1, state = balancing.pid_update(cfg, state, biases_LX1, counts_LX1)
  np.testing.assert_allclose(new_LX1[0, :4].sum(), 0.0, atol=1e-6)
  assert float(jnp.abs(state.integral_LX).max()) == pytest.approx(0.6)
  # A layer that routed nothing to experts holds: biases and controller state, even with an integral built up (a
  # review found the integral term still pushing, and the next routed step taking a derivative kick).
  skipped_LX1 = jnp.array([[0, 0, 0, 0, 100], [25, 25, 25, 25, 0]])
  held, held_state = balancing.pid_update(cfg, state, new_LX1, skipped_LX1)
  np.testing.assert_array_equal(held[0], new_LX1[0])
  np.testing.assert_array_equal(held_state.integral_LX[0], state.integral_LX[0])
  np.testing.assert_array_equal(held_state.previous_error_LX[0], state.previous_error_LX[0])


def test_pid_derivative_acts_on_the_change_of_the_error():
  # The small integral limit keeps the integral unlike the error: a derivative taken from it would show.
  cfg = BalancingConfig(kp=0.0, ki=0.0, kd=1.0, integral_limit=0.1)
  state = balancing.init_pid(1, 4)
  first_LX1, state = balancing.pid_update(cfg, state, jnp.zeros((1, 5)), jnp.array([[70, 10, 10, 10, 0]]))
  error1, error2 = np.array([0.45, -0.15, -0.15, -0.15]), np.array([-0.15, 0.45, -0.15, -0.15])
  np.testing.assert_allclose(state.previous_error_LX[0], error1, rtol=1e-6)
  second_LX1, state = balancing.pid_update(cfg, state, first_LX1, jnp.array([[10, 70, 10, 10, 0]]))
  np.testing.assert_allclose(second_LX1[0, :4] - first_LX1[0, :4], -(error2 - error1), rtol=1e-5, atol=1e-7)


def test_balance_loss_is_one_when_balanced_and_x_when_collapsed():
  X, M = 4, 8
  uniform_LMX1 = jnp.full((1, M, X + 1), 1.0 / (X + 1))
  valid_M = jnp.ones((M,), bool)
  balanced = balancing.aux_loss(uniform_LMX1, jnp.arange(M)[None] % X, valid_M)
  assert float(balanced) == pytest.approx(1.0, rel=1e-6)
  collapsed_probs = jax.nn.one_hot(jnp.zeros((1, M), int), X + 1) * 0.99 + 0.01 / (X + 1)
  collapsed = balancing.aux_loss(collapsed_probs, jnp.zeros((1, M), int), valid_M)
  assert float(collapsed) > 0.95 * X
  # Padding tokens count for nothing.
  masked = balancing.aux_loss(collapsed_probs, jnp.zeros((1, M), int), valid_M.at[:].set(False))
  assert float(masked) == 0.0


def test_routing_metrics():
  counts_LX1 = jnp.array([[30, 10, 0, 20, 40]])
  m = balancing.routing_metrics(counts_LX1)
  np.testing.assert_allclose(m["expert_load"], [[0.5, 1 / 6, 0.0, 1 / 3]], rtol=1e-6)
  assert float(m["skip_rate"][0]) == pytest.approx(0.4)
  assert float(m["load_max_over_min"][0]) == pytest.approx(60.0)  # an empty expert counts as half a token


def test_optimizer_parameter_classes():
  _, params, _ = split_model(abstract_model(ZayaConfig.tiny()))
  names = jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), params))
  decayed = dict(zip(names, jax.tree.leaves(decay_mask(params)), strict=True))
  assert decayed["['model']['layers'][0]['self_attn']['o_proj']['weight'].value"]
  assert decayed["['model']['layers'][0]['mlp']['experts']['down_proj'].value"]
  assert not decayed["['model']['norm']['weight'].value"]
  assert not decayed["['model']['layers'][0]['mlp']['gate']['down_proj']['bias'].value"]
  assert not decayed["['model']['layers'][0]['self_attn']['qk_norm']['temp'].value"]
  dims = muon_dimensions(params)
  flat = jax.tree.leaves(dims, is_leaf=lambda d: d is None or isinstance(d, optax.contrib.MuonDimensionNumbers))
  by_name = dict(zip(names, flat, strict=True))
  assert by_name["['model']['layers'][0]['mlp']['experts']['gate_up_proj'].value"].reduction_axis == 2
  assert by_name["['model']['layers'][0]['self_attn']['qkv_proj']['q_proj']['weight'].value"].reduction_axis == 1
  assert by_name["['model']['layers'][0]['self_attn']['o_proj']['weight'].value"].reduction_axis == 1
  assert by_name["['model']['embed_tokens']['weight'].value"] is None
  assert by_name["['model']['layers'][0]['self_attn']['qkv_proj']['conv_qk_grouped']['weight'].value"] is None
  assert by_name["['model']['norm']['weight'].value"] is None
  # An untied LM head stays on AdamW, as the embedding does (the Muon recipe).
  _, untied, _ = split_model(abstract_model(ZayaConfig.tiny(tie_word_embeddings=False)))
  head = [d for path, d in jax.tree_util.tree_leaves_with_path(
      muon_dimensions(untied), is_leaf=lambda d: d is None or isinstance(d, optax.contrib.MuonDimensionNumbers))
      if "lm_head" in jax.tree_util.keystr(path)]
  assert head == [None]


def test_muon_matrices_decay_per_step_as_adamw_parameters_do():
  cfg = OptimizerConfig(name="muon", lr=3e-4, muon_lr=0.02, weight_decay=0.1, warmup_steps=0, schedule="constant",
                        clip_norm=0.0)
  assert cfg.muon_decay == pytest.approx(0.1 * 3e-4 / 0.02)
  params = {"proj": {"weight": jnp.ones((4, 3))}, "embed_tokens": {"weight": jnp.ones((4, 3))}}
  dims = muon_dimensions(params)
  assert dims["proj"]["weight"] is not None and dims["embed_tokens"]["weight"] is None
  tx = make_optimizer(cfg, params, 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  # With a zero gradient only the decay moves them: lr * weight_decay per step for both kinds.
  np.testing.assert_allclose(updates["proj"]["weight"], -3e-5, rtol=1e-4)
  np.testing.assert_allclose(updates["embed_tokens"]["weight"], -3e-5, rtol=1e-4)
  explicit = OptimizerConfig(name="muon", muon_weight_decay=0.5)
  assert explicit.muon_decay == 0.5


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_skips_rank_one_parameters(name):
  params = {"w": jnp.ones((4, 3)), "norm": jnp.ones((3,))}
  tx = make_optimizer(OptimizerConfig(name=name, warmup_steps=0, schedule="constant", weight_decay=0.5), params, 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert float(jnp.abs(updates["norm"]).max()) == 0.0  # zero gradient and no decay: no move
  assert float(jnp.abs(updates["w"]).max()) > 0.0  # decayed


def test_schedules():
  cos = learning_rate_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 100)
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.1)
  assert float(cos(55)) == pytest.approx(0.55) and float(cos(90)) > 0.101  # the decay spans steps 10-100
  const = learning_rate_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="constant"), 100)
  assert float(const(0)) == 0.0 and float(const(5)) == pytest.approx(0.5) and float(const(99)) == 1.0
  wsd = learning_rate_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2,
                                               min_lr_ratio=0.0), 100)
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
  assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)
  for warmup, fraction, total in ((10, 1.0, 100), (60, 0.5, 100), (2000, 0.2, 2200)):  # warmup + decay > total
    short = learning_rate_schedule(OptimizerConfig(lr=1.0, warmup_steps=warmup, schedule="wsd",
                                                   decay_fraction=fraction, min_lr_ratio=0.0), total)
    assert float(short(warmup)) == pytest.approx(1.0) and float(short(total)) == pytest.approx(0.0), (warmup, total)
  with pytest.raises(ValueError, match=r"OptimizerConfig\.schedule"):
    OptimizerConfig(schedule="linear")


def test_clipping_acts_on_the_gradients_before_adam():
  # Clipped first, gradients 100 and then 1 both reach Adam as 1: its second update is exactly -lr (m = v = 1).
  # Unclipped, or clipping Adam's updates instead, the second update is ~0.69 lr.
  lr, params = 1e-2, {"b": jnp.ones((1,))}
  tx = make_optimizer(OptimizerConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1.0),
                      params, 10)
  _, opt_state = tx.update({"b": jnp.full((1,), 100.0)}, tx.init(params), params)
  updates, _ = tx.update({"b": jnp.ones((1,))}, opt_state, params)
  np.testing.assert_allclose(updates["b"], -lr, rtol=1e-4)


def test_compiled_initialisation_equals_the_eager_model():
  """`create_initialised` (one compiled program, shardable) starts from the parameters that
  `ZayaForCausalLM(cfg, rngs=nnx.Rngs(seed))` draws eagerly, up to float32 rounding: compiled together, the
  initialisers' arithmetic is fused differently (measured: at most 1.2e-7 relative, a quarter of the elements)."""
  from flax import nnx

  from zaya_jax.model.decoder import ZayaForCausalLM
  from zaya_jax.train.step import StepConfig, create_initialised

  cfg = ZayaConfig.tiny(num_layers=1)
  args = (OptimizerConfig(), StepConfig(), BalancingConfig(), 10, 3)
  _, state = create_initialised(cfg, *args)
  _, params, biases = split_model(ZayaForCausalLM(cfg, rngs=nnx.Rngs(3)))
  for got, want in ((state.params, params), (state.biases, biases)):
    got, want = nnx.to_flat_state(got), nnx.to_flat_state(want)
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, a), (_, b) in zip(got, want):
      np.testing.assert_allclose(a[...], b[...], rtol=3e-7, atol=1e-9, err_msg=str(path))
  assert int(state.step) == 0 and all(not np.any(x) for x in jax.tree.leaves(state.opt_state) if x.ndim)


def test_flops_per_token_counts_a_sliding_window_layer_by_its_window():
  import dataclasses

  from zaya_jax.train.experiment import get_experiment
  from zaya_jax.train.loop import train_flops_per_token

  base = get_experiment("tiny")
  T, att = base.data.seq_len, base.model.attention
  model = base.model.replace(layer_types=("hybrid", "hybrid_sliding"), attention=dict(sliding_window=16))
  sliding = train_flops_per_token(dataclasses.replace(base, model=model))
  # Layer 1's queries see ~16 keys, not ~T/2: its span counts as 2 * 16 instead of T.
  assert train_flops_per_token(base) - sliding == pytest.approx(6 * att.num_heads * att.head_dim * (T - 32))


def _loss_and_grads(cfg: ZayaConfig, step_cfg, batch: dict, *, lowered_text: bool = False,
                    saved_residuals: bool = False):
  """The train step's loss (z-loss and balance loss on) and gradients for `batch`, with `step_cfg` and the model
  config `cfg`; with lowered_text, the grad program's StableHLO instead; with saved_residuals, what
  `jax.ad_checkpoint.print_saved_residuals` prints: the arrays the backward pass keeps, one a line."""
  import contextlib
  import io

  from flax import nnx

  from zaya_jax.model.decoder import ZayaForCausalLM
  from zaya_jax.train.step import _micro_loss, create, step_compiler_options

  model = with_key_temperatures(ZayaForCausalLM(cfg, rngs=nnx.Rngs(0)), seed=0)  # scores that depend on q and k
  trainer, state = create(model, OptimizerConfig(), step_cfg, BalancingConfig(mode="aux_loss"), 10, 0)
  loss = lambda p: _micro_loss(trainer, p, state.biases, batch, 1.0)[0]
  if saved_residuals:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      jax.ad_checkpoint.print_saved_residuals(loss, state.params)
    return printed.getvalue()
  grad_fn = jax.jit(jax.value_and_grad(loss), compiler_options=step_compiler_options("cpu"))  # as training compiles
  if lowered_text:
    return grad_fn.lower(state.params).as_text()
  return grad_fn(state.params)


def _random_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"input_ids": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
          "segment_ids": jnp.asarray(np.repeat([[1, 2]], B, 0).repeat(T // 2, 1), jnp.int32),
          "loss_mask": jnp.asarray(rng.random((B, T)) > 0.25, jnp.float32)}


def _assert_same_loss_and_grads(got, want, rtol: float):
  np.testing.assert_allclose(got[0], want[0], rtol=rtol)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))


def _grad_temporaries(cfg: ZayaConfig, step_cfg, batch: dict) -> int:
  """Bytes of temporaries of the train step's compiled gradient (abstract model: nothing allocated), compiled as
  training compiles it on CPU (`step_compiler_options`)."""
  from zaya_jax.train.step import _micro_loss, make_trainer, step_compiler_options

  graphdef, params, biases = split_model(abstract_model(cfg))
  trainer = make_trainer(cfg, graphdef, params, OptimizerConfig(), step_cfg, BalancingConfig(), 10)
  grad = jax.jit(jax.grad(lambda p, b, x: _micro_loss(trainer, p, b, x, 1.0)[0]),
                 compiler_options=step_compiler_options("cpu"))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  return grad.lower(params, biases, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("chunk", [8, 10, 24, 40])  # divides T, pads T, T itself, more than T
def test_chunked_loss_equals_the_loss_over_whole_logits(chunk):
  from zaya_jax.train.step import StepConfig

  cfg, batch = ZayaConfig.tiny(num_layers=1), _random_batch(3, 24, 512)
  want = _loss_and_grads(cfg, StepConfig(z_loss_weight=1e-2), batch)
  got = _loss_and_grads(cfg, StepConfig(z_loss_weight=1e-2, logits_chunk=chunk), batch)
  # The chunks' sums are added in another order: the loss may move in its last fp32 bits.
  _assert_same_loss_and_grads(got, want, rtol=1e-6)


def test_chunked_loss_keeps_one_chunk_of_logits():
  """The compiled gradient's temporaries shrink by more than the logits and most of their gradient, which the chunks
  no longer hold at once (XLA:CPU's memory analysis; a model whose logits dominate: 8 x 256 tokens of a 4096-entry
  vocabulary are 32 MiB in fp32; measured 95.0 -> 40.5 MiB)."""
  from zaya_jax.train.step import StepConfig

  cfg = ZayaConfig.tiny(num_layers=1, vocab_size=4096)
  temporaries = lambda chunk: _grad_temporaries(cfg, StepConfig(logits_chunk=chunk), _random_batch(8, 256, 4096))

  whole, chunked = temporaries(0), temporaries(32)
  logits_bytes = 8 * 256 * 4096 * 4
  assert whole - chunked > 1.5 * logits_bytes, (whole / 2**20, chunked / 2**20)
  assert temporaries(1024) == temporaries(256) <= whole  # a chunk longer than T is T (it once padded T to 1024)


def test_remat_changes_what_is_kept_not_the_gradients():
  from zaya_jax.train.step import StepConfig

  cfg, batch = ZayaConfig.tiny(), _random_batch(2, 16, 512)
  want = _loss_and_grads(cfg, StepConfig(), batch)
  for remat in ("full", "dots"):
    _assert_same_loss_and_grads(_loss_and_grads(cfg.replace(remat=remat), StepConfig(), batch), want, rtol=1e-6)
  # Each layer's backward pass recomputes it from behind an optimization barrier (jax.checkpoint's): "full" every
  # matmul of a layer, "dots" only the attention core's (measured: 87, 117, 95).
  lowered = {remat: _loss_and_grads(cfg.replace(remat=remat), StepConfig(), batch, lowered_text=True)
             for remat in ("none", "full", "dots")}
  barriers = {remat: text.count("stablehlo.optimization_barrier") for remat, text in lowered.items()}
  assert barriers["full"] >= barriers["none"] + cfg.num_layers and barriers["dots"] == barriers["full"]
  dots = {remat: text.count("stablehlo.dot_general") for remat, text in lowered.items()}
  assert dots["none"] < dots["dots"] < dots["full"], dots
  # "dots" keeps both grouped matmuls of every layer's experts (named by ops.gmm; the dot-saving policy alone does
  # not see them, since they run in custom VJPs, loops or kernels), "full" neither.
  named = {remat: _loss_and_grads(cfg.replace(remat=remat), StepConfig(), batch, saved_residuals=True).count(
      f"named '{gmm_ops.OUTPUT_NAME}'") for remat in ("full", "dots")}
  assert named == {"full": 0, "dots": 2 * cfg.num_layers}, named


def test_remat_shrinks_the_compiled_step_on_cpu_too():
  """Compiled as training compiles it (`step_compiler_options`), the CPU keeps jax.checkpoint's barriers: XLA:CPU
  otherwise merges the recomputation back into the forward pass and remat saves nothing (measured, 8 x 256 tokens:
  66.4 MiB of temporaries without remat; full 33.0 and dots 34.4 MiB, against 65.0 and 65.2 without the options)."""
  from zaya_jax.train.step import StepConfig

  batch = _random_batch(8, 256, 512)
  temporaries = lambda remat: _grad_temporaries(ZayaConfig.tiny(remat=remat), StepConfig(), batch)

  none, full, dots = (temporaries(remat) for remat in ("none", "full", "dots"))
  assert full < 0.6 * none and full <= dots < 0.6 * none, (none / 2**20, full / 2**20, dots / 2**20)


@pytest.mark.parametrize("settings, field", [(dict(grad_accum=0), "grad_accum"), (dict(z_loss_weight=-1.0),
                                             "z_loss_weight"), (dict(logits_chunk=-8), "logits_chunk"),
                                             (dict(logits_chunk=True), "logits_chunk")])
def test_invalid_step_settings_name_the_field(settings, field):
  from zaya_jax.train.step import StepConfig

  with pytest.raises(ValueError, match=f"StepConfig.{field}: must"):
    StepConfig(**settings)


def test_step_memory_study_measures_memory_and_runs_the_compiled_step():
  """`python -m experiments.step_memory --time_steps=N`'s measurement: the compiled step's memory, then that very
  program run from a random state (the GPU check of remat runs it on ZAYA1-8B-wide layers)."""
  from experiments.step_memory import measure
  from zaya_jax.train.step import StepConfig

  plain = measure(ZayaConfig.tiny(), StepConfig(), batch=2, seq=64, steps=2)
  remat = measure(ZayaConfig.tiny(remat="full"), StepConfig(), batch=2, seq=64, steps=0)
  assert remat["temp_bytes"] < plain["temp_bytes"] and plain["argument_bytes"] == remat["argument_bytes"] > 0
  assert 0 < plain["step_ms"] < 60_000 and "step_ms" not in remat


def test_micro_batches_take_the_same_rows_from_every_device_block():
  """A mesh gives each device a contiguous block of the batch's rows: every micro-batch must hold rows of every
  block, B / (devices * A) of each, or a few devices compute a whole micro-batch while the others wait."""
  from zaya_jax.train.step import split_micro_batches

  B, A, devices = 64, 4, 8
  rows = np.arange(B)[:, None] * np.ones((1, 3), np.int32)
  micro = np.asarray(split_micro_batches({"input_ids": jnp.asarray(rows)}, A)["input_ids"])
  assert micro.shape == (A, B // A, 3) and sorted(micro[..., 0].ravel()) == list(range(B))  # every row once
  block_of_row = micro[..., 0] // (B // devices)
  for a in range(A):
    assert np.bincount(block_of_row[a], minlength=devices).tolist() == [B // (devices * A)] * devices
