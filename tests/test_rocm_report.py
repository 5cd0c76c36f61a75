"""Static MI300X report: every tuned gfx942 kernel compiles for gfx942 without spills and within 64 KiB of LDS."""

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import gmm
from pallas_kernels.rocm_report import LDS_BYTES_PER_CU, format_report, report, triton_modules
from pallas_kernels.tuning import GMM_TUNING, GmmBlocks, GmmTuning

SHAPES = (jax.ShapeDtypeStruct((512, 256), jnp.bfloat16), jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16),
          jax.ShapeDtypeStruct((4,), jnp.int32))

def gmm_reports(tuning):
  fwd = lambda lhs, rhs, gs: gmm(lhs, rhs, gs, True, tuning, False)
  grad = jax.grad(lambda lhs, rhs, gs: jnp.sum(fwd(lhs, rhs, gs).astype(jnp.float32)), argnums=(0, 1))
  return report(fwd, *SHAPES) + report(grad, *SHAPES)

def test_tuned_gfx942_gmm_kernels_fit_an_mi300x_cu():
  reports = gmm_reports(GMM_TUNING["gfx942"])
  print(format_report(reports))
  assert sorted(r.name for r in reports) == ["zaya_gmm", "zaya_gmm", "zaya_tgmm"]
  for r in reports:
    assert r.vgpr_spills == 0 and r.sgpr_spills == 0 and r.scratch_bytes == 0, r
    assert 0 < r.lds_bytes <= LDS_BYTES_PER_CU, r
    assert r.mfma_instructions > 0 and r.occupancy >= 1, r  # the matrix cores are used
    assert r.fits

def test_fp32_gmm_dots_ask_for_full_precision():
  # Triton lowers a DEFAULT-precision fp32 dot as TF32 (XF32 MFMA on gfx942): ~3e-4 relative error, 30x the fp32
  # tolerance, unseen in interpret mode. Every in-kernel dot of the fp32 gmm and its gradients must ask for IEEE.
  f32 = tuple(jax.ShapeDtypeStruct(s.shape, jnp.float32 if s.dtype == jnp.bfloat16 else s.dtype) for s in SHAPES)
  fwd = lambda lhs, rhs, gs: gmm(lhs, rhs, gs, True, GMM_TUNING["gfx942"], False)
  grad = jax.grad(lambda lhs, rhs, gs: jnp.sum(fwd(lhs, rhs, gs)), argnums=(0, 1))
  modules = triton_modules(fwd, *f32) + triton_modules(grad, *f32)
  assert sorted(name for name, *_ in modules) == ["zaya_gmm", "zaya_gmm", "zaya_tgmm"]
  for name, module, *_ in modules:
    assert "tt.dot" in module and "tf32" not in module, name


def test_report_flags_a_kernel_over_the_lds_budget():
  huge = GmmBlocks(256, 128, 256, 8, 2)
  reports = gmm_reports(GmmTuning(huge, huge))
  assert any(r.lds_bytes > LDS_BYTES_PER_CU and not r.fits for r in reports), format_report(reports)


def test_gfx942_attention_kernels_fit_an_mi300x_cu():
  from pallas_kernels.cca_attention import _CONFIG_BY_DEVICE, flash_attention

  bq, bk, warps, stages = _CONFIG_BY_DEVICE["gfx942"]
  B, T, H, K, E = 1, 512, 8, 2, 128
  shapes = (jax.ShapeDtypeStruct((B, T, H, E), jnp.bfloat16), jax.ShapeDtypeStruct((B, T, K, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, T, K, E), jnp.bfloat16), jax.ShapeDtypeStruct((B, T), jnp.int32))
  fwd = lambda q, k, v, seg: flash_attention(q, k, v, seg, block_q=bq, block_k=bk, num_warps=warps,
                                             num_stages=stages, interpret=False)
  grad = jax.grad(lambda q, k, v, seg: jnp.sum(fwd(q, k, v, seg).astype(jnp.float32)), argnums=(0, 1, 2))
  reports = report(fwd, *shapes) + report(grad, *shapes)
  print(format_report(reports))
  assert {r.name for r in reports} == {"cca_flash_fwd", "cca_flash_dq", "cca_flash_dkdv"}
  for r in reports:
    assert r.fits and r.scratch_bytes == 0 and r.mfma_instructions > 0, r


def test_gfx942_decode_attention_fits_an_mi300x_cu():
  # (32, 8, 4, 1) at ZAYA1-8B head shapes (G = 4, E = 128), with and without a window: 118-126 VGPR, 0 AGPR, no
  # spills, 8 KiB LDS, 4 waves/SIMD (64 keys: 152-200 VGPR, 2-3 waves; 128 keys spilled).
  from pallas_kernels.decode_attention import _CONFIG_BY_DEVICE, decode_attention

  block_k, num_splits, warps, stages = _CONFIG_BY_DEVICE["gfx942"]
  B, S, H, K, E = 4, 4096, 8, 2, 128
  shapes = (jax.ShapeDtypeStruct((B, H, E), jnp.bfloat16), jax.ShapeDtypeStruct((B, K, E, S), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, K, S, E), jnp.bfloat16), jax.ShapeDtypeStruct((B,), jnp.int32))
  reports = []
  for window in (None, 1024):
    fn = lambda q, k, v, lengths, window=window: decode_attention(
      q, k, v, lengths, sliding_window=window, block_k=block_k, num_splits=num_splits, num_warps=warps,
      num_stages=stages, interpret=False)
    reports += report(fn, *shapes)
  print(format_report(reports))
  assert [r.name for r in reports] == ["cca_decode", "cca_decode"]
  for r in reports:
    assert r.fits and r.scratch_bytes == 0 and r.mfma_instructions > 0, r
    assert r.occupancy >= 3, r  # latency hiding for a step that streams the cache
