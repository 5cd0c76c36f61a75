"""The ablation variants of the model (attention kinds, linear router, no residual scaling) share its code paths:
cached decoding equals the full forward, packed rows equal their documents, and each variant differs from ZAYA1
exactly where it should."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zaya_jax import save_hf
from zaya_jax.config import AttentionConfig, MoEConfig, ZayaConfig
from zaya_jax.figures import decode_state_bytes
from zaya_jax.infer import decode
from zaya_jax.model.attention_kinds import GQAttention
from zaya_jax.model.decoder import ZayaForCausalLM, forward
from zaya_jax.model.rope import apply_rope, rope_tables


def variant(kind="cca", num_kv_heads=2, router="mlp", residual_scaling=True, **att):
  return ZayaConfig.tiny(
      attention=AttentionConfig(kind=kind, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, mla_kv_rank=24, **att),
      moe=MoEConfig(num_experts=4, intermediate_size=48, router_hidden_size=16, router=router),
      residual_scaling=residual_scaling)


VARIANTS = {
    "gqa": variant("gqa"),
    "mha": variant("gqa", num_kv_heads=4),
    "mla": variant("mla", num_kv_heads=4),
    "linear_router_no_residual_scaling": variant(router="linear", residual_scaling=False),
}


# "mha" is "gqa" with as many kv heads as heads: the same code, left to the cheaper tests below.
@pytest.mark.parametrize("name", ["gqa", "mla", "linear_router_no_residual_scaling"])
def test_variant_decode_and_packing_match_the_full_forward(name):
  cfg = VARIANTS[name]
  model = ZayaForCausalLM(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (2, 10))
  full = np.asarray(forward(model, ids).logits_BTV)
  assert np.isfinite(full).all()

  # Ragged prefill (rows of 6 and 4 tokens), then one token at a time.
  lengths = np.array([6, 4])
  state = decode.init_state(cfg, 2, 12)
  logits, state = decode.prefill(model, state, np.where(np.arange(6) < lengths[:, None], ids[:, :6], 0), lengths)
  np.testing.assert_allclose(logits, full[[0, 1], lengths - 1], atol=2e-6)
  for t in range(4):
    logits, state = decode.decode_step(model, state, ids[[0, 1], lengths + t])
    np.testing.assert_allclose(logits, full[[0, 1], lengths + t], atol=2e-6)

  # Two documents packed in one row equal each run alone.
  packed = np.concatenate([ids[0, :6], ids[1, :4]])[None]
  segments = np.repeat([0, 1], [6, 4])[None]
  out = np.asarray(forward(model, packed, segments).logits_BTV)[0]
  np.testing.assert_allclose(out[:6], full[0, :6], atol=2e-6)
  np.testing.assert_allclose(out[6:], forward(model, ids[1:, :4]).logits_BTV[0], atol=2e-6)


def test_gqa_equals_jax_dot_product_attention():
  """GQAttention = its projections and RoPE, then jax.nn.dot_product_attention (an independent attention core)."""
  cfg = VARIANTS["gqa"].attention
  layer = GQAttention(cfg, 64, "hybrid", std=0.3, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
  h = jax.random.normal(jax.random.key(3), (2, 9, 64))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  theta, rotary_dim = cfg.rope("hybrid")
  cos, sin = rope_tables(positions, theta, rotary_dim, jnp.float32)
  q = apply_rope((h @ layer.q_proj.weight[...].T).reshape(2, 9, 4, 16), cos, sin)
  k = apply_rope((h @ layer.k_proj.weight[...].T).reshape(2, 9, 2, 16), cos, sin)
  v = (h @ layer.v_proj.weight[...].T).reshape(2, 9, 2, 16)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(2, 9, 64) @ layer.o_proj.weight[...].T
  got = layer(h, jnp.zeros((2, 9), jnp.int32), positions)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_variant_attention_depends_on_relative_positions_only(name):
  """RoPE (in MLA: the decoupled, shared key) makes attention invariant to shifting every position at once."""
  model = ZayaForCausalLM(VARIANTS[name], rngs=nnx.Rngs(4))
  ids = np.random.default_rng(1).integers(3, 512, (1, 8))
  positions = np.arange(8)[None]
  a = forward(model, ids, positions_BT=positions).logits_BTV
  b = forward(model, ids, positions_BT=positions + 37).logits_BTV
  np.testing.assert_allclose(a, b, atol=2e-5)
  assert not np.allclose(a, forward(model, ids, positions_BT=positions[:, ::-1]).logits_BTV, atol=1e-3)


def test_decode_cache_bytes_follow_each_kind():
  L, K, H, E, R, itemsize = 2, 2, 4, 16, 24, 4
  assert decode_state_bytes(variant("cca"))[0] == L * 2 * K * E * itemsize
  assert decode_state_bytes(VARIANTS["gqa"]) == (L * 2 * K * E * itemsize, 0)
  assert decode_state_bytes(VARIANTS["mha"]) == (L * 2 * H * E * itemsize, 0)
  assert decode_state_bytes(VARIANTS["mla"]) == (L * (R + E // 2) * itemsize, 0)
  conv_state = L * ((H + K) * E * 2 * 4 + K * E // 2 * itemsize)  # fp32 raw [q|k] columns + the delayed value
  assert decode_state_bytes(variant("cca"))[1] == conv_state


def test_residual_scaling_off_equals_its_identity_initialisation():
  """At init (scales 1, biases 0) the learned merge is a plain add: both models give the same logits, and the
  variant has exactly the 4 x D x 2 residual parameters per layer fewer. (Equal up to rounding: XLA fuses the two
  forms differently.)"""
  on = ZayaForCausalLM(variant(), rngs=nnx.Rngs(5))
  off = ZayaForCausalLM(variant(residual_scaling=False), rngs=nnx.Rngs(5))
  ids = np.random.default_rng(2).integers(3, 512, (2, 7))
  np.testing.assert_allclose(forward(on, ids).logits_BTV, forward(off, ids).logits_BTV, atol=1e-6)
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(on) - count(off) == 2 * 2 * 4 * 64


def test_linear_router_has_no_depth_mixing():
  model = ZayaForCausalLM(variant(router="linear"), rngs=nnx.Rngs(6))
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  gate = sorted(n.split("mlp.gate.")[1] for n in names if ".layers.1.mlp.gate." in n)
  assert gate == ["out_proj.weight"]
  # Its choice is the argmax of softmax(W h) + biases, weighted by the unbiased probability (zero for the skip slot).
  router = model.model.layers[1].mlp.gate
  router.out_proj.weight[...] = 0.3 * jax.random.normal(jax.random.key(8), router.out_proj.weight.shape)
  router.balancing_biases[...] = jnp.array([0.0, 0.05, -0.05, 0.02, 0.0])
  h = jax.random.normal(jax.random.key(7), (2, 16, 64))
  probs, choice, weight, state = router(h, jnp.ones((2, 16, 16)))
  expected_probs = jax.nn.softmax(h @ router.out_proj.weight[...].T, axis=-1)
  expected_choice = jnp.argmax(expected_probs + router.balancing_biases[...], axis=-1)
  np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(choice, expected_choice)
  taken = jnp.take_along_axis(expected_probs, expected_choice[..., None], -1)[..., 0]
  np.testing.assert_allclose(weight, jnp.where(expected_choice == 4, 0.0, taken), rtol=1e-5)
  assert state is None and len(set(np.asarray(choice).ravel().tolist())) > 1


def test_variant_configs_are_checked_and_not_exported(tmp_path):
  with pytest.raises(ValueError, match=r"attention\.kind"):
    AttentionConfig(kind="linear")
  with pytest.raises(ValueError, match=r"moe\.router"):
    MoEConfig(router="topk")
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    AttentionConfig(kind="mla", partial_rotary_factor=1.0)
  with pytest.raises(ValueError, match="no Hugging Face"):
    VARIANTS["gqa"].to_hf()
  with pytest.raises(ValueError, match="no Hugging Face"):  # before anything is written
    save_hf(ZayaForCausalLM(VARIANTS["mla"], rngs=nnx.Rngs(0)), tmp_path / "export")
  assert os.listdir(tmp_path) == []
  assert variant().to_hf()["model_type"] == "zaya"
