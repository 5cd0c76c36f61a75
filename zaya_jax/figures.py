"""Model figures computed abstractly (`nnx.eval_shape`: nothing is allocated).

Used by the demo and asserted by tests for ZAYA1-8B: parameter counts, active parameters per token,
and the decode cache a sequence carries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zaya_jax.config import ZayaConfig
from zaya_jax.model.decoder import abstract_model


@dataclasses.dataclass(frozen=True)
class ModelFigures:
  total_params: int  # unique trainable parameters (tied head counted once)
  embedding_params: int
  expert_params: int  # all experts of all layers
  active_params: int  # per token, excluding the embedding: one expert per layer (top-1)
  active_params_with_embedding: int  # plus the embedding and an untied LM head
  kv_cache_bytes_per_token: int  # all layers, what the decode cache grows by per token (CCA: keys and values)
  mha_kv_cache_bytes_per_token: int  # the same for full multi-head attention with hidden/head_dim heads
  recurrent_state_bytes_per_sequence: int  # the part that does not grow (CCA: conv state + delayed value), all layers

  @property
  def kv_compression(self) -> float:
    return self.mha_kv_cache_bytes_per_token / self.kv_cache_bytes_per_token


def model_figures(cfg: ZayaConfig) -> ModelFigures:
  abstract = abstract_model(cfg)
  sizes = {".".join(map(str, path)): int(np.prod(var.shape))
           for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  total = sum(sizes.values())
  embedding = sizes["model.embed_tokens.weight"] + sizes.get("lm_head.weight", 0)
  experts = sum(n for key, n in sizes.items() if ".mlp.experts." in key)
  X = cfg.moe.num_experts
  active = total - embedding - experts + experts // X
  kv, state = decode_state_bytes(cfg)
  mha_heads = cfg.hidden_size // cfg.attention.head_dim
  mha = cfg.num_layers * 2 * mha_heads * cfg.attention.head_dim * jnp.dtype(cfg.dtype).itemsize
  # The embedding rows a token reads and, untied, the LM head it multiplies by (tied: the same matrix, once).
  return ModelFigures(total, embedding, experts, active, active + embedding, kv, mha, state)


def decode_state_bytes(cfg: ZayaConfig) -> tuple[int, int]:
  """(bytes per cached token, bytes per sequence that do not grow) of one row's decode state, all layers, from the
  state's own structure (abstractly), so that every attention kind's cache is counted as it is stored."""
  from zaya_jax.infer.decode import init_state  # decode imports the model; figures is imported by the model's users

  def layer_bytes(max_len: int) -> int:
    state = jax.eval_shape(lambda: init_state(cfg, 1, max_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.layers))

  one, two = layer_bytes(1), layer_bytes(2)
  return two - one, 2 * one - two
