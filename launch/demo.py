"""The main job until training lands: ZAYA1-8B figures (abstract, nothing allocated) and a small
random model forward.

  python launch/demo.py [--batch 2 --seq 64 --layers 2]
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import zaya_jax
from zaya_jax.figures import model_figures

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size of the random forward.")
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length of the random forward.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Layers of the small random model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and token ids.")


def main(argv):
  del argv
  cfg = zaya_jax.ZayaConfig.zaya1_8b()
  f = model_figures(cfg)
  print("ZAYA1-8B (native layout), computed with nnx.eval_shape:")
  print(f"  total parameters          {f.total_params:>15,}  ({f.total_params / 1e9:.2f}B)")
  print(f"  embedding (tied head)     {f.embedding_params:>15,}")
  print(f"  experts                   {f.expert_params:>15,}")
  print(f"  active per token          {f.active_params:>15,}  ({f.active_params / 1e9:.2f}B, without embedding)")
  print(f"  active incl. embedding    {f.active_params_with_embedding:>15,}")
  print(f"  KV cache per token        {f.kv_cache_bytes_per_token:>15,} B  ({cfg.dtype})")
  print(f"  16-head MHA KV per token  {f.mha_kv_cache_bytes_per_token:>15,} B  -> {f.kv_compression:.0f}x smaller")
  print(f"  conv + delayed-value state {f.recurrent_state_bytes_per_sequence:>14,} B per sequence")

  small = zaya_jax.ZayaConfig.tiny(num_layers=_LAYERS.value)
  model = zaya_jax.ZayaForCausalLM(small, rngs=nnx.Rngs(_SEED.value))
  ids = np.random.default_rng(_SEED.value).integers(0, small.vocab_size, (_BATCH.value, _SEQ.value))
  start = time.perf_counter()
  out = jax.block_until_ready(zaya_jax.forward(model, ids))
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(zaya_jax.forward(model, ids))
  again = time.perf_counter() - start
  n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  print(f"\nRandom tiny model: {n_params:,} parameters, {small.num_layers} layers, {small.moe.num_experts} experts")
  finite = bool(np.isfinite(out.logits_BTV).all())
  print(f"  logits {tuple(out.logits_BTV.shape)} {out.logits_BTV.dtype}, finite: {finite}")
  print(f"  tokens per expert (last layer, skip slot last): {np.asarray(out.router.counts_LX1[-1]).tolist()}")
  print(f"  forward: first call {first:.2f} s (incl. compile), then {again * 1e3:.1f} ms")


if __name__ == "__main__":
  app.run(main)
