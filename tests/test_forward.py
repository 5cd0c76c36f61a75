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

  # Scaling the final norm's weight by a power of two scales every logit exactly by it (the head is linear), so
  # the jitted forward must give exactly 2x, then (a new Variable object) exactly the original logits.
  norm = model.model.norm.weight
  norm[...] = 2.0 * norm[...]  # in place, as an optimizer step or nnx.update does
  np.testing.assert_array_equal(np.asarray(zaya_jax.forward(model, ids).logits_BTV), 2 * before)
  model.model.norm.weight = nnx.Param(0.5 * norm[...])
  np.testing.assert_array_equal(np.asarray(zaya_jax.forward(model, ids).logits_BTV), before)
