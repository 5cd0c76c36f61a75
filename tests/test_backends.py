"""The whole model with the Pallas backends (interpret mode here) equals the XLA backends: logits and gradients; and on
a GPU the default backends put a decode step's attention and expert matmuls in the Triton kernels."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zaya_jax
from zaya_jax import AttentionConfig, ZayaConfig
from zaya_jax.infer import decode


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_pallas_backends_match_xla_backends_on_packed_rows():
  attention = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=5, backend="xla")
  cfg = ZayaConfig.tiny(layer_types=("hybrid", "hybrid_sliding"), attention=attention)
  pallas_cfg = cfg.replace(attention=dataclasses.replace(attention, backend="pallas"),
                           moe=dataclasses.replace(cfg.moe, backend="pallas"))
  graphdef, state = nnx.split(zaya_jax.ZayaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  pallas_graphdef, _ = nnx.split(zaya_jax.ZayaForCausalLM(pallas_cfg, rngs=nnx.Rngs(0)))
  # Keys must matter: the default temperature 0 would make attention uniform.
  for path, var in nnx.to_flat_state(state):
    if path[-1] == "temp":
      var.set_value(jnp.full(var.shape, 2.5, var.dtype))
  rng = np.random.default_rng(4)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)))
  segments = jnp.asarray(np.repeat([[1, 2, 3]], 2, 0).repeat([7, 9, 4], axis=1))

  def loss(params, graphdef):
    logits = nnx.merge(graphdef, params)(ids, segments).logits_BTV
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]), logits

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (value, logits), grads = step(state, graphdef)
  (pallas_value, pallas_logits), pallas_grads = step(state, pallas_graphdef)
  assert rel_err(pallas_logits, logits) <= 1e-5
  np.testing.assert_allclose(pallas_value, value, rtol=1e-5)
  for (path, g), (_, pg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(pallas_grads), strict=True):
    if path[-1] == "balancing_biases":  # selection only: no gradient on either path
      assert not np.asarray(g[...]).any() and not np.asarray(pg[...]).any()
      continue
    assert rel_err(pg[...], g[...]) <= 1e-4, path


def two_layer_model(**attention):
  """A two-layer model (the second layer sliding), abstract: (config, graphdef, params)."""
  attention = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=5, **attention)
  cfg = ZayaConfig.tiny(layer_types=("hybrid", "hybrid_sliding"), attention=attention)
  return cfg, *nnx.split(nnx.eval_shape(lambda: zaya_jax.ZayaForCausalLM(cfg, rngs=nnx.Rngs(0))))


def triton_kernels(fn, platform: str, *args) -> list[str]:
  """The names of the Triton kernels in `fn` lowered for `platform` (a GPU one) from this CPU, sorted."""
  disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  module = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args).mlir_module()
  return sorted(re.findall(r'custom_call @__gpu\$xla\.gpu\.triton.*?name = \\?"(\w+)', module))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the Pallas Triton backend's, on every pallas_call
@pytest.mark.parametrize("platform", ["rocm", "cuda"])
def test_default_decode_step_on_a_gpu_runs_the_triton_kernels(platform, monkeypatch):
  # What "auto" picks on a GPU, lowered from this CPU: one decode step of a two-layer model (one sliding layer) has
  # each layer's attention in the flash-decoding kernel and its two expert matmuls in the grouped-matmul kernel.
  cfg, graphdef, params = two_layer_model()
  assert cfg.attention.backend == cfg.moe.backend == "auto"
  state = jax.eval_shape(lambda: decode.init_state(cfg, 3, 40))

  def step(params, state, tokens_B):
    return decode._extend(nnx.merge(graphdef, params), state, tokens_B[:, None], jnp.ones_like(tokens_B))

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  kernels = triton_kernels(step, platform, params, state, jax.ShapeDtypeStruct((3,), jnp.int32))
  assert kernels == ["cca_decode"] * 2 + ["zaya_gmm"] * 4, kernels


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_default_forward_on_a_gpu_runs_the_triton_kernels(monkeypatch):
  # The training and prefill path: each layer's attention in the flash kernel, its expert matmuls in the gmm kernel.
  _, graphdef, params = two_layer_model()

  def forward(params, ids_BT, segment_ids_BT, graphdef=graphdef):
    return nnx.merge(graphdef, params)(ids_BT, segment_ids_BT).logits_BTV

  # The same kernel calls traced on this CPU first (interpret mode), as an earlier test in this worker may have done:
  # the GPU program must not reuse those traces (the kernels resolve interpret mode outside their jit).
  ids_BT = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  _, cpu_graphdef, _ = two_layer_model(backend="pallas")
  jax.eval_shape(functools.partial(forward, graphdef=cpu_graphdef), params, ids_BT, ids_BT)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  kernels = triton_kernels(forward, "rocm", params, ids_BT, ids_BT)
  assert kernels == ["cca_flash_fwd"] * 2 + ["zaya_gmm"] * 4, kernels


def test_the_device_scripts_run_without_grain():
  """A lent GPU machine has JAX, Triton and no grain: the scripts its one prepared run calls must not import it
  (experiments.common once re-exported the experiment config, which pulls in the data pipeline)."""
  import os
  import subprocess
  import sys

  scripts = ["experiments.bench_kernels", "experiments.bench_cca_attention", "experiments.bench_decode_attention",
             "experiments.step_memory", "pallas_kernels.rocm_report"]
  block = ("import sys\n"
           "class NoGrain:\n"
           "  def find_spec(self, name, path=None, target=None):\n"
           "    if name == 'grain' or name.startswith('grain.'):\n"
           "      raise ImportError('no grain on this machine')\n"
           "sys.meta_path.insert(0, NoGrain())\n"
           "__import__(sys.argv[1])\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in scripts:  # one process each: the scripts define absl flags of the same names
    proc = subprocess.run([sys.executable, "-c", block, name], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, (name, proc.stderr[-2000:])
