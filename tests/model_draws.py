"""Draws for model values that a fresh model leaves degenerate (shared by tests and tests/sharding_worker.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


def with_key_temperatures(module, seed: int):
  """`module` with its CCA key temperatures drawn in [0.25, 1). They start at 0 (as the reference's do), which makes
  every attention score 0: the output, and the gradients of the projections and convs before the scores, would not
  depend on the query and key path."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(module):
    if hasattr(node, "qk_norm"):
      node.qk_norm.temp[...] = jnp.asarray(rng.uniform(0.25, 1.0, node.qk_norm.temp.shape), jnp.float32)
  return module
