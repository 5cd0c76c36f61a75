"""What tensor parallelism of one CCA layer moves between devices: the collectives of its compiled forward + backward.

One ZAYA1-8B attention layer (hidden 2048, 8 query / 2 kv heads of 128; fp32), the value and gradient of a scalar of
its output with respect to its parameters and input, compiled on forced CPU devices under each --meshes plan. XLA's
SPMD partitioner places the collectives; nothing runs. Per mesh: the count of each kind, and the bytes of their
results summed (a collective-permute's or an all-gather's result is what the device receives; an all-reduce's, what
it sums), with the ten largest kinds by bytes. Megatron-style splitting needs two all-reduces of [B, T, D] per layer
(the output projection forward, the input gradient backward).

Each mesh runs on as many devices as it names, --batch rows per data replica. On a mesh with a data axis the
gradients' all-reduce over it is one of the collectives (combined into one all-reduce of every parameter's gradient:
~21 MiB at data:4, ~12.6 MiB at data:4,tensor:2); data:4 alone shows what data parallelism moves.

  python -m experiments.tp_collectives      # data:4, tensor:2, tensor:4, tensor:8, data:4,tensor:2; 2 rows of 64 each
  python -m experiments.tp_collectives --mesh=tensor:2 --mesh=data:2,tensor:4 --out=/tmp/tp.json
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

import zaya_jax
from experiments.common import git_commit, quiet_library_logging, write_json
from zaya_jax import sharding
from zaya_jax.model.cca import CCAttention

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
  """(kind, [(dtype, result dims), ...]) of every collective in a compiled program's text. A combined collective
  (XLA merges the gradients' all-reduces, and all-to-alls with several operands) has a tuple of results, listed
  each; an async one is read at its -start, whose tuple ends with its result."""
  found = []
  for result, kind, start in re.findall(rf"= (\([^()]*\)|\w+\[[\d,]*\]\S*) ({'|'.join(COLLECTIVES)})(-start)?\(",
                                        hlo_text):
    arrays = [(dtype, tuple(int(n) for n in dims.split(",") if n))
              for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result)]
    found.append((kind, arrays[-1:] if start and result.startswith("(") else arrays))
  return found


def result_bytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
  return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in arrays)


def layer_program(mesh: str, batch: int, seq: int) -> str:
  """The compiled text of one ZAYA1-8B CCA layer's value and gradient under `mesh` (on its number of devices),
  `batch` rows per data replica."""
  cfg = zaya_jax.ZayaConfig.zaya1_8b()
  layer = CCAttention(cfg.attention, cfg.hidden_size, "hybrid", std=0.02, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  sizes = sharding.parse_mesh(mesh)
  devices = jax.devices()[:math.prod(sizes.values())]
  plan = sharding.ShardingPlan.from_config(sharding.ParallelConfig(mesh=mesh), devices=devices)
  plan.check_heads(cfg.attention)
  batch *= math.prod(plan.size(a) for a in plan.batch_axes)
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
flags.DEFINE_multi_string("mesh", ["data:4", "tensor:2", "tensor:4", "tensor:8", "data:4,tensor:2"],
                          "A mesh over up to 8 CPU devices; repeat the flag for several.")
flags.DEFINE_integer("batch", 2, "Rows B per data replica.")
flags.DEFINE_integer("seq", 64, "Sequence length T.")
flags.DEFINE_string("out", None, "Results JSON (default experiments/results/tp_collectives.json).")


def main(argv):
  del argv
  quiet_library_logging()
  results = dict(jax=jax.__version__, commit=git_commit(), batch=FLAGS.batch, seq=FLAGS.seq, meshes={})
  for mesh in FLAGS.mesh:
    found = collectives(layer_program(mesh, FLAGS.batch, FLAGS.seq))
    counts = collections.Counter(kind for kind, _ in found)
    by_shape = collections.Counter()
    for kind, arrays in found:
      shape = " + ".join(f"{dtype}{list(dims)}" for dtype, dims in arrays)
      by_shape[(kind, shape if len(shape) < 90 else f"{len(arrays)} arrays")] += result_bytes(arrays)
    total = sum(by_shape.values())
    print(f"{mesh}: {len(found)} collectives {dict(counts)}, {total / 2**20:.2f} MiB of results")
    for (kind, shape), nbytes in by_shape.most_common(10):
      print(f"  {nbytes / 2**10:9.1f} KiB  {kind} {shape}")
    results["meshes"][mesh] = dict(counts=dict(counts), result_bytes=total,
                                   collectives=[[kind, [[dtype, list(dims)] for dtype, dims in arrays]]
                                                for kind, arrays in found])
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp_collectives.json")
  write_json(out, results)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
