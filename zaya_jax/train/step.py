"""The training state and step: pure functions of (state, batch), jitted once with the state donated.

B batch (global, per step), A gradient-accumulation micro-batches, T sequence, V vocab, L layers, X1 router classes.

A batch is a dict of int32 [B, T] arrays: `input_ids`, `segment_ids` (documents are contiguous runs of equal ids; 0
marks padding), `targets` (the next token) and `loss_mask` (1 where the target is scored). The loss is the mean cross
entropy over scored tokens of the whole batch (the same whether or not it is split into micro-batches), plus an
optional z-loss and, in `aux_loss` balancing mode, the balance loss (per micro-batch, see `_micro_loss`). Master
parameters keep `param_dtype` (fp32 for training); the model casts them to its compute dtype at use, so
`dtype="bfloat16"` trains in bf16 with fp32 masters.

A step whose loss or gradient norm is not finite changes nothing (the state passes through) and reports
`finite = False`; the loop stops on it without saving.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zaya_jax.config import ZayaConfig
from zaya_jax.model.decoder import ZayaForCausalLM, ZayaOutput, abstract_model
from zaya_jax.model.moe import BalancingBiases
from zaya_jax.sharding import constrain, constrain_gradients
from zaya_jax.train import balancing
from zaya_jax.train.balancing import BalancingConfig, PIDState
from zaya_jax.train.optim import OptimizerConfig, make_optimizer

BATCH_KEYS = ("input_ids", "segment_ids", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  grad_accum: int = 1  # micro-batches per step; the batch size must be a multiple
  z_loss_weight: float = 0.0  # weight of mean(logsumexp(logits)^2) over scored tokens
  # Sequence positions per chunk of the LM head and the loss (0: the whole micro-batch at once). With a chunk, only
  # one chunk's [B, chunk, V] logits exist at a time and the backward pass recomputes them: ZAYA1-8B's fp32 logits
  # are 1 MiB per token (V = 262,272), several GiB per 4k-token sequence before their gradient. A chunk that does
  # not divide the sequence length pads the last chunk; one longer than the sequence is the sequence.
  logits_chunk: int = 0

  def __post_init__(self):
    if not (isinstance(self.grad_accum, int) and self.grad_accum >= 1):
      raise ValueError(f"StepConfig.grad_accum: must be a positive int, got {self.grad_accum!r}")
    if not (isinstance(self.logits_chunk, int) and not isinstance(self.logits_chunk, bool) and self.logits_chunk >= 0):
      raise ValueError(f"StepConfig.logits_chunk: must be a non-negative int, got {self.logits_chunk!r}")
    if self.z_loss_weight < 0:
      raise ValueError(f"StepConfig.z_loss_weight: must be non-negative, got {self.z_loss_weight}")


class TrainState(NamedTuple):
  step: jax.Array  # int32, steps taken
  params: nnx.State  # the model's nnx.Param variables (master copy)
  biases: nnx.State  # the routers' BalancingBiases (moved by the PID controller, not by gradients)
  opt_state: Any
  pid: PIDState
  key: jax.Array  # uint32 raw key data (plain arrays checkpoint everywhere); split once per step


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything static about training: the model structure, the optimizer and the step's settings."""

  model_config: ZayaConfig
  graphdef: Any
  optimizer: optax.GradientTransformation
  step_config: StepConfig
  balancing: BalancingConfig
  # A term of your own (ablations): extra_loss(model, out, micro_batch) -> scalar, added to each micro-batch's loss
  # (divided by grad_accum, as the aux loss) and logged as `extra_loss`; `out` is the model's ZayaOutput (logits,
  # router; logits None when step_config.logits_chunk is set). Set it with dataclasses.replace(trainer,
  # extra_loss=fn); a module-level function keeps one compile.
  extra_loss: Callable[[ZayaForCausalLM, Any, dict], jax.Array] | None = None

  def merge(self, params, biases) -> ZayaForCausalLM:
    """A model over these very arrays: a later jit_train_step donates them, and the model dies with them."""
    return nnx.merge(self.graphdef, params, biases)

  def model_of(self, state: TrainState) -> ZayaForCausalLM:
    """The state's model over copies of its parameters: usable after further (donating) train steps."""
    return self.merge(*jax.tree.map(jnp.copy, (state.params, state.biases)))


