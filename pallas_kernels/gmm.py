"""Grouped matmul (gmm) and its weight gradient (tgmm) as Pallas kernels lowered through Triton.

M rows, K contraction, N output columns, G groups, W work tiles.

`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G])` multiplies the rows of each group (rows sorted by group)
by that group's matrix; rows past `sum(group_sizes)` come out zero. `transpose_rhs=True` takes
`rhs[G, N, K]` (PyTorch Linear layout). `jax.grad` works through a custom VJP: the lhs gradient is
a gmm against the transposed weights, the weight gradient a tgmm.

Schedule: Triton's Pallas backend has no scalar prefetch and no dynamic grid, so the work list is
computed outside the kernel as plain arrays: W = cdiv(M, block_m) + G + 1 tiles (an upper bound for
any group sizes), each with its group, first row and end row. The grid is (W, N / block_n); a tile
past the real work has no rows and returns at once. Weights are read with dynamic group indices
from the whole array in memory. Rows past the last group form one extra "group" that writes zeros,
so every output element is written. Accumulation is fp32, rounded once to the output dtype.

`plain_gmm` / `plain_tgmm` are the plain-JAX references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.tuning import (
  GMM_TUNING,
  GmmBlocks,
  check_blocks,
  check_gmm_operands,
  check_tgmm_operands,
  device_kind,
  dot_f32,
)

F32 = jnp.float32


def _interpret(interpret: bool | None) -> bool:
  return jax.default_backend() == "cpu" if interpret is None else interpret


def _pad_to(x, axis: int, multiple: int):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def work_tiles(group_sizes_G, num_rows: int, block_m: int):
  """Per work tile: (group, first row, end row); group G covers the rows past the last group."""
  G = group_sizes_G.shape[0]
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  sizes = jnp.concatenate([group_sizes_G, (num_rows - jnp.sum(group_sizes_G))[None]])
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  tiles = (sizes + block_m - 1) // block_m
  tile_ends = jnp.cumsum(tiles)
  num_tiles = pl.cdiv(num_rows, block_m) + G + 1
  t_W = jnp.arange(num_tiles, dtype=jnp.int32)
  group_W = jnp.minimum(jnp.searchsorted(tile_ends, t_W, side="right"), G).astype(jnp.int32)
  first_W = starts[group_W] + (t_W - (tile_ends[group_W] - tiles[group_W])) * block_m
  real_W = t_W < tile_ends[-1]
  first_W = jnp.where(real_W, first_W, 0)
  end_W = jnp.where(real_W, ends[group_W], 0)
  return group_W, first_W.astype(jnp.int32), end_W.astype(jnp.int32)


def _gmm_kernel(group_ref, first_ref, end_ref, x_ref, w_ref, *rest, block_m, block_k, block_n, transpose_rhs,
                num_groups):
  o_ref = rest[-1]
  g, first, end = group_ref[...], first_ref[...], end_ref[...]
  j = pl.program_id(1)
  K = x_ref.shape[1]

  def store(tile):
    rows = first + jnp.arange(block_m)
    plt.store(o_ref.at[pl.ds(first, block_m), pl.ds(j * block_n, block_n)], tile.astype(o_ref.dtype),
              mask=(rows < end)[:, None])

  @pl.when((first < end) & (g < num_groups))
  def _():
    def step(kk, acc):
      x = plt.load(x_ref.at[pl.ds(first, block_m), pl.ds(kk * block_k, block_k)])
      if transpose_rhs:
        w = plt.load(w_ref.at[g, pl.ds(j * block_n, block_n), pl.ds(kk * block_k, block_k)])
        return acc + dot_f32(x, w, (1, 1))
      w = plt.load(w_ref.at[g, pl.ds(kk * block_k, block_k), pl.ds(j * block_n, block_n)])
      return acc + dot_f32(x, w)

    store(jax.lax.fori_loop(0, K // block_k, step, jnp.zeros((block_m, block_n), F32)))

  @pl.when((first < end) & (g == num_groups))
  def _():
    store(jnp.zeros((block_m, block_n), F32))  # rows past the last group


def _gmm_call(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool, blocks: GmmBlocks, interpret: bool,
              out_init=None):
  check_blocks(blocks, "gmm")
  bm, bk, bn = blocks.block_m, blocks.block_k, blocks.block_n
  M = lhs_MK.shape[0]
  N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  G = rhs.shape[0]
  # Pad K and N to whole blocks (zeros add nothing), and M by one block so that every row slice of a
  # tile stays inside the array (a clamped slice would shift the rows in interpret mode).
  lhs_PK = _pad_to(jnp.pad(lhs_MK, ((0, bm), (0, 0))), 1, bk)
  rhs = _pad_to(_pad_to(rhs, 1, bn if transpose_rhs else bk), 2, bk if transpose_rhs else bn)
  Np = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  group_W, first_W, end_W = work_tiles(group_sizes_G, M, bm)
  scalar = pl.BlockSpec((None,), lambda t, j: (t,))
  whole = pl.BlockSpec(memory_space=pl.ANY)
  inputs = [group_W, first_W, end_W, lhs_PK, rhs.astype(lhs_MK.dtype)]
  in_specs = [scalar, scalar, scalar, whole, whole]
  aliases = {}
  if out_init is not None:  # tests: start from a poisoned buffer to prove every element is written
    inputs.append(_pad_to(jnp.pad(out_init, ((0, bm), (0, 0))), 1, bn))
    in_specs.append(whole)
    aliases = {len(inputs) - 1: 0}
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, block_m=bm, block_k=bk, block_n=bn, transpose_rhs=transpose_rhs, num_groups=G),
      out_shape=jax.ShapeDtypeStruct((M + bm, Np), lhs_MK.dtype),
      grid=(group_W.shape[0], Np // bn),
      in_specs=in_specs,
      out_specs=whole,
      input_output_aliases=aliases,
      compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="zaya_gmm",
  )(*inputs)
  return out[:M, :N]


def _tgmm_kernel(starts_ref, ends_ref, a_ref, b_ref, o_ref, *, block_m, block_p, block_q):
  """o[g] = a[rows of g]^T @ b[rows of g], one (block_p, block_q) tile per program."""
  g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]

  def step(c, acc):
    first = start + c * block_m
    rows = first + jnp.arange(block_m)
    mine = (rows < end)[:, None]
    a = plt.load(a_ref.at[pl.ds(first, block_m), pl.ds(i * block_p, block_p)], mask=mine, other=0)
    b = plt.load(b_ref.at[pl.ds(first, block_m), pl.ds(j * block_q, block_q)], mask=mine, other=0)
    return acc + dot_f32(a, b, (0, 0))

  chunks = (end - start + block_m - 1) // block_m
  acc = jax.lax.fori_loop(0, chunks, step, jnp.zeros((block_p, block_q), F32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm_call(a_MP, b_MQ, group_sizes_G, out_dtype, blocks: GmmBlocks, interpret: bool):
  """[G, P, Q]: per group, a^T @ b over its rows (fp32 accumulation)."""
  check_blocks(blocks, "tgmm")
  bm, bp, bq = blocks.block_m, blocks.block_k, blocks.block_n
  P, Q = a_MP.shape[1], b_MQ.shape[1]
  a = _pad_to(jnp.pad(a_MP, ((0, bm), (0, 0))), 1, bp)
  b = _pad_to(jnp.pad(b_MQ, ((0, bm), (0, 0))), 1, bq).astype(a.dtype)
  ends = jnp.cumsum(group_sizes_G.astype(jnp.int32))
  starts = ends - group_sizes_G.astype(jnp.int32)
  G = group_sizes_G.shape[0]
  smem = pl.BlockSpec(memory_space=pl.ANY)
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=bm, block_p=bp, block_q=bq),
      out_shape=jax.ShapeDtypeStruct((G, a.shape[1], b.shape[1]), out_dtype),
      grid=(G, a.shape[1] // bp, b.shape[1] // bq),
      in_specs=[smem, smem, smem, smem],
      out_specs=pl.BlockSpec((None, bp, bq), lambda g, i, j: (g, i, j)),
      compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="zaya_tgmm",
  )(starts, ends, a, b)
  return out[:, :P, :Q]


def _tuning(blocks):
  return blocks or GMM_TUNING[device_kind()]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool = False, tuning=None, interpret: bool | None = None):
  """Grouped matmul; `tuning` is a `GmmTuning` (default: the table entry of this device)."""
  check_gmm_operands(lhs_MK, rhs, group_sizes_G, transpose_rhs)
  return _gmm_call(lhs_MK, rhs, group_sizes_G, transpose_rhs, _tuning(tuning).gmm, _interpret(interpret))


def _gmm_fwd(lhs_MK, rhs, group_sizes_G, transpose_rhs, tuning, interpret):
  return gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, tuning, interpret), (lhs_MK, rhs, group_sizes_G)


def _gmm_bwd(transpose_rhs, tuning, interpret, residuals, dout_MN):
  lhs_MK, rhs, group_sizes_G = residuals
  tuning, interpret = _tuning(tuning), _interpret(interpret)
  dout_MN = dout_MN.astype(lhs_MK.dtype)
  dlhs_MK = _gmm_call(dout_MN, rhs, group_sizes_G, not transpose_rhs, tuning.gmm, interpret)
  if transpose_rhs:  # rhs is [G, N, K]: its gradient is dout^T @ lhs per group
    drhs = _tgmm_call(dout_MN, lhs_MK, group_sizes_G, rhs.dtype, tuning.tgmm, interpret)
  else:
    drhs = _tgmm_call(lhs_MK, dout_MN, group_sizes_G, rhs.dtype, tuning.tgmm, interpret)
  return dlhs_MK, drhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm(lhs_MK, dout_MN, group_sizes_G, *, out_dtype=F32, tuning=None, interpret: bool | None = None):
  """[G, K, N]: per group, lhs^T @ dout over its rows — the weight gradient of `gmm`."""
  check_tgmm_operands(lhs_MK, dout_MN, group_sizes_G)
  return _tgmm_call(lhs_MK, dout_MN, group_sizes_G, out_dtype, _tuning(tuning).tgmm, _interpret(interpret))


# -- plain-JAX references ------------------------------------------------------------------------------

def _row_groups(group_sizes_G, M):
  return jnp.searchsorted(jnp.cumsum(group_sizes_G), jnp.arange(M), side="right")


def plain_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool = False):
  G = rhs.shape[0]
  group_M = _row_groups(group_sizes_G, lhs_MK.shape[0])
  w = rhs.astype(lhs_MK.dtype)
  spec = "mk,gnk->mgn" if transpose_rhs else "mk,gkn->mgn"
  all_MGN = jnp.einsum(spec, lhs_MK, w, preferred_element_type=F32)
  pick_MG = jax.nn.one_hot(group_M, G, dtype=F32)  # all-zero rows past the last group
  return jnp.einsum("mgn,mg->mn", all_MGN, pick_MG).astype(lhs_MK.dtype)


def plain_tgmm(lhs_MK, dout_MN, group_sizes_G, out_dtype=F32):
  pick_MG = jax.nn.one_hot(_row_groups(group_sizes_G, lhs_MK.shape[0]), group_sizes_G.shape[0], dtype=F32)
  return jnp.einsum("mk,mn,mg->gkn", lhs_MK.astype(F32), dout_MN.astype(F32), pick_MG).astype(out_dtype)
