"""Pallas-Triton grouped matmul: interpret mode on CPU against plain JAX, and lowering for ROCm and CUDA."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.gmm import _gmm_call, gmm, plain_gmm, plain_tgmm, tgmm
from pallas_kernels.tuning import GMM_TUNING, GmmBlocks, GmmTuning, check_blocks, device_kind

SMALL = GmmTuning(GmmBlocks(16, 16, 16, 4, 2), GmmBlocks(16, 16, 32, 4, 2))
# Ragged groups with an empty one, a group spanning several tiles, and 9 trailing rows in no group;
# M, K and N not multiples of the blocks.
GROUP_SIZES = np.array([5, 0, 37, 19], np.int32)
M, K, N = 70, 40, 24


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def operands(dtype, transpose_rhs, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
  rhs = jnp.asarray(rng.standard_normal((4, N, K) if transpose_rhs else (4, K, N), np.float32), dtype)
  return lhs, rhs, jnp.asarray(GROUP_SIZES)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_forward_and_gradients(dtype, tol, transpose_rhs):
  lhs, rhs, gs = operands(dtype, transpose_rhs)
  cot = jnp.asarray(np.random.default_rng(9).standard_normal((M, N), np.float32), dtype)
  out = gmm(lhs, rhs, gs, transpose_rhs, SMALL)
  assert out.dtype == dtype and out.shape == (M, N)
  assert rel_err(out, plain_gmm(lhs, rhs, gs, transpose_rhs)) <= tol
  assert not np.asarray(out, np.float32)[GROUP_SIZES.sum():].any()

  def loss(fn):
    return lambda lhs, rhs: jnp.sum((fn(lhs, rhs) * cot).astype(jnp.float32))

  got = jax.grad(loss(lambda a, b: gmm(a, b, gs, transpose_rhs, SMALL)), argnums=(0, 1))(lhs, rhs)
  want = jax.grad(loss(lambda a, b: plain_gmm(a, b, gs, transpose_rhs)), argnums=(0, 1))(lhs, rhs)
  for g, w in zip(got, want, strict=True):
    assert g.dtype == w.dtype and rel_err(g, w) <= tol


def test_tgmm_matches_reference_with_empty_groups():
  lhs, _, gs = operands(jnp.float32, False)
  dout = jnp.asarray(np.random.default_rng(1).standard_normal((M, N), np.float32))
  got = tgmm(lhs, dout, gs, tuning=SMALL)
  assert got.shape == (4, K, N)
  assert rel_err(got, plain_tgmm(lhs, dout, gs)) <= 1e-5
  assert not np.asarray(got[1]).any()  # the empty group's gradient is exactly zero


def test_every_output_element_is_written():
  lhs, rhs, gs = operands(jnp.float32, False)
  poisoned = jnp.full((M, N), jnp.nan, jnp.float32)
  out = _gmm_call(lhs, rhs, gs, False, SMALL.gmm, interpret=True, out_init=poisoned)
  assert np.isfinite(np.asarray(out)).all()
  assert rel_err(out, plain_gmm(lhs, rhs, gs)) <= 1e-5


def test_tiles_write_only_their_own_rows(monkeypatch):
  # Interpret mode runs the work tiles in order, so a tile writing past its group's end is overwritten by the next
  # group's tile and goes unseen (on a GPU the programs race). Run in reverse, such a write would survive.
  import pallas_kernels.gmm as pallas_gmm

  in_order = pallas_gmm.work_tiles
  monkeypatch.setattr(pallas_gmm, "work_tiles", lambda *a: tuple(x[::-1] for x in in_order(*a)))
  lhs, rhs, gs = operands(jnp.float32, False)
  out = _gmm_call(lhs, rhs, gs, False, SMALL.gmm, interpret=True, out_init=jnp.full((M, N), jnp.nan, jnp.float32))
  assert rel_err(out, plain_gmm(lhs, rhs, gs)) <= 1e-5


def test_the_worst_case_needs_every_work_tile():
  # Each group, and the rows past them, one row past a block multiple: ceil(M / block_m) + G tiles, all needed.
  sizes, rows = np.array([17, 1, 33, 1], np.int32), 53
  rng = np.random.default_rng(3)
  lhs = jnp.asarray(rng.standard_normal((rows, K), np.float32))
  rhs = jnp.asarray(rng.standard_normal((4, K, N), np.float32))
  out = _gmm_call(lhs, rhs, jnp.asarray(sizes), False, SMALL.gmm, interpret=True,
                  out_init=jnp.full((rows, N), jnp.nan, jnp.float32))
  assert rel_err(out, plain_gmm(lhs, rhs, jnp.asarray(sizes))) <= 1e-5  # NaN where a tile was missing


@pytest.mark.parametrize("kind", sorted(GMM_TUNING))
def test_gmm_and_its_gradient_launch_with_the_devices_table_entry(kind, monkeypatch):
  # On a CPU every lookup is "fallback": the kernel launches are spied on under each device kind instead.
  import pallas_kernels.gmm as pallas_gmm

  launched = []

  def fake_gmm_call(lhs, rhs, gs, transpose_rhs, blocks, interpret, out_init=None):
    launched.append(("gmm", blocks))
    return jnp.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]), lhs.dtype)

  def fake_tgmm_call(lhs, dout, gs, out_dtype, blocks, interpret):
    launched.append(("tgmm", blocks))
    return jnp.zeros((gs.shape[0], lhs.shape[1], dout.shape[1]), out_dtype)

  monkeypatch.setattr(pallas_gmm, "device_kind", lambda device=None: kind)
  monkeypatch.setattr(pallas_gmm, "_gmm_call", fake_gmm_call)
  monkeypatch.setattr(pallas_gmm, "_tgmm_call", fake_tgmm_call)
  lhs, rhs, gs = jnp.ones((8, 16)), jnp.ones((2, 16, 16)), jnp.asarray([3, 5], jnp.int32)
  jax.grad(lambda a, b: jnp.sum(gmm(a, b, gs)), argnums=(0, 1))(lhs, rhs)
  want = GMM_TUNING[kind]
  assert launched == [("gmm", want.gmm), ("gmm", want.gmm), ("tgmm", want.tgmm)], launched


@pytest.mark.parametrize("name, capability, kind", [
  ("NVIDIA H200", "9.0", "h200"), ("NVIDIA H100 80GB HBM3", "9.0", "h100"), ("AMD Instinct MI300X", "gfx942", "gfx942"),
  ("", "gfx942:sramecc+:xnack-", "gfx942"), ("NVIDIA A100-SXM4-80GB", "8.0", "fallback"), ("cpu", "", "fallback")])
def test_device_kinds_pick_their_block_configs(name, capability, kind):
  from types import SimpleNamespace

  from pallas_kernels import cca_attention, decode_attention

  device = SimpleNamespace(device_kind=name, compute_capability=capability)
  assert device_kind(device) == kind
  row = {"gfx942": 0, "h100": 1, "h200": 1, "fallback": 2}[kind]  # BLOCK_CONFIGS: gfx942, Hopper, fallback
  assert cca_attention.default_block_config(device) == cca_attention.BLOCK_CONFIGS[row]
  assert decode_attention.default_block_config(device) == decode_attention.BLOCK_CONFIGS[row]


@pytest.mark.parametrize("field, value", [("block_m", 48), ("block_k", 8), ("num_warps", 3), ("block_n", 0)])
def test_block_sizes_checked_before_tracing(field, value):
  blocks = {"block_m": 16, "block_k": 16, "block_n": 16, "num_warps": 4, "num_stages": 2, field: value}
  with pytest.raises(ValueError, match=f"gmm.{field}={value}"):
    check_blocks(blocks, "gmm")
  lhs, rhs, gs = operands(jnp.float32, False)
  with pytest.raises(ValueError, match=field):
    gmm(lhs, rhs, gs, False, GmmTuning(GmmBlocks(**blocks), SMALL.tgmm))


def test_tuning_table_is_valid_and_cpu_uses_the_fallback():
  for kind, tuning in GMM_TUNING.items():
    check_blocks(tuning.gmm, f"{kind}.gmm")
    check_blocks(tuning.tgmm, f"{kind}.tgmm")
  if jax.default_backend() == "cpu":
    assert device_kind() == "fallback"


@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_every_tuned_kernel_lowers(platform):
  """Triton lowering enforces what interpret mode does not (power-of-two shapes, no dynamic grid)."""
  shapes = (jax.ShapeDtypeStruct((512, 256), jnp.bfloat16), jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((4,), jnp.int32))
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for kind, tuning in GMM_TUNING.items():
    for transpose_rhs in (False, True):
      fwd = lambda lhs, rhs, gs, t=tuning, tr=transpose_rhs: gmm(lhs, rhs, gs, tr, t, False)
      grad = jax.grad(lambda lhs, rhs, gs, f=fwd: jnp.sum(f(lhs, rhs, gs).astype(jnp.float32)), argnums=(0, 1))
      for name, fn, kernels in (("forward", fwd, 1), ("gradient", grad, 2)):
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", DeprecationWarning)  # "the Pallas Triton backend is deprecated"
          module = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*shapes).mlir_module()
        assert module.count("__gpu$xla.gpu.triton") == kernels, (kind, transpose_rhs, name)