def split_model(model: ZayaForCausalLM):
  """(graphdef, params, biases); raises if the model holds variables of any other kind."""
  graphdef, params, biases, rest = nnx.split(model, nnx.Param, BalancingBiases, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the model holds variables that are neither Params nor BalancingBiases: {rest}")
  return graphdef, params, biases


def make_trainer(model_config: ZayaConfig, graphdef, params, opt_cfg: OptimizerConfig, step_cfg: StepConfig,
                 bal_cfg: BalancingConfig, total_steps: int) -> Trainer:
  """The static half of training. `params` may be abstract (ShapeDtypeStructs): only names and ranks are read."""
  return Trainer(model_config, graphdef, make_optimizer(opt_cfg, params, total_steps), step_cfg, bal_cfg)


def init_state(trainer: Trainer, params, biases, seed: int) -> TrainState:
  cfg = trainer.model_config
  # The step donates its state; copies keep the caller's model usable afterwards.
  params, biases = jax.tree.map(jnp.copy, (params, biases))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, biases=biases, opt_state=trainer.optimizer.init(params),
      pid=balancing.init_pid(cfg.num_layers, cfg.moe.num_experts),
      key=jax.random.key_data(jax.random.key(seed)))


def create(model: ZayaForCausalLM, opt_cfg: OptimizerConfig, step_cfg: StepConfig, bal_cfg: BalancingConfig,
           total_steps: int, seed: int) -> tuple[Trainer, TrainState]:
  """The static trainer and the initial state from a built (or loaded) model."""
  graphdef, params, biases = split_model(model)
  trainer = make_trainer(model.config, graphdef, params, opt_cfg, step_cfg, bal_cfg, total_steps)
  return trainer, init_state(trainer, params, biases, seed)


def create_abstract(model_config: ZayaConfig, opt_cfg: OptimizerConfig, step_cfg: StepConfig,
                    bal_cfg: BalancingConfig, total_steps: int, seed: int) -> tuple[Trainer, TrainState]:
  """The trainer and the state's ShapeDtypeStructs, nothing allocated: the target of a checkpoint restore."""
  graphdef, params, biases = split_model(abstract_model(model_config))
  trainer = make_trainer(model_config, graphdef, params, opt_cfg, step_cfg, bal_cfg, total_steps)
  return trainer, jax.eval_shape(lambda p, b: init_state(trainer, p, b, seed), params, biases)


def create_initialised(model_config: ZayaConfig, opt_cfg: OptimizerConfig, step_cfg: StepConfig,
                       bal_cfg: BalancingConfig, total_steps: int, seed: int, *,
                       state_shardings: Callable[[TrainState], Any] | None = None) -> tuple[Trainer, TrainState]:
  """The trainer and a freshly initialised state, built by one compiled program.

  Eagerly, every initialiser is a program of its own (a tiny model's start-up: ~90 of them). With `state_shardings`
  (e.g. `ShardingPlan.state_shardings`, given the abstract state) the program's outputs are sharded and the compiler
  partitions the initialisers (JAX's threefry is partitionable), instead of one device building the whole state to
  be placed afterwards: ZAYA1-8B's fp32 masters alone are 35 GB, with AdamW's moments 106 GB.
  """
  trainer, abstract = create_abstract(model_config, opt_cfg, step_cfg, bal_cfg, total_steps, seed)

  def build() -> TrainState:
    _, params, biases = split_model(ZayaForCausalLM(model_config, rngs=nnx.Rngs(seed)))
    return init_state(trainer, params, biases, seed)

  out_shardings = None if state_shardings is None else state_shardings(abstract)
  return trainer, jax.jit(build, out_shardings=out_shardings)()


