"""The ZAYA1 decoder: embedding affine, N x [norm -> CCA -> residual scaling -> norm -> MoE -> residual
scaling] on an fp32 residual stream, final norm, tied LM head.

B batch, T sequence, D hidden, V vocab, L layers, X1 router classes (experts + skip slot).
The module tree mirrors the Hugging Face names: the dotted path of every parameter is its checkpoint key.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import FLASH_ATTENTION_RESIDUALS
from zaya_jax.config import ZayaConfig
from zaya_jax.model.attention_kinds import attention_module
from zaya_jax.model.layers import F32, Linear, ResidualAdd, ResidualScaling, RMSNorm, const_param, linear, normal_param
from zaya_jax.model.moe import SparseMoeBlock
from zaya_jax.ops import gmm as gmm_ops
from zaya_jax.sharding import constrain


class RouterStats(NamedTuple):
  """What training needs from the routers, stacked over layers."""

  probs_LBTX1: jax.Array  # router probabilities, compute dtype
  choice_LBT: jax.Array  # chosen class; == num_experts means the skip slot
  counts_LX1: jax.Array  # tokens per class (experts then skip) in each layer


class ZayaOutput(NamedTuple):
  logits_BTV: jax.Array
  router: RouterStats


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ZayaConfig, layer_idx: int, rngs: nnx.Rngs):
    D, pd, std, eps = cfg.hidden_size, cfg.params_dtype, cfg.initializer_range, cfg.rms_norm_eps
    self.input_layernorm = RMSNorm(D, eps=eps, param_dtype=pd)
    self.self_attn = attention_module(cfg.attention, D, cfg.layer_type(layer_idx), std=std, param_dtype=pd,
                                      rngs=rngs)
    merge = ResidualScaling if cfg.residual_scaling else ResidualAdd
    self.post_attention_residual_scale = merge(D, param_dtype=pd)
    self.post_attention_layernorm = RMSNorm(D, eps=eps, param_dtype=pd)
    self.mlp = SparseMoeBlock(cfg.moe, D, layer_idx, eps=eps, std=std, param_dtype=pd, rngs=rngs)
    self.post_mlp_residual_scale = merge(D, param_dtype=pd)
    self.dtype = cfg.compute_dtype

  def __call__(self, x_BTD, router_state_BTR, segment_ids_BT, positions_BT):
    a_BTD = self.self_attn(self.input_layernorm(x_BTD.astype(self.dtype)), segment_ids_BT, positions_BT)
    return self.after_attention(a_BTD, x_BTD, router_state_BTR)

  def extend(self, x_BTD, router_state_BTR, positions_BT, num_new_B, cache, fresh: bool = False):
    """The cached path (see model/attention_kinds.py): (x, router state, routing, updated cache)."""
    a_BTD, cache = self.self_attn.extend(self.input_layernorm(x_BTD.astype(self.dtype)), positions_BT, num_new_B,
                                         cache, fresh)
    return *self.after_attention(a_BTD, x_BTD, router_state_BTR), cache

  def after_attention(self, a_BTD, x_BTD, router_state_BTR):
    """Residual merge of the attention output, then the MoE half of the layer."""
    x_BTD = self.post_attention_residual_scale(a_BTD, x_BTD)
    h = self.post_attention_layernorm(x_BTD.astype(self.dtype))
    m, router_state_BTR, routing = self.mlp(h, router_state_BTR)
    return self.post_mlp_residual_scale(m, x_BTD), router_state_BTR, routing


class Embedding(nnx.Module):

  def __init__(self, vocab: int, dim: int, *, std: float, pad_token_id: int | None, param_dtype, rngs: nnx.Rngs):
    self.weight = normal_param(rngs, (vocab, dim), std, param_dtype, ("vocab", "embed"))
    if pad_token_id is not None and 0 <= pad_token_id < vocab:
      self.weight[...] = self.weight[...].at[pad_token_id].set(0)


class ZayaModel(nnx.Module):

  def __init__(self, cfg: ZayaConfig, rngs: nnx.Rngs):
    D, pd = cfg.hidden_size, cfg.params_dtype
    self.embed_tokens = Embedding(cfg.vocab_size, D, std=cfg.initializer_range, pad_token_id=cfg.pad_token_id,
                                  param_dtype=pd, rngs=rngs)
    self.input_hidden_states_scale = const_param((D,), 1.0, pd, ("embed",))
    self.input_hidden_states_bias = const_param((D,), 0.0, pd, ("embed",))
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pd)
    self.cfg = cfg

  def embed(self, input_ids_BT):
    """The fp32 residual stream entering layer 0."""
    dtype = self.cfg.compute_dtype
    e_BTD = jnp.take(self.embed_tokens.weight[...].astype(dtype), input_ids_BT, axis=0)
    return ((e_BTD + self.input_hidden_states_bias[...].astype(dtype))
            * self.input_hidden_states_scale[...].astype(dtype)).astype(F32)

  def __call__(self, input_ids_BT, segment_ids_BT, positions_BT):
    dtype = self.cfg.compute_dtype
    # `constrain` pins the residual stream to the batch axes on a mesh (zaya_jax.sharding); a no-op otherwise.
    x_BTD = constrain(self.embed(input_ids_BT), ("batch", None, None))
    router_state = None
    probs, choices = [], []
    run_layer = _rematerialised(self.cfg.remat)
    for layer in self.layers:
      x_BTD, router_state, (p, c) = run_layer(layer, x_BTD, router_state, segment_ids_BT, positions_BT)
      x_BTD = constrain(x_BTD, ("batch", None, None))
      probs.append(p)
      choices.append(c)
    choice_LBT = jnp.stack(choices)
    num_classes = self.cfg.moe.num_router_classes
    counts_LX1 = jax.vmap(lambda c: jnp.bincount(c.reshape(-1), length=num_classes))(choice_LBT)
    return self.norm(x_BTD.astype(dtype)), RouterStats(jnp.stack(probs), choice_LBT, counts_LX1)


def _run_layer(layer: DecoderLayer, x_BTD, router_state_BTR, segment_ids_BT, positions_BT):
  return layer(x_BTD, router_state_BTR, segment_ids_BT, positions_BT)


_REMAT_SAVES = {"full": jax.checkpoint_policies.nothing_saveable,
                # The projections' and the router's matmuls, the experts' grouped matmuls (named by ops.gmm) and
                # what the flash attention kernel's backward pass needs from its forward (named by the kernel).
                "dots": jax.checkpoint_policies.save_from_both_policies(
                    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                    jax.checkpoint_policies.save_only_these_names(gmm_ops.OUTPUT_NAME, *FLASH_ATTENTION_RESIDUALS))}


def _rematerialised(remat: str):
  """`_run_layer`, under jax.checkpoint unless remat is "none": what the backward pass of a layer keeps beyond its
  inputs is what the policy saves, the rest it recomputes. Only differentiation sees it; a plain forward computes
  the same values either way."""
  if remat == "none":
    return _run_layer

  def run_layer(layer: DecoderLayer, *inputs):
    # Explicit split and merge: a layer's forward only reads its variables, so nothing needs writing back (nnx.remat
    # would write the state back to variables that may belong to another trace, e.g. constant balancing biases).
    graphdef, state = nnx.split(layer)
    pure = lambda state, *inputs: _run_layer(nnx.merge(graphdef, state), *inputs)
    return jax.checkpoint(pure, policy=_REMAT_SAVES[remat])(state, *inputs)
  return run_layer


def _document_starts(segment_ids_BT):
  """bool [B, T]: where a document (a contiguous run of equal ids) begins."""
  return jnp.concatenate(
      [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def positions_from_segments(segment_ids_BT):
  """Position of each token within its document (documents are contiguous runs of equal ids)."""
  T = segment_ids_BT.shape[1]
  t_BT = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
  start_index_BT = jax.lax.cummax(jnp.where(_document_starts(segment_ids_BT), t_BT, 0), axis=1)
  return t_BT - start_index_BT


def document_numbers(segment_ids_BT):
  """int32 [B, T]: each token's document as the count of runs before it. Attention and the convolutions compare
  these, so an id that comes back after another document (1 1 2 1) starts a new document, as the positions do,
  instead of joining the first run's attention."""
  return jnp.cumsum(_document_starts(segment_ids_BT), axis=1, dtype=jnp.int32)


