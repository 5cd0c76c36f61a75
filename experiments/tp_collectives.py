"""What tensor parallelism of one CCA layer moves between devices: the collectives of its compiled forward + backward.

One ZAYA1-8B attention layer (hidden 2048, 8 query / 2 kv heads of 128; fp32), the value and gradient of a scalar of
its output with respect to its parameters and input, compiled on forced CPU devices under each --meshes plan. XLA's
SPMD partitioner places the collectives; nothing runs. Per mesh: the count of each kind, and the bytes of their
results summed (a collective-permute's or an all-gather's result is what the device receives; an all-reduce's, what
it sums), with the ten largest kinds by bytes. Megatron-style splitting needs two all-reduces of [B, T, D] per layer
(the output projection forward, the input gradient backward).

  python -m experiments.tp_collectives                            # data:4,tensor:2 / data:2,tensor:4 / tensor:8
  python -m experiments.tp_collectives --meshes=tensor:2 --batch=2 --out=/tmp/tp.json
"""

from __future__ import annotations

import collections
import math
import os
import re

if __name__ == "__main__":  # the device count is fixed when JAX starts
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments.common import git_commit, quiet_library_logging, write_json

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collectives(hlo_text: str) -> list[tuple[str, str, tuple[int, ...]]]:
  """(kind, dtype, result dims) of every collective in a compiled program's text (async ones once, at -start)."""
  found = re.findall(rf"= (\w+)\[([\d,]*)\]\S* ({'|'.join(COLLECTIVES)})(?:-start)?\(", hlo_text)
  return [(kind, dtype, tuple(int(n) for n in dims.split(",") if n)) for dtype, dims, kind in found]


def result_bytes(dtype: str, dims: tuple[int, ...]) -> int:
  return _DTYPE_BYTES[dtype] * math.prod(dims)


def layer_program(mesh: str, batch: int, seq: int) -> str:
  """The compiled text of one ZAYA1-8B CCA layer's value and gradient under `mesh`."""
  import zaya_jax
  from zaya_jax import sharding
  from zaya_jax.model.cca import CCAttention

  cfg = zaya_jax.ZayaConfig.zaya1_8b()
  layer = CCAttention(cfg.attention, cfg.hidden_size, "hybrid", std=0.02, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  plan = sharding.ShardingPlan.from_config(sharding.ParallelConfig(mesh=mesh))
  plan.check_heads(cfg.attention)
  params = jax.device_put(params, plan.shardings(params))
  h = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), jnp.float32,
                           sharding=jax.sharding.NamedSharding(plan.mesh, plan.spec(("batch", None, None))))
  segment_ids = jnp.ones((batch, seq), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))

  def loss(p, h):
    with plan.activate():
      out = nnx.merge(graphdef, p)(h, segment_ids, positions)
    return jnp.sum(out * out)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, h).compile().as_text()


FLAGS = flags.FLAGS
flags.DEFINE_list("meshes", ["data:4,tensor:2", "data:2,tensor:4", "tensor:8"], "Meshes over the 8 CPU devices.")
flags.DEFINE_integer("batch", 8, "Global batch B (split over the data axis).")
flags.DEFINE_integer("seq", 64, "Sequence length T.")
flags.DEFINE_string("out", None, "Results JSON (default experiments/results/tp_collectives.json).")


def main(argv):
  del argv
  quiet_library_logging()
  results = dict(jax=jax.__version__, commit=git_commit(), batch=FLAGS.batch, seq=FLAGS.seq, meshes={})
  for mesh in FLAGS.meshes:
    found = collectives(layer_program(mesh, FLAGS.batch, FLAGS.seq))
    counts = collections.Counter(kind for kind, _, _ in found)
    by_shape = collections.Counter()
    for kind, dtype, dims in found:
      by_shape[(kind, f"{dtype}{list(dims)}")] += result_bytes(dtype, dims)
    total = sum(by_shape.values())
    print(f"{mesh}: {len(found)} collectives {dict(counts)}, {total / 2**20:.2f} MiB of results")
    for (kind, shape), nbytes in by_shape.most_common(10):
      print(f"  {nbytes / 2**10:9.1f} KiB  {kind} {shape}")
    results["meshes"][mesh] = dict(counts=dict(counts), result_bytes=total,
                                   collectives=[[kind, dtype, list(dims)] for kind, dtype, dims in found])
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp_collectives.json")
  write_json(out, results)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
