"""`forward()` (the jitted entry point) tracks the model it is given: values updated in place and structure."""

import numpy as np
from flax import nnx

import zaya_jax
from zaya_jax import ZayaConfig


def test_forward_sees_parameter_updates_between_calls():
  model = zaya_jax.ZayaForCausalLM(ZayaConfig.tiny(num_layers=2, dtype="float32", param_dtype="float32"),
                                   rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 8)).astype(np.int32)
  before = np.asarray(zaya_jax.forward(model, ids).logits_BTV)

  norm = model.model.norm.weight
  norm[...] = 2.0 * norm[...]  # in place, as an optimizer step or nnx.update does
  after = np.asarray(zaya_jax.forward(model, ids).logits_BTV)
  assert not np.allclose(after, before)
  np.testing.assert_allclose(after, np.asarray(model(ids).logits_BTV), rtol=1e-5, atol=1e-5)

  model.model.norm.weight = nnx.Param(0.5 * norm[...])  # a new Variable object
  np.testing.assert_allclose(np.asarray(zaya_jax.forward(model, ids).logits_BTV), np.asarray(model(ids).logits_BTV),
                             rtol=1e-5, atol=1e-5)