def check_token_ids(input_ids, vocab_size: int) -> None:
  """Raises on ids outside [0, vocab_size); a no-op on traced values (check before jit)."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  ids = np.asarray(input_ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    raise ValueError(f"input_ids contain {bad.size} id(s) outside the vocabulary [0, {vocab_size}), "
                     f"e.g. {bad.ravel()[:5].tolist()}")


class ZayaForCausalLM(nnx.Module):
  """ZAYA1 causal LM. `model(input_ids_BT, segment_ids_BT=None, positions_BT=None) -> ZayaOutput`.

  `rngs=None` fills the random weights with zeros instead: only for `abstract_model` (shapes, then loading).

  `segment_ids` marks packed documents (contiguous runs of equal ids); positions then restart at
  each document unless given. Logits are in the compute dtype, as in the reference.
  """

  def __init__(self, cfg: ZayaConfig, *, rngs: nnx.Rngs | None):
    self.model = ZayaModel(cfg, rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, bias=False, std=cfg.initializer_range, param_dtype=cfg.params_dtype,
        rngs=rngs, axes=("vocab", "embed"))
    self.config = cfg

  def __call__(self, input_ids_BT, segment_ids_BT=None, positions_BT=None) -> ZayaOutput:
    h_BTD, router = self.hidden_states(input_ids_BT, segment_ids_BT, positions_BT)
    return ZayaOutput(self.logits(h_BTD), router)

  def hidden_states(self, input_ids_BT, segment_ids_BT=None, positions_BT=None) -> tuple[jax.Array, RouterStats]:
    """(final-norm outputs [B, T, D] in the compute dtype, router stats): the forward without the LM head, for
    callers that apply `logits` piece by piece (the train step's chunked loss)."""
    check_token_ids(input_ids_BT, self.config.vocab_size)
    input_ids_BT = jnp.asarray(input_ids_BT, jnp.int32)
    if input_ids_BT.ndim != 2 or input_ids_BT.shape[1] == 0:
      raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {input_ids_BT.shape}")
    if segment_ids_BT is None:
      segment_ids_BT = jnp.zeros_like(input_ids_BT)
    elif jnp.shape(segment_ids_BT) != input_ids_BT.shape:
      raise ValueError(f"segment_ids shape {jnp.shape(segment_ids_BT)} != input_ids shape {input_ids_BT.shape}")
    segment_ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
    if positions_BT is None:
      positions_BT = positions_from_segments(segment_ids_BT)
    return self.model(input_ids_BT, document_numbers(segment_ids_BT), positions_BT)

  def logits(self, h_BTD):
    """The LM head (tied to the embedding unless the config unties it) on final-norm outputs."""
    head = self.model.embed_tokens if self.lm_head is None else self.lm_head
    return constrain(linear(h_BTD, head.weight[...]), ("batch", None, "vocab"))


# Round every bf16 intermediate as the reference does: by default XLA may keep fused intermediates in fp32 ("excess
# precision"), which moves bf16 logits by a few ulp. (XLA:CPU's YNNPACK fusions of a reduction with its elementwise
# neighbours, from ~512 tokens on, skip bf16 roundings even so: `layers.rounded` keeps the qk normalisation's out of
# them. Restricting YNNPACK to plain dots instead also worked, but XLA's own reductions then met torch's summation
# order less often: 30% of the sliding parity config's positions more than 1 bf16 ulp off at 32 tokens, against none.)
EXACT_ROUNDING = {"xla_allow_excess_precision": False}


# nnx modules are pytrees: jit flattens the model on each call (under a millisecond, where `nnx.split` walks the
# graph in Python for several), so every call sees the current parameter values, and a change of structure or of
# a static attribute retraces instead of reusing a stale program.
@functools.partial(jax.jit, compiler_options=EXACT_ROUNDING)
def _jitted_forward(model, input_ids_BT, segment_ids_BT, positions_BT) -> ZayaOutput:
  return model(input_ids_BT, segment_ids_BT, positions_BT)


def forward(model: ZayaForCausalLM, input_ids_BT, segment_ids_BT=None, positions_BT=None) -> ZayaOutput:
  """The jitted forward, with token ids checked on the host first (compiles once per shape)."""
  check_token_ids(input_ids_BT, model.config.vocab_size)
  return _jitted_forward(model, input_ids_BT, segment_ids_BT, positions_BT)


def abstract_model(cfg: ZayaConfig) -> ZayaForCausalLM:
  """The model's structure with `ShapeDtypeStruct` leaves, nothing allocated.

  Built without random initialisers: tracing flax's RNG counter once per parameter costs time that grows with the
  square of the parameter count (10 s against 0.9 s for ZAYA1-8B).
  """
  return nnx.eval_shape(lambda: ZayaForCausalLM(cfg, rngs=None))
