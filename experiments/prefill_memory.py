"""Compiled memory of a prefill into an empty decode state: the chunk attending to itself (what `generate` and a
fresh `prefill` do) against the same chunk attending to the whole cache (a continued, chunked prefill's path).

B batch rows, L prompt tokens per row, N new tokens (the cache holds S = L + N - 1 entries, as `generate` sizes it).

XLA's own accounting of the compiled `_extend` program (`memory_analysis().temp_size_in_bytes`: buffers other than
arguments and outputs), nothing run. Over the whole cache a chunk's scores are [B, H, L, S]; over itself [B, H, L, L],
in causal query blocks on the XLA path and O(L) with the flash kernel (the GPU default, which this CPU cannot compile).

  python -m experiments.prefill_memory            # the tiny preset with 8:2 heads of 64, L = 512..4096, N = 1024
  python -m experiments.prefill_memory --quick    # L = 256, 512: seconds
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import zaya_jax
from experiments.common import apply_quick, quiet_library_logging, write_json
from zaya_jax.infer import decode

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 4, "Rows B.")
flags.DEFINE_list("prompt_lens", ["512", "1024", "2048", "4096"], "Prompt lengths L to compile.")
flags.DEFINE_integer("new_tokens", 1024, "New tokens N: the cache holds L + N - 1 entries.")
flags.DEFINE_bool("quick", False, "L = 256, 512 only (an explicit --prompt_lens wins).")
flags.DEFINE_string("out", None, "Results JSON (default experiments/results/prefill_memory.json, "
                    "prefill_memory_quick.json with --quick).")


def temp_bytes(model, cfg, B: int, L: int, S: int, fresh: bool) -> int:
  state = jax.eval_shape(lambda: decode.init_state(cfg, B, S))
  tokens = jax.ShapeDtypeStruct((B, L), jnp.int32)
  lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
  compiled = decode._jitted_extend.lower(model, state, tokens, lengths, fresh=fresh).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  tiny = zaya_jax.ZayaConfig.tiny()
  cfg = tiny.replace(attention=dataclasses.replace(tiny.attention, num_heads=8, num_kv_heads=2, head_dim=64),
                     max_position_embeddings=1 << 16)
  model = nnx.eval_shape(lambda: zaya_jax.ZayaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  apply_quick({"prompt_lens": ["256", "512"]})
  try:
    lens = [int(n) for n in FLAGS.prompt_lens]
  except ValueError:
    raise SystemExit(f"--prompt_lens: not integers: {FLAGS.prompt_lens}") from None
  if not lens or min(lens) < 1:
    raise SystemExit(f"--prompt_lens: need lengths >= 1, got {FLAGS.prompt_lens}")
  B, N = FLAGS.batch, FLAGS.new_tokens
  rows = []
  print(f"B={B}, N={N}, heads {cfg.attention.num_heads}:{cfg.attention.num_kv_heads} of {cfg.attention.head_dim}, "
        f"{cfg.num_layers} layers; temp MiB of one prefill call ({jax.devices()[0].platform}, XLA attention)")
  print(f"{'L':>6} {'S':>6} {'whole cache':>12} {'chunk only':>11} {'ratio':>6}")
  for L in lens:
    S = L + N - 1
    cached, fresh = (temp_bytes(model, cfg, B, L, S, f) for f in (False, True))
    rows.append(dict(prompt_len=L, cache_len=S, whole_cache_temp_bytes=cached, chunk_only_temp_bytes=fresh,
                     ratio=cached / fresh))
    print(f"{L:>6} {S:>6} {cached / 2**20:>12.1f} {fresh / 2**20:>11.1f} {cached / fresh:>5.2f}x")
  default = "experiments/results/prefill_memory" + ("_quick" if FLAGS.quick else "") + ".json"
  write_json(FLAGS.out or default,
             dict(batch=B, new_tokens=N, config=dataclasses.asdict(cfg.attention), rows=rows,
                  platform=jax.devices()[0].platform, jax=jax.__version__, nproc=os.cpu_count()))


if __name__ == "__main__":
  app.run(main)
