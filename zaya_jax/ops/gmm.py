"""Grouped matmul behind a backend switch: the one entry point for expert compute.

`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G])`: rows of `lhs` are sorted by group; rows
`[offset_g, offset_g + group_sizes[g])` are multiplied by `rhs[g]`. Rows past `sum(group_sizes)`
belong to no group and come out as zeros. With `transpose_rhs=True`, `rhs` is [G, N, K] (PyTorch's
Linear layout) and is contracted on its last dim without materialising a transpose.
Accumulation is fp32; the result is rounded once to `lhs.dtype`.

Backends:
- "tiled": the CPU default. Picks a strategy from the static shapes (M, G), so each shape compiles one program:
  * M <= G / 3 ("rows"): each row against its own group's matrix, gathered per row: reads M matrices instead of G.
  * M <= SMALL_ROWS_PER_GROUP * G ("capacity"): every group multiplies a fixed block of C rows starting at its first
    row, as one batched matmul over groups (C = the power of two >= 2M/G). XLA:CPU runs these small-M batched dots
    near the speed of reading the weights, while a loop of per-group dots of a few rows costs 3-6x that. A group
    with more than C rows switches (lax.switch/cond) to 2C, 4C, ..., M for M <= 2G, else to the row-tile loop.
  * otherwise ("tiles"): loops over groups and, inside each, over row tiles of about M/G rows, so only the routed
    rows (plus under one tile per group) are multiplied.
  Reverse-mode autodiff through a custom VJP: the input gradient is the same dispatch, the weight gradient
  ("tgmm") is the row-tile loop.
- "ragged_dot": `jax.lax.ragged_dot_general`. XLA:CPU lowers it to a dense contraction over every
  group (G times the useful FLOPs); on GPU it maps to grouped GEMM libraries where XLA has them.
- "dense": a per-row gather of the group's matrix (memory M*K*N); the reference of the tests.
- "pallas": `pallas_kernels.gmm`, the Pallas-Triton kernel (the GPU default; interpret mode on CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.tuning import check_gmm_operands
from zaya_jax.config import EXPERT_BACKENDS

F32 = jnp.float32
# The name of every gmm output, for remat policies (`jax.checkpoint_policies.save_only_these_names`): the grouped
# matmuls are not dot_generals at the jaxpr's top level (custom VJPs, loops, kernels), so dot-saving policies alone
# recompute them in the backward pass.
OUTPUT_NAME = "gmm_output"
# Row tiles of the "tiles" strategy: about M/G rows (the mean group), a power of two in [MIN, MAX]. Measured on the
# 2-core CPU with D=256, F=512, G=8 (gate_up + down): M=256 best at 32-64, M=1024 at 64-128; fewer rows per tile
# pay fori_loop overhead per tile, more multiply up to G * (tile - 1) rows of padding.
MIN_TILE_ROWS, MAX_TILE_ROWS = 8, 128
# The batched "capacity" strategy up to M = 16 * G tokens (G=8: 3.5 ms vs 4.4 ms for the best tile at M=128,
# 7.7 vs 5.9 at M=256, where padding every group to 2M/G rows costs more than the tile loop).
SMALL_ROWS_PER_GROUP = 16


def _pow2_at_least(n: float) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def tile_rows(M: int, G: int) -> int:
  """Rows per tile of the tile loop for M rows over G groups (static)."""
  return min(MAX_TILE_ROWS, max(MIN_TILE_ROWS, _pow2_at_least(M / G)))


def strategy(M: int, G: int) -> str:
  """The "tiled" backend's static choice for M rows over G groups: "rows", "capacity" or "tiles"."""
  if 3 * M <= G:  # gathering a matrix per row reads, writes and rereads it: 3M matrices' traffic vs G
    return "rows"
  return "capacity" if M <= SMALL_ROWS_PER_GROUP * G else "tiles"


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
  starts_G, ends_G = _group_bounds(group_sizes_G)
  lhs_PK = jnp.pad(lhs_MK, ((0, tile), (0, 0)))
  dout_PN = jnp.pad(dout_MN, ((0, tile), (0, 0)))

  def group(g, grad):
    def row_tile(t, acc):
      r0 = starts_G[g] + t * tile
      mine_T = r0 + jnp.arange(tile) < ends_G[g]
      x_TK = jnp.where(mine_T[:, None], jax.lax.dynamic_slice_in_dim(lhs_PK, r0, tile, 0), 0)
      dy_TN = jax.lax.dynamic_slice_in_dim(dout_PN, r0, tile, 0)
      # Accumulated in rhs's own orientation ([N, K] for transpose_rhs), so no transposed copy is written.
      a, b = (dy_TN, x_TK) if transpose_rhs else (x_TK, dy_TN)
      return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    acc = jax.lax.fori_loop(0, (group_sizes_G[g] + tile - 1) // tile, row_tile, jnp.zeros(rhs_shape[1:], F32))
    return jax.lax.dynamic_update_index_in_dim(grad, acc, g, 0)

  return jax.lax.fori_loop(0, rhs_shape[0], group, jnp.zeros(rhs_shape, F32)).astype(rhs_dtype)


def _row_of_group(group_sizes_G, M: int):
  """Per row: its group (G for rows past every group) and its index inside the group."""
  starts_G, ends_G = _group_bounds(group_sizes_G)
  r_M = jnp.arange(M, dtype=ends_G.dtype)
  group_M = jnp.sum(r_M[:, None] >= ends_G[None, :], axis=1)  # G compares per row: cheaper than a binary search
  g_M = jnp.minimum(group_M, group_sizes_G.shape[0] - 1)
  return group_M, g_M, r_M - starts_G[g_M]


def _capacity_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool, capacity: int):
  """Every group against the `capacity` rows from its first row on, one batched matmul; exact while no group has
  more rows than that (rows past a group's end are multiplied and never read)."""
  M, G = lhs_MK.shape[0], rhs.shape[0]
  starts_G, _ = _group_bounds(group_sizes_G)
  rows_GC = jnp.minimum(starts_G[:, None] + jnp.arange(capacity, dtype=starts_G.dtype), M - 1)
  x_GCK = jnp.take(lhs_MK, rows_GC, axis=0)
  w = rhs.astype(lhs_MK.dtype)
  group_M, g_M, pos_M = _row_of_group(group_sizes_G, M)
  pos_M = jnp.minimum(pos_M, capacity - 1)  # rows in no group: any in-range index, zeroed below
  if transpose_rhs:
    # rhs [G, N, K]: with the weights as the left operand XLA:CPU keeps its fast small-M kernel (x @ w^T with a
    # few rows ran ~2-3x slower); the [G, N, C] result is read back per row by the gather, never transposed.
    y_GNC = jax.lax.dot_general(w, x_GCK, (((2,), (2,)), ((0,), (0,))), preferred_element_type=F32)
    y_MN = y_GNC[g_M, :, pos_M]
  else:
    y_GCN = jax.lax.dot_general(x_GCK, w, (((2,), (1,)), ((0,), (0,))), preferred_element_type=F32)
    y_MN = y_GCN[g_M, pos_M]
  return jnp.where((group_M < G)[:, None], y_MN, 0.0).astype(lhs_MK.dtype)


