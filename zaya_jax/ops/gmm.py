"""Grouped matmul behind a backend switch: the one entry point for expert compute.

`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G])`: rows of `lhs` are sorted by group; rows
`[offset_g, offset_g + group_sizes[g])` are multiplied by `rhs[g]`. Rows past `sum(group_sizes)`
belong to no group and come out as zeros. With `transpose_rhs=True`, `rhs` is [G, N, K] (PyTorch's
Linear layout) and is contracted on its last dim without materialising a transpose.
Accumulation is fp32; the result is rounded once to `lhs.dtype`.

Backends:
- "tiled": loops over groups and, inside each, over fixed-size row tiles that hold its rows, so only
  the routed rows are multiplied (the CPU default). Reverse-mode autodiff through a custom VJP whose
  weight gradient ("tgmm") is tiled the same way.
- "ragged_dot": `jax.lax.ragged_dot_general`. XLA:CPU lowers it to a dense contraction over every
  group (G times the useful FLOPs); on GPU it maps to grouped GEMM libraries where XLA has them.
- "dense": a per-row gather of the group's matrix; a reference for tests only (memory M*K*N).
- "pallas": `pallas_kernels.gmm`, the Pallas-Triton kernel (the GPU default; interpret mode on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zaya_jax.config import EXPERT_BACKENDS

F32 = jnp.float32
TILE_ROWS = 64  # rows per tile of the "tiled" backend; at most G * (TILE_ROWS - 1) rows of waste


def _contract(x_TK, w, transpose_rhs: bool):
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x_TK, w, dims, preferred_element_type=F32)


def _group_bounds(group_sizes_G):
  ends_G = jnp.cumsum(group_sizes_G)
  return ends_G - group_sizes_G, ends_G


def _tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool, tile: int):
  N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  starts_G, ends_G = _group_bounds(group_sizes_G)
  # A tile that would run past the last row is moved back to end there instead (its rows before the group keep
  # what they hold), so the operand needs no padded copy unless it is shorter than a tile.
  M = lhs_MK.shape[0]
  lhs_PK = jnp.pad(lhs_MK, ((0, tile - M), (0, 0))) if M < tile else lhs_MK
  P = lhs_PK.shape[0]

  def row_tile(g, w, t, out_PN):
    r0 = starts_G[g] + t * tile
    start = jnp.minimum(r0, P - tile)
    y_TN = _contract(jax.lax.dynamic_slice_in_dim(lhs_PK, start, tile, 0), w, transpose_rhs).astype(lhs_MK.dtype)
    r_T = start + jnp.arange(tile)
    mine_T = (r_T >= r0) & (r_T < ends_G[g])
    kept_TN = jax.lax.dynamic_slice_in_dim(out_PN, start, tile, 0)
    return jax.lax.dynamic_update_slice_in_dim(out_PN, jnp.where(mine_T[:, None], y_TN, kept_TN), start, 0)

  def group(g, out_PN):
    w = jax.lax.dynamic_index_in_dim(rhs, g, 0, keepdims=False).astype(lhs_MK.dtype)
    return jax.lax.fori_loop(0, (group_sizes_G[g] + tile - 1) // tile, functools.partial(row_tile, g, w), out_PN)

  return jax.lax.fori_loop(0, rhs.shape[0], group, jnp.zeros((P, N), lhs_MK.dtype))[:M]


def _tiled_tgmm(lhs_MK, dout_MN, group_sizes_G, rhs_shape, rhs_dtype, transpose_rhs: bool, tile: int):
  """Weight gradient: per group, the sum over its rows of lhs^T @ dout, accumulated in fp32."""
  K, N = lhs_MK.shape[1], dout_MN.shape[1]
  starts_G, ends_G = _group_bounds(group_sizes_G)
  lhs_PK = jnp.pad(lhs_MK, ((0, tile), (0, 0)))
  dout_PN = jnp.pad(dout_MN, ((0, tile), (0, 0)))

  def group(g, grad):
    def row_tile(t, acc_KN):
      r0 = starts_G[g] + t * tile
      mine_T = r0 + jnp.arange(tile) < ends_G[g]
      x_TK = jnp.where(mine_T[:, None], jax.lax.dynamic_slice_in_dim(lhs_PK, r0, tile, 0), 0)
      dy_TN = jax.lax.dynamic_slice_in_dim(dout_PN, r0, tile, 0)
      return acc_KN + jax.lax.dot_general(x_TK, dy_TN, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    acc_KN = jax.lax.fori_loop(0, (group_sizes_G[g] + tile - 1) // tile, row_tile, jnp.zeros((K, N), F32))
    return grad.at[g].set(acc_KN.T if transpose_rhs else acc_KN)

  return jax.lax.fori_loop(0, rhs_shape[0], group, jnp.zeros(rhs_shape, F32)).astype(rhs_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool = False, tile: int = TILE_ROWS):
  return _tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile)


def _tiled_gmm_fwd(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile):
  return _tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile), (lhs_MK, rhs, group_sizes_G)


def _tiled_gmm_bwd(transpose_rhs, tile, residuals, dout_MN):
  lhs_MK, rhs, group_sizes_G = residuals
  dout_MN = dout_MN.astype(lhs_MK.dtype)
  dlhs_MK = _tiled_gmm(dout_MN, rhs, group_sizes_G, not transpose_rhs, tile)
  drhs = _tiled_tgmm(lhs_MK, dout_MN, group_sizes_G, rhs.shape, rhs.dtype, transpose_rhs, tile)
  return dlhs_MK, drhs, None


tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


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


def _pallas(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool):
  from pallas_kernels.gmm import gmm as pallas_gmm  # imported on use: Triton-backend deprecation warnings

  return pallas_gmm(lhs_MK, rhs, group_sizes_G.astype(jnp.int32), transpose_rhs)


_BACKENDS = {
    "tiled": lambda lhs, rhs, gs, t: tiled_gmm(lhs, rhs, gs.astype(jnp.int32), t),
    "ragged_dot": _ragged_dot,
    "dense": _dense,
    "pallas": _pallas,  # Pallas-Triton kernel; interpret mode on CPU (slow: for tests)
}
assert set(_BACKENDS) | {"auto"} == set(EXPERT_BACKENDS)


def resolve_backend(backend: str) -> str:
  """"auto" picks by platform: the Pallas kernel on GPU, tiled on CPU (XLA:CPU's ragged_dot is dense)."""
  if backend != "auto":
    return backend
  return "tiled" if jax.default_backend() == "cpu" else "pallas"


def gmm(lhs_MK, rhs, group_sizes_G, *, backend: str = "auto", transpose_rhs: bool = False):
  return _BACKENDS[resolve_backend(backend)](lhs_MK, rhs, group_sizes_G, transpose_rhs)
