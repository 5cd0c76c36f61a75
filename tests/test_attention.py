"""The xla attention backend: skipping the keys a causal mask hides changes nothing."""

import jax.numpy as jnp
import numpy as np
import pytest

from zaya_jax.ops.attention import causal_mask, xla_attention


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T, window", [(11, None), (256, None), (300, 37)])
def test_causal_block_skipping_matches_full_square(dtype, T, window):
  rng = np.random.default_rng(T)
  B, H, K, E = 2, 4, 2, 16
  q = jnp.asarray(3 * rng.standard_normal((B, T, H, E)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, E)), dtype) for _ in range(2))
  segment_ids = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.02, axis=1), jnp.int32)  # packed documents
  mask = causal_mask(segment_ids, window)
  full = np.asarray(xla_attention(q, k, v, mask).astype(jnp.float32))
  skipped = np.asarray(xla_attention(q, k, v, mask, causal=True).astype(jnp.float32))
  # Softmax sums over fewer (only zero-probability) keys: at most a last-bit fp32 change in a few entries.
  np.testing.assert_allclose(skipped, full, rtol=1e-5, atol=1e-5)
