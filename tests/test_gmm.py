"""The grouped-matmul backends against a per-group NumPy loop, and the MoE under either backend."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zaya_jax
from zaya_jax import ZayaConfig
from zaya_jax.ops.gmm import gmm, strategy, tiled_gmm


def numpy_gmm(lhs, rhs, group_sizes, transpose_rhs):
  out = np.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]), np.float64)
  start = 0
  for g, size in enumerate(group_sizes):
    w = rhs[g].T if transpose_rhs else rhs[g]
    out[start:start + size] = lhs[start:start + size].astype(np.float64) @ w.astype(np.float64)
    start += size
  return out


@pytest.mark.parametrize("backend", ["tiled", "ragged_dot", "dense", "pallas"])
def test_mismatched_shapes_are_refused_by_every_backend(backend):
  # The Pallas kernel padded K and tiled groups without checking: it contracted against rhs[g, :6] when K differed,
  # and multiplied the rows past the last group by the last matrix when group_sizes was short.
  lhs, rhs = jnp.ones((20, 6)), jnp.ones((3, 8, 5))
  for args, words in (((lhs, rhs, jnp.array([5, 5, 5])), "lhs has K = 6 but rhs"),
                      ((jnp.ones((20, 8)), rhs, jnp.array([10, 10])), r"group_sizes must be \[G\] = \(3,\)"),
                      ((jnp.ones((2, 20, 8)), rhs, jnp.array([5, 5, 5])), "lhs must be"),):
    with pytest.raises(ValueError, match=words):
      gmm(*args, backend=backend)
  with pytest.raises(ValueError, match="unknown gmm backend 'palas'"):
    gmm(jnp.ones((20, 8)), rhs, jnp.array([5, 5, 5]), backend="palas")
  if backend == "pallas":  # the kernels' own entry points check too
    from pallas_kernels import gmm as pallas_gmm

    with pytest.raises(ValueError, match="lhs has K = 6"):
      pallas_gmm.gmm(lhs, rhs, jnp.array([5, 5, 5]))
    with pytest.raises(ValueError, match="must share M"):
      pallas_gmm.tgmm(lhs, jnp.ones((19, 5)), jnp.array([5, 5, 5]))


@pytest.mark.parametrize("backend", ["tiled", "ragged_dot", "dense"])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_matches_per_group_loop(backend, transpose_rhs):
  rng = np.random.default_rng(0)
  M, K, N = 37, 24, 20
  # Empty groups, and 5 trailing rows in no group (the skip slot's tokens).
  group_sizes = np.array([0, 9, 13, 0, 10, 0], np.int32)
  lhs = rng.standard_normal((M, K), np.float32)
  rhs = rng.standard_normal((6, N, K) if transpose_rhs else (6, K, N), np.float32)
  out = gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes), backend=backend, transpose_rhs=transpose_rhs)
  expected = numpy_gmm(lhs, rhs, group_sizes, transpose_rhs)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  assert not np.asarray(out)[group_sizes.sum():].any()


@pytest.mark.parametrize("backend", ["tiled", "dense"])
def test_experts_give_each_token_its_own_experts_output(backend):
  # Token by token on the host: the sort by expert and the unsort must return every row to its own token (a wrong
  # unsort passes any comparison between backends, which share it). Skip-slot tokens get zeros.
  from zaya_jax.model.moe import Experts, swiglu

  X, D, M = 5, 8, 23
  experts = Experts(dataclasses.replace(ZayaConfig.tiny().moe, num_experts=X, intermediate_size=6, backend=backend),
                    D, std=0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(4)
  h_MD = rng.standard_normal((M, D)).astype(np.float32)
  choice_M = rng.integers(0, X + 1, M).astype(np.int32)  # class X is the skip slot
  weight_M = rng.random(M).astype(np.float32)
  got_MD = np.asarray(experts(jnp.asarray(h_MD), jnp.asarray(choice_M), jnp.asarray(weight_M)))
  gate_up, down = np.asarray(experts.gate_up_proj[...]), np.asarray(experts.down_proj[...])
  for m, c in enumerate(choice_M):
    want = 0.0 if c == X else weight_M[m] * (np.asarray(swiglu(jnp.asarray(h_MD[m] @ gate_up[c].T))) @ down[c].T)
    np.testing.assert_allclose(got_MD[m], want, rtol=1e-5, atol=1e-6, err_msg=f"token {m}, expert {c}")
  assert (choice_M == X).any() and len(set(choice_M.tolist())) == X + 1


@pytest.mark.parametrize("other_backend", ["dense", "pallas"])
def test_moe_backends_agree_on_logits_and_gradients(other_backend):
  cfg = ZayaConfig.tiny(num_layers=2)
  model = zaya_jax.ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  dense_cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, backend=other_backend))
  dense_graphdef, _ = nnx.split(zaya_jax.ZayaForCausalLM(dense_cfg, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)))

  def loss(params, graphdef):
    logits = nnx.merge(graphdef, params)(ids).logits_BTV
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = value_and_grad(state, graphdef)
  dense_value, dense_grads = value_and_grad(state, dense_graphdef)
  np.testing.assert_allclose(value, dense_value, rtol=1e-6)
  for (path, g), (_, dg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(dense_grads), strict=True):
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(dg[...]), rtol=1e-4, atol=1e-6, err_msg=str(path))
  expert_grad = nnx.to_flat_state(grads)
  assert any("gate_up_proj" in str(p) and np.abs(np.asarray(g[...])).max() > 0 for p, g in expert_grad)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_tiled_gmm_gradients_match_ragged_dot(transpose_rhs):
  rng = np.random.default_rng(2)
  M, K, N = 150, 16, 12  # > 2 tiles of 64 rows in one group; an empty group; 7 rows in no group
  group_sizes = jnp.asarray([3, 0, 130, 10], jnp.int32)
  lhs = jnp.asarray(rng.standard_normal((M, K), np.float32))
  rhs = jnp.asarray(rng.standard_normal((4, N, K) if transpose_rhs else (4, K, N), np.float32))
  cot = jnp.asarray(rng.standard_normal((M, N), np.float32))

  def loss(lhs, rhs, backend):
    return jnp.sum(gmm(lhs, rhs, group_sizes, backend=backend, transpose_rhs=transpose_rhs) * cot)

  grads = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "tiled")
  expected = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "ragged_dot")
  for got, want in zip(grads, expected, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
  assert not np.asarray(grads[0])[143:].any()  # rows in no group get no gradient


def test_tiled_gmm_bf16_rounds_once_like_ragged_dot():
  rng = np.random.default_rng(3)
  lhs = jnp.asarray(rng.standard_normal((70, 32), np.float32), jnp.bfloat16)
  rhs = jnp.asarray(rng.standard_normal((3, 32, 8), np.float32), jnp.bfloat16)
  group_sizes = jnp.asarray([20, 45, 5], jnp.int32)
  np.testing.assert_array_equal(np.asarray(gmm(lhs, rhs, group_sizes, backend="tiled"), np.float32),
                                np.asarray(gmm(lhs, rhs, group_sizes, backend="ragged_dot"), np.float32))


# (M, group sizes) per strategy of the "tiled" backend with G=8: per-row gather; batched capacity blocks (C=4 here);
# an overfull group -> C=M (M <= 2G) or -> the tile loop; the tile loop itself.
SMALL_M_CASES = {
    "rows": (2, [0, 1, 0, 0, 0, 0, 1, 0]),
    "capacity": (16, [3, 1, 2, 0, 2, 3, 1, 2]),
    "capacity_overfull_tiny": (16, [0, 9, 1, 0, 2, 0, 1, 0]),
    "capacity_overfull_tiles": (40, [2, 30, 1, 0, 2, 0, 1, 0]),
    "tiles": (150, [3, 0, 90, 10, 20, 0, 20, 0]),
}


@pytest.mark.parametrize("case", SMALL_M_CASES)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_tiled_strategies_match_per_group_loop_and_gradients(case, transpose_rhs):
  M, sizes = SMALL_M_CASES[case]
  assert strategy(M, len(sizes)) == case.split("_")[0]
  rng = np.random.default_rng(4)
  K, N = 24, 20
  group_sizes = np.asarray(sizes, np.int32)  # rows past their sum belong to no group (skip slot)
  lhs = rng.standard_normal((M, K), np.float32)
  rhs = rng.standard_normal((8, N, K) if transpose_rhs else (8, K, N), np.float32)
  out = jax.jit(gmm, static_argnames=("backend", "transpose_rhs"))(
      jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes), backend="tiled", transpose_rhs=transpose_rhs)
  np.testing.assert_allclose(np.asarray(out), numpy_gmm(lhs, rhs, group_sizes, transpose_rhs), rtol=1e-5, atol=1e-5)
  assert not np.asarray(out)[group_sizes.sum():].any()

  cot = jnp.asarray(rng.standard_normal((M, N), np.float32))

  def loss(lhs, rhs, backend):
    return jnp.sum(gmm(lhs, rhs, jnp.asarray(group_sizes), backend=backend, transpose_rhs=transpose_rhs) * cot)

  grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(lhs), jnp.asarray(rhs), "tiled")
  expected = jax.grad(loss, argnums=(0, 1))(jnp.asarray(lhs), jnp.asarray(rhs), "ragged_dot")
  for got, want in zip(grads, expected, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [2, 16])
def test_small_m_strategies_bf16_round_once_like_ragged_dot(M):
  rng = np.random.default_rng(5)
  lhs = jnp.asarray(rng.standard_normal((M, 32), np.float32), jnp.bfloat16)
  rhs = jnp.asarray(rng.standard_normal((8, 16, 32), np.float32), jnp.bfloat16)
  group_sizes = jnp.asarray(np.bincount(rng.integers(0, 9, M), minlength=9)[:8], jnp.int32)
  np.testing.assert_array_equal(
      np.asarray(gmm(lhs, rhs, group_sizes, backend="tiled", transpose_rhs=True), np.float32),
      np.asarray(gmm(lhs, rhs, group_sizes, backend="ragged_dot", transpose_rhs=True), np.float32))


def test_forced_tile_matches_shape_choice():
  rng = np.random.default_rng(6)
  lhs = jnp.asarray(rng.standard_normal((16, 24), np.float32))
  rhs = jnp.asarray(rng.standard_normal((8, 20, 24), np.float32))
  group_sizes = jnp.asarray([3, 1, 2, 0, 2, 3, 1, 2], jnp.int32)
  np.testing.assert_allclose(np.asarray(tiled_gmm(lhs, rhs, group_sizes, True, 4)),
                             np.asarray(tiled_gmm(lhs, rhs, group_sizes, True)), rtol=1e-6, atol=1e-6)