def check_batch(batch: dict, model_config: ZayaConfig, step_cfg: StepConfig) -> None:
  """Host-side checks before the jitted step: keys, shapes, dtypes, token ids."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; a batch has {list(BATCH_KEYS)}")
  shape = jnp.shape(batch["input_ids"])
  for k in BATCH_KEYS:
    if jnp.shape(batch[k]) != shape or len(shape) != 2:
      raise ValueError(f"batch[{k!r}] has shape {jnp.shape(batch[k])}; every entry must be [batch, seq] = {shape}")
  if shape[0] % step_cfg.grad_accum:
    raise ValueError(f"batch size {shape[0]} is not a multiple of grad_accum={step_cfg.grad_accum}")
  for k in ("input_ids", "targets"):
    if not isinstance(batch[k], jax.core.Tracer):
      ids = jnp.asarray(batch[k])
      if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= model_config.vocab_size):
        raise ValueError(f"batch[{k!r}] holds ids outside the model's vocabulary [0, {model_config.vocab_size})")


def _loss_sums(logits_BTV, targets_BT, mask_BT):
  """(summed cross entropy, summed squared logsumexp) over the scored tokens, in fp32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return ((lse_BT - target_logit_BT) * mask_BT).sum(), (lse_BT**2 * mask_BT).sum()


