"""Static MI300X (gfx942) report of our Pallas-Triton kernels, made on a machine without a GPU.

Lowering a function for `rocm` with `pallas_call(debug=True)` prints each kernel's Triton IR; the
`triton` package's AMD backend compiles that IR for gfx942, and the AMDGCN it emits states the
kernel's resource use: VGPRs/AGPRs, scratch, spills, occupancy (waves per SIMD), MFMA instructions;
LDS comes from the compiled metadata (Triton allocates it dynamically). An MI300X CU has 64 KiB of
LDS: a kernel over that cannot launch. See shared ROCM_ON_CPU notes for how this was established.

Requires `triton` (pinned in the test extra); `jax.export` does the lowering, nothing runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import tempfile
import warnings

import jax
from jax import export
from jax.experimental import pallas

LDS_BYTES_PER_CU = 64 * 1024
MI300X_BF16_FLOPS = 1.307e15  # dense bf16 peak
MI300X_HBM_BYTES_PER_S = 5.3e12
_HEADER = re.compile(r"The Triton module for pallas_call (\S+) at [^\n]*:\n")
_LAUNCH = re.compile(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')


@dataclasses.dataclass(frozen=True)
class KernelReport:
  name: str
  num_warps: int
  num_stages: int
  vgprs: int
  agprs: int
  sgprs: int
  scratch_bytes: int
  vgpr_spills: int
  sgpr_spills: int
  lds_bytes: int
  occupancy: int  # waves per SIMD
  mfma_instructions: int

  @property
  def fits(self) -> bool:
    return self.vgpr_spills == 0 and self.sgpr_spills == 0 and self.lds_bytes <= LDS_BYTES_PER_CU


def _strip_locations(module: str) -> str:
  module = re.sub(r"\s*\[unknown\]", "", module)
  module = re.sub(r'\s*"[^"\n]*"\(#loc\d*\)', "", module)
  module = re.sub(r"\s*loc\([^)]*\)", "", module)
  # Location definitions, including call-site ones printed over two lines ("#locN = #locM" / " at #locK").
  return re.sub(r"^(#loc.*|\s*at #loc.*)$", "", module, flags=re.M)


def triton_modules(fn, *shapes) -> list[tuple[str, str, int, int]]:
  """(kernel name, Triton IR text, num_warps, num_stages) of every pallas_call in `fn` lowered for ROCm."""
  printed = io.StringIO()
  original = pallas.pallas_call
  pallas.pallas_call = functools.partial(original, debug=True)
  try:
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      exported = export.export(jax.jit(fn), platforms=["rocm"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
  finally:
    pallas.pallas_call = original
  launch = {name: (int(warps), int(stages)) for name, stages, warps in _LAUNCH.findall(exported.mlir_module())}
  text = printed.getvalue()
  modules = []
  for match in _HEADER.finditer(text):
    body = text[match.end():]
    body = body[:re.search(r"^}.*$", body, flags=re.M).end()]
    warps, stages = launch[match.group(1)]
    modules.append((match.group(1), _strip_locations(body), warps, stages))
  return modules


def _field(asm: str, key: str) -> int:
  found = re.findall(re.escape(key) + r":\s*(\d+)", asm)
  return int(found[0]) if found else 0


def compile_gfx942(name: str, module: str, num_warps: int, num_stages: int) -> KernelReport:
  import triton
  from triton.backends.compiler import GPUTarget

  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{name}.ttir")
    with open(path, "w") as f:
      f.write(module)
    compiled = triton.compile(path, target=GPUTarget("hip", "gfx942", 64),
                              options={"num_warps": num_warps, "num_stages": num_stages})
  asm = compiled.asm["amdgcn"]
  occupancy = re.findall(r"; Occupancy: (\d+)", asm)
  return KernelReport(
      name=name, num_warps=num_warps, num_stages=num_stages, vgprs=_field(asm, ".vgpr_count"),
      agprs=_field(asm, ".agpr_count"), sgprs=_field(asm, ".sgpr_count"),
      scratch_bytes=_field(asm, ".private_segment_fixed_size"), vgpr_spills=_field(asm, ".vgpr_spill_count"),
      sgpr_spills=_field(asm, ".sgpr_spill_count"), lds_bytes=int(compiled.metadata.shared),
      occupancy=int(occupancy[0]) if occupancy else 0, mfma_instructions=len(re.findall(r"\bv_mfma", asm)))


def report(fn, *shapes) -> list[KernelReport]:
  return [compile_gfx942(*module) for module in triton_modules(fn, *shapes)]


def roofline_ms(flops: float, bytes_moved: float) -> float:
  """Lower bound on MI300X time from its bf16 and HBM peaks."""
  return 1e3 * max(flops / MI300X_BF16_FLOPS, bytes_moved / MI300X_HBM_BYTES_PER_S)


def format_report(reports: list[KernelReport]) -> str:
  lines = [f"{'kernel':>12} {'warps':>5} {'stages':>6} {'VGPR':>5} {'AGPR':>5} {'SGPR':>5} {'spills':>6} "
           f"{'scratch':>7} {'LDS B':>7} {'waves/SIMD':>10} {'MFMA':>5} fits"]
  for r in reports:
    lines.append(f"{r.name:>12} {r.num_warps:>5} {r.num_stages:>6} {r.vgprs:>5} {r.agprs:>5} {r.sgprs:>5} "
                 f"{r.vgpr_spills + r.sgpr_spills:>6} {r.scratch_bytes:>7} {r.lds_bytes:>7} {r.occupancy:>10} "
                 f"{r.mfma_instructions:>5} {'yes' if r.fits else 'NO'}")
  return "\n".join(lines)
