"""Block sizes per device kind for the Pallas-Triton kernels, and the static checks Triton needs.

Interpret mode (CPU) accepts any block shape; Triton does not: every array a kernel loads or stores
must have power-of-two dims. `check_blocks` enforces that before tracing. The gfx942 (MI300X) rows
start from public MI300X grouped-GEMM tunings (ROCm's megablox Triton kernels: GMM mostly
256/32/256 with 8 warps; TGMM with short M blocks and long K/N blocks), scaled down where Pallas
cannot express their persistent schedule; the Hopper rows from tokamax-style heuristics.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class GmmBlocks:
  block_m: int  # rows of lhs per program
  block_k: int  # contraction chunk per loop step
  block_n: int  # output columns per program
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class GmmTuning:
  gmm: GmmBlocks  # forward and lhs gradient
  tgmm: GmmBlocks  # weight gradient: block_m is the row chunk of the reduction


GMM_TUNING: dict[str, GmmTuning] = {
    "gfx942": GmmTuning(GmmBlocks(128, 32, 128, 8, 2), GmmBlocks(64, 128, 128, 8, 2)),
    # H200 sweep at ZAYA1-8B expert shapes, 64k tokens (experiments/results/bench_kernels_h200_sweep.json):
    # 128/64/256 beat 128/64/128 by 14% (gate_up) and 31% (down); 256/64/128 and 4 warps were slower.
    "h100": GmmTuning(GmmBlocks(128, 64, 256, 8, 3), GmmBlocks(64, 128, 128, 8, 3)),
    "h200": GmmTuning(GmmBlocks(128, 64, 256, 8, 3), GmmBlocks(64, 128, 128, 8, 3)),
    "fallback": GmmTuning(GmmBlocks(64, 32, 64, 4, 2), GmmBlocks(32, 64, 64, 4, 2)),
}


def device_kind(device: jax.Device | None = None) -> str:
  """The tuning-table key of a device: 'gfx942', 'h100', 'h200' or 'fallback'."""
  device = device or jax.devices()[0]
  kind = f"{getattr(device, 'device_kind', '')} {getattr(device, 'compute_capability', '')}".lower()
  for key, markers in (("gfx942", ("gfx942", "mi300")), ("h200", ("h200",)), ("h100", ("h100",))):
    if any(marker in kind for marker in markers):
      return key
  return "fallback"


def is_power_of_two(n: int) -> bool:
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def dot_f32(a, b, contract=(1, 0)):
  """In-kernel a @ b contracting a's dim contract[0] with b's dim contract[1], fp32 accumulation. fp32 operands ask
  for HIGHEST: the Triton lowering turns DEFAULT precision into TF32 (about 3e-4 relative error, measured on H200)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jax.numpy.float32 else None
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                             preferred_element_type=jax.numpy.float32)


def check_blocks(blocks: GmmBlocks | dict, what: str) -> None:
  """Raises ValueError naming the field if a launch parameter breaks Triton's rules (checked before tracing:
  interpret mode runs any shape). Blocks: powers of two (lowering) and >= 16 (tl.dot); num_warps 1-16, a power of
  two; num_stages / num_splits positive; sliding_window None or positive."""
  fields = dataclasses.asdict(blocks) if dataclasses.is_dataclass(blocks) else dict(blocks)
  for name, value in fields.items():
    if name.startswith("block_") and not (is_power_of_two(value) and value >= 16):
      raise ValueError(f"{what}.{name}={value!r}: Triton needs power-of-two blocks of at least 16")
    if name == "num_warps" and value not in (1, 2, 4, 8, 16):
      raise ValueError(f"{what}.num_warps={value!r}: must be 1, 2, 4, 8 or 16")
    if name in ("num_stages", "num_splits") and not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{what}.{name}={value!r}: must be a positive int")
    if name == "sliding_window" and value is not None and not (isinstance(value, int) and value > 0):
      raise ValueError(f"{what}.sliding_window={value!r}: must be None or a positive int")


def check_gmm_operands(lhs_MK, rhs, group_sizes_G, transpose_rhs: bool) -> None:
  """Raises ValueError unless lhs is [M, K], rhs [G, K, N] ([G, N, K] transposed) and group_sizes [G]: the kernels
  pad K and tile the groups, so mismatched shapes would give wrong numbers rather than an error."""
  lhs_shape, rhs_shape, gs_shape = jax.numpy.shape(lhs_MK), jax.numpy.shape(rhs), jax.numpy.shape(group_sizes_G)
  if len(lhs_shape) != 2 or len(rhs_shape) != 3:
    raise ValueError(f"gmm: lhs must be [M, K] and rhs [G, K, N] (or [G, N, K] with transpose_rhs), got shapes "
                     f"{lhs_shape} and {rhs_shape}")
  k_rhs = rhs_shape[2 if transpose_rhs else 1]
  if lhs_shape[1] != k_rhs:
    raise ValueError(f"gmm: lhs has K = {lhs_shape[1]} but rhs {rhs_shape} (transpose_rhs={transpose_rhs}) has "
                     f"K = {k_rhs}")
  if gs_shape != (rhs_shape[0],):
    raise ValueError(f"gmm: group_sizes must be [G] = {(rhs_shape[0],)} (one per rhs matrix), got shape {gs_shape}")


def check_tgmm_operands(lhs_MK, dout_MN, group_sizes_G) -> None:
  """Raises ValueError unless lhs [M, K] and dout [M, N] share their rows and group_sizes is 1-D."""
  lhs_shape, dout_shape, gs_shape = jax.numpy.shape(lhs_MK), jax.numpy.shape(dout_MN), jax.numpy.shape(group_sizes_G)
  if len(lhs_shape) != 2 or len(dout_shape) != 2 or lhs_shape[0] != dout_shape[0] or len(gs_shape) != 1:
    raise ValueError(f"tgmm: lhs [M, K] and dout [M, N] must share M, group_sizes must be [G]; got shapes "
                     f"{lhs_shape}, {dout_shape} and {gs_shape}")