def _chunked_loss_sums(head: Callable, h_BTD, targets_BT, mask_BT, chunk: int):
  """`_loss_sums(head(h_BTD), ...)` over `chunk` positions at a time (C = chunk, at most T; N chunks; T is padded
  with unscored positions to N * C: a C that divides T wastes nothing). A scan keeps one chunk's logits alive, and
  jax.checkpoint has the backward pass recompute them from the chunk's hidden states rather than keep every chunk's."""
  B, T = h_BTD.shape[:2]
  chunk = min(chunk, T)  # a longer chunk would only compute padding
  N = -(-T // chunk)
  pad = ((0, 0), (0, N * chunk - T))
  by_chunk = lambda x_BT: jnp.pad(x_BT, pad + ((0, 0),) * (x_BT.ndim - 2)).reshape(
      B, N, chunk, *x_BT.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def add_chunk(sums, chunk_inputs):
    h_BCD, targets_BC, mask_BC = chunk_inputs
    return jax.tree.map(jnp.add, sums, _loss_sums(head(h_BCD), targets_BC, mask_BC)), None

  zero = jnp.zeros((), jnp.float32)
  return jax.lax.scan(add_chunk, (zero, zero), (by_chunk(h_BTD), by_chunk(targets_BT), by_chunk(mask_BT)))[0]


def _micro_loss(trainer: Trainer, params, biases, micro: dict, num_scored):
  """Summed losses of one micro-batch divided by the whole batch's scored-token count, and its routing."""
  model = trainer.merge(params, biases)
  mask_BT = micro["loss_mask"].astype(jnp.float32)
  chunk = trainer.step_config.logits_chunk
  if chunk:
    h_BTD, router = model.hidden_states(micro["input_ids"], micro["segment_ids"])
    out = ZayaOutput(None, router)
    ce_sum, z_sum = _chunked_loss_sums(model.logits, h_BTD, micro["targets"], mask_BT, chunk)
  else:
    out = model(micro["input_ids"], micro["segment_ids"])
    ce_sum, z_sum = _loss_sums(out.logits_BTV, micro["targets"], mask_BT)
  valid_BT = micro["segment_ids"] > 0
  L, B, T = out.router.choice_LBT.shape
  X1 = trainer.model_config.moe.num_router_classes
  onehot_LBTX1 = jax.nn.one_hot(out.router.choice_LBT, X1, dtype=jnp.int32) * valid_BT[None, ..., None]
  counts_LX1 = onehot_LBTX1.sum((1, 2))
  probs_LMX1 = out.router.probs_LBTX1.reshape(L, B * T, X1).astype(jnp.float32)
  entropy_sum_L = (-(probs_LMX1 * jnp.log(jnp.maximum(probs_LMX1, 1e-12))).sum(-1) * valid_BT.reshape(-1)).sum(-1)
  loss = (ce_sum + trainer.step_config.z_loss_weight * z_sum) / num_scored
  aux = jnp.zeros((), jnp.float32)
  if trainer.balancing.mode == "aux_loss":
    # Per micro-batch, as Megatron-LM does: each micro-batch's load fractions times its mean probabilities,
    # averaged. A product of means is not the mean of products, so with grad_accum > 1 this is not the one-batch
    # loss (its router gradients differ), unlike the cross entropy; the whole batch's load would cost a routing pass.
    aux = balancing.aux_loss(probs_LMX1, out.router.choice_LBT.reshape(L, B * T), valid_BT.reshape(-1))
    loss = loss + trainer.balancing.aux_loss_weight * aux / trainer.step_config.grad_accum
  stats = dict(ce_sum=ce_sum, z_sum=z_sum, counts_LX1=counts_LX1, entropy_sum_L=entropy_sum_L,
               valid=valid_BT.sum(), aux=aux / trainer.step_config.grad_accum)
  if trainer.extra_loss is not None:
    extra = jnp.asarray(trainer.extra_loss(model, out, micro), jnp.float32) / trainer.step_config.grad_accum
    loss, stats["extra"] = loss + extra, extra
  return loss, stats


def split_micro_batches(batch: dict, A: int) -> dict:
  """Each [B, T] entry as [A, B / A, T], micro-batch a holding rows a, a + A, a + 2A, ...

  A device holds a contiguous block of the batch's rows; strided micro-batches take the same number of rows from
  every block, so each micro-batch is split over the batch axes as the whole batch is. Contiguous ones each sat on a
  few devices: on 128 devices with A = 8, 8 rows per device of one micro-batch, 8x the activations (ZAYA1-8B:
  40.5 GiB of temporaries for one layer, against 17.3) and the compute, while the other devices waited."""
  return jax.tree.map(
      lambda x: constrain(x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), (None, "batch", None)), batch)


def train_step(trainer: Trainer, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimizer step over `batch` (A micro-batches accumulated in a scan). Pure; jit it with `jit_train_step`."""
  A = trainer.step_config.grad_accum
  num_scored = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
  grad_fn = jax.value_and_grad(functools.partial(_micro_loss, trainer), has_aux=True)

  # On a ZeRO-1 mesh the gradients (and their accumulator) take the optimizer state's layout (constrain_gradients).
  if A == 1:
    (loss, stats), grads = grad_fn(state.params, state.biases, batch, num_scored)
    grads = constrain_gradients(grads)
  else:
    micro_batches = split_micro_batches(batch, A)

    def accumulate(carry, micro):
      (loss, stats), grads = grad_fn(state.params, state.biases, micro, num_scored)
      loss, stats, grads = jax.tree.map(jnp.add, carry, (loss, stats, grads))
      return (loss, stats, constrain_gradients(grads)), None

    zero = jax.eval_shape(lambda m: grad_fn(state.params, state.biases, m, num_scored),
                          jax.tree.map(lambda x: x[0], micro_batches))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[0][0], zero[0][1], zero[1]))
    zero = (*zero[:2], constrain_gradients(zero[2]))
    (loss, stats, grads), _ = jax.lax.scan(accumulate, zero, micro_batches)

  updates, opt_state = trainer.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  biases, pid = state.biases, state.pid
  if trainer.balancing.mode == "pid":
    names = sorted(nnx.to_flat_state(state.biases), key=lambda kv: _layer_index(kv[0]))
    biases_LX1 = jnp.stack([v[...] for _, v in names])
    biases_LX1, pid = balancing.pid_update(trainer.balancing, state.pid, biases_LX1, stats["counts_LX1"])
    biases = _set_biases(state.biases, biases_LX1)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  key = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.key))[0])
  new_state = TrainState(state.step + 1, params, biases, opt_state, pid, key)
  # A non-finite step must leave nothing behind: the old state passes through unchanged.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)

  valid = jnp.maximum(stats["valid"], 1).astype(jnp.float32)
  metrics = dict(
      loss=loss, ce_loss=stats["ce_sum"] / num_scored, z_loss=stats["z_sum"] / num_scored, aux_loss=stats["aux"],
      grad_norm=grad_norm, finite=finite, scored_tokens=num_scored, router_entropy=stats["entropy_sum_L"] / valid,
      **balancing.routing_metrics(stats["counts_LX1"]))
  if "extra" in stats:
    metrics["extra_loss"] = stats["extra"]
  return new_state, metrics


def _layer_index(path) -> int:
  """Layer number in a path like ('model', 'layers', 3, 'mlp', 'gate', 'balancing_biases')."""
  return int(path[list(path).index("layers") + 1])


def _set_biases(biases: nnx.State, biases_LX1) -> nnx.State:
  flat = nnx.to_flat_state(biases)
  updated = [(path, var.replace(biases_LX1[_layer_index(path)])) for path, var in flat]
  return nnx.from_flat_state(updated)


# XLA:CPU removes jax.checkpoint's optimization barriers right after its first common-subexpression pass, and its
# later passes then merge a layer's recomputation (model.remat) back into the forward pass: remat would keep as much
# as without it. GPU compilers remove the barriers only after scheduling. Disabling that one pass has the CPU keep
# them too (the tiny model's train step on 8 x 128 tokens with remat "full": 28.8 -> 15.0 MiB of temporaries, 29.4
# without remat); a program without barriers compiles to the same code either way. (The chunked loss saves memory
# without it: its chunks are a scan.)
_CPU_KEEPS_CHECKPOINTS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def step_compiler_options(platform: str) -> dict[str, str] | None:
  """XLA options for a train step compiled for `platform` ("cpu", "gpu", ...; a jax.Device's `.platform`)."""
  return _CPU_KEEPS_CHECKPOINTS if platform == "cpu" else None


@functools.cache
def train_step_program(platform: str) -> Callable:
  """`train_step` jitted for `platform` (the trainer static, the state donated): `.lower(...)` it to inspect."""
  return jax.jit(train_step, static_argnums=0, donate_argnums=1, compiler_options=step_compiler_options(platform))


def jit_train_step(trainer: Trainer, state: TrainState, batch: dict):
  """One jitted train step, compiled for the platform of the state's arrays (once per trainer and shapes)."""
  on_device = isinstance(state.step, jax.Array) and not isinstance(state.step, jax.core.Tracer)
  platform = next(iter(state.step.devices())).platform if on_device else jax.default_backend()
  return train_step_program(platform)(trainer, state, batch)


def eval_loss(trainer: Trainer, state: TrainState, batch: dict):
  """(summed cross entropy over scored tokens, scored tokens) of one batch; jit with `jit_eval_loss`."""
  stats = _micro_loss(trainer, state.params, state.biases, batch, 1.0)[1]
  return stats["ce_sum"], batch["loss_mask"].astype(jnp.float32).sum()


jit_eval_loss = jax.jit(eval_loss, static_argnums=0)


def create_from_hf(path: str, model_config: ZayaConfig, opt_cfg: OptimizerConfig, step_cfg: StepConfig,
                   bal_cfg: BalancingConfig, total_steps: int, seed: int, *,
                   state_shardings: Callable[[TrainState], Any] | None = None) -> tuple[Trainer, TrainState]:
  """The trainer and a state at step 0 whose parameters and balancing biases are a Hugging Face checkpoint's
  (continued pretraining, fine-tuning); optimizer moments, controller state and key start fresh.

  The folder's architecture must be `model_config`'s (dtypes and backends may differ: tensors are converted to
  `param_dtype`). Each tensor is placed on its sharding as it is read (`load_hf_into`) and becomes the state's own
  array, so no device and no host ever holds more than its part of the parameters plus one tensor.
  """
  from zaya_jax.checkpoint.hf import load_hf_into

  trainer, abstract = create_abstract(model_config, opt_cfg, step_cfg, bal_cfg, total_steps, seed)
  shardings = None if state_shardings is None else state_shardings(abstract)
  params, biases = abstract.params, abstract.biases
  load_hf_into(path, model_config, (params, biases),
               None if shardings is None else (shardings.params, shardings.biases))

  # The rest of the state (optimizer moments, controller, key) in one program; the loaded arrays are not copied
  # (a donation would not avoid that on CPU, where the arrays share the host buffers they were read into).
  def rest(p, b) -> TrainState:
    return init_state(trainer, p, b, seed)._replace(params=None, biases=None)
  out = None if shardings is None else shardings._replace(params=None, biases=None)
  return trainer, jax.jit(rest, out_shardings=out)(params, biases)._replace(params=params, biases=biases)
