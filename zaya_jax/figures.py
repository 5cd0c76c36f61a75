"""Model figures computed abstractly (`nnx.eval_shape`: nothing is allocated).

Used by the demo and asserted by tests for ZAYA1-8B: parameter counts, active parameters per token,
and the decode cache a sequence carries.
"""

from __future__ import annotations

import dataclasses

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
  active_params_with_embedding: int
  kv_cache_bytes_per_token: int  # all layers, keys and values, compute dtype
  mha_kv_cache_bytes_per_token: int  # the same for full multi-head attention with hidden/head_dim heads
  recurrent_state_bytes_per_sequence: int  # conv state (raw q|k context) + delayed value, all layers

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
  att = cfg.attention
  itemsize = jnp.dtype(cfg.dtype).itemsize
  kv = cfg.num_layers * 2 * att.num_kv_heads * att.head_dim * itemsize
  mha_heads = cfg.hidden_size // att.head_dim
  mha = cfg.num_layers * 2 * mha_heads * att.head_dim * itemsize
  state = cfg.num_layers * (att.conv_channels * att.conv_context + att.num_kv_heads * att.head_dim // 2) * itemsize
  return ModelFigures(total, embedding, experts, active, active + sizes["model.embed_tokens.weight"], kv, mha, state)
