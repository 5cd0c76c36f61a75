"""Grouped matmul behind a backend switch: the one entry point for expert compute.

`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G])`: rows of `lhs` are sorted by group; rows
`[offset_g, offset_g + group_sizes[g])` are multiplied by `rhs[g]`. Rows past `sum(group_sizes)`
belong to no group and come out as zeros. With `transpose_rhs=True`, `rhs` is [G, N, K] (PyTorch's
Linear layout) and is contracted on its last dim without materialising a transpose.
Accumulation is fp32; the result is rounded once to `lhs.dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya_jax.config import EXPERT_BACKENDS

F32 = jnp.float32


def _ragged_dot(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool):
  contract_rhs = 2 if transpose_rhs else 1
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((1,), (contract_rhs,)), ((), ())),
      lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))
  out = jax.lax.ragged_dot_general(lhs_MK, rhs.astype(lhs_MK.dtype), group_sizes_G.astype(jnp.int32), dims,
                                   preferred_element_type=F32)
  return out.astype(lhs_MK.dtype)


def _dense(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool):
  """Reference: every row against its group's matrix, gathered per row (memory M*K*N; tests only)."""
  M = lhs_MK.shape[0]
  ends_G = jnp.cumsum(group_sizes_G)
  group_M = jnp.searchsorted(ends_G, jnp.arange(M), side="right")
  in_group_M = group_M < rhs.shape[0]
  rhs_MKN = jnp.take(rhs.astype(lhs_MK.dtype), jnp.minimum(group_M, rhs.shape[0] - 1), axis=0)
  spec = "mk,mnk->mn" if transpose_rhs else "mk,mkn->mn"
  out = jnp.einsum(spec, lhs_MK, rhs_MKN, preferred_element_type=F32)
  return jnp.where(in_group_M[:, None], out, 0.0).astype(lhs_MK.dtype)


_BACKENDS = {"ragged_dot": _ragged_dot, "dense": _dense}
assert set(_BACKENDS) == set(EXPERT_BACKENDS)


def gmm(lhs_MK, rhs, group_sizes_G, *, backend: str = "ragged_dot", transpose_rhs: bool = False):
  return _BACKENDS[backend](lhs_MK, rhs, group_sizes_G, transpose_rhs)