def _gmm_by_shape(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool, tile: int | None):
  """The "tiled" backend's forward (and input gradient): the strategy is static in (M, G); `tile` forces the tile
  loop with that many rows per tile (benchmarks, tests)."""
  M, G = lhs_MK.shape[0], rhs.shape[0]
  if tile is not None:
    return _tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile)
  kind = strategy(M, G)
  if kind == "rows":
    return _dense(lhs_MK, rhs, group_sizes_G, transpose_rhs)
  if kind == "tiles":
    return _tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile_rows(M, G))
  capacity = min(M, _pow2_at_least(2 * M / G))  # twice the mean group: the usual top-1 imbalance fits
  if M <= 2 * G:
    # Few rows: even C = M (G*M rows, all experts dense) beats the tile loop, so a fuller group only doubles C until
    # it fits: one program with a branch per capacity, the smallest that holds the largest group runs.
    capacities = [capacity]
    while capacities[-1] < M:
      capacities.append(min(M, 2 * capacities[-1]))
    if len(capacities) == 1:
      return _capacity_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, capacity)
    branch = jnp.sum(jnp.max(group_sizes_G) > jnp.asarray(capacities[:-1], group_sizes_G.dtype))
    return jax.lax.switch(branch, [functools.partial(_capacity_gmm, capacity=c, transpose_rhs=transpose_rhs)
                                   for c in capacities], lhs_MK, rhs, group_sizes_G)
  # An overfull group: the tile loop (one program holds both).
  return jax.lax.cond(jnp.max(group_sizes_G) <= capacity,
                      functools.partial(_capacity_gmm, capacity=capacity, transpose_rhs=transpose_rhs),
                      functools.partial(_tiled_gmm, transpose_rhs=transpose_rhs, tile=tile_rows(M, G)),
                      lhs_MK, rhs, group_sizes_G)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tiled_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool = False, tile: int | None = None):
  return _gmm_by_shape(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile)


def _tiled_gmm_fwd(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile):
  return _gmm_by_shape(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile), (lhs_MK, rhs, group_sizes_G)


def _tiled_gmm_bwd(transpose_rhs, tile, residuals, dout_MN):
  lhs_MK, rhs, group_sizes_G = residuals
  dout_MN = dout_MN.astype(lhs_MK.dtype)
  dlhs_MK = _gmm_by_shape(dout_MN, rhs, group_sizes_G, not transpose_rhs, tile)
  tgmm_tile = tile or tile_rows(lhs_MK.shape[0], rhs.shape[0])
  drhs = _tiled_tgmm(lhs_MK, dout_MN, group_sizes_G, rhs.shape, rhs.dtype, transpose_rhs, tgmm_tile)
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
  """Every row against its group's matrix, gathered per row (memory M*K*N): the reference of the tests, and the
  "tiled" backend's strategy for M <= G/3 rows."""
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


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """"auto" picks by platform: the Pallas kernel on GPU (Triton: CUDA and ROCm), tiled elsewhere (XLA:CPU's
  ragged_dot is dense; a TPU would need Mosaic kernels). `platform`: resolve for it instead of JAX's default."""
  if backend != "auto":
    if backend not in _BACKENDS:
      raise ValueError(f"unknown gmm backend {backend!r}; one of {EXPERT_BACKENDS}")
    return backend
  return "pallas" if (platform or jax.default_backend()) == "gpu" else "tiled"


def gmm(lhs_MK, rhs, group_sizes_G, *, backend: str = "auto", transpose_rhs: bool = False):
  """[M, N]: each row of lhs [M, K] times its group's matrix of rhs [G, K, N] ([G, N, K] with transpose_rhs); rows
  are sorted by group, group_sizes [G] counts them, rows past the last group give zeros."""
  check_gmm_operands(lhs_MK, rhs, group_sizes_G, transpose_rhs)
  return checkpoint_name(_BACKENDS[resolve_backend(backend)](lhs_MK, rhs, group_sizes_G, transpose_rhs), OUTPUT_NAME)
