"""Greedy batched decoding speed of zaya_jax.infer.generate against `transformers` generate, on this CPU.

B batch rows, P prompt tokens per row, N new tokens per row.

Builds one random reference model (tests/reference.make_reference: every parameter redrawn, so logits are spread out
and greedy choices are far from ties), saves it, loads the same weights into zaya_jax, then generates N tokens for
B prompts of P tokens greedily with both, checks that the tokens are identical, and times (interleaved, median of
--reps): ours — one jitted program, ragged prefill plus a `lax.while_loop` of cached steps — against the reference's
`generate(use_cache=True, do_sample=False)` with eager attention and experts, and with its default fast paths (sdpa
attention, default experts implementation). No stop tokens: every row generates exactly N tokens in both.

  python -m experiments.bench_decode            # from the repo root; B=16, P=32, N=128, ~14M-parameter fp32 model
  python -m experiments.bench_decode --quick    # tiny smoke test, seconds
  python -m experiments.bench_decode --experts_variants=auto,tiled64,dense   # expert-matmul paths side by side
  python -m experiments.bench_decode --routing=balanced   # biases as PID balancing leaves them; _balanced.json

--experts_variants times ours once per expert backend, interleaved with the references in the same repetitions (the
first is the "ours" row; speedups are given for each): a name from zaya_jax.config.EXPERT_BACKENDS, or "tiled64" —
the "tiled" backend as it was before the shape-dependent strategies (64-row tiles at every M).

The model shape flags (--hidden, --layers, --heads, --kv_heads, --head_dim, --experts, --moe_intermediate,
--router_hidden, --vocab, --dtype, --seed, --reps, --warmup, --batch, --sdpa, --out) are experiments/bench_forward.py's,
with the defaults below: hidden 256, 4 layers, 4:2 heads of 64, 8 experts of width 512, vocab 1024, fp32. At this
size a step of ours is bound by the expert matmuls, which read ~50 MB of weights a step: from the last-level cache
where it holds them, from memory on the 2-core AMD EPYC (32 MB L3), and XLA:CPU's small-M dots read them at 12-26
GB/s there, 21-57 in cache (WORKSPACE.md, "CPU speed ceilings"). The run also times reads of a buffer the size of
the parameters (every step reads them once) and prints them beside the step time the goal needs.
Goal (project issue): ours >= 5x the reference's tokens/s.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags
from flax import nnx

import zaya_jax
from experiments import bench_forward as bf  # its model-shape flags, reference loader, timer and CPU-share meter
from experiments.common import quiet_library_logging
from zaya_jax.config import EXPERT_BACKENDS
from zaya_jax.infer import GREEDY, generate
from zaya_jax.ops import gmm as gmm_ops
from zaya_jax.train import balancing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from reference import make_reference

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(bf)  # its shape, --quick and --out flags: listed by --help too
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens P per row (every row the same length, as the reference's "
                     "batched generate needs without padding).")
flags.DEFINE_integer("new_tokens", 128, "New tokens N per row.")
flags.DEFINE_enum("routing", "drawn", ["drawn", "balanced"], "drawn: the random checkpoint's own balancing biases "
                  "(its untrained routers send most rows to one or two experts); balanced: biases first moved by the "
                  "training's PID rule on the benchmark's own tokens, as in a checkpoint trained with PID balancing "
                  "(the greedy generation changes with the biases, so the timed tokens end up less even than the "
                  "ones calibrated on: the JSON's routing_balance). Both sides load the same biases.")
flags.DEFINE_list("experts_variants", ["auto"], "Expert backends to time ours with (the first is the 'ours' row): "
                  f"{', '.join(EXPERT_BACKENDS)} or tiled64 (the old fixed 64-row tiles).")

# bench_forward's flags with this benchmark's defaults (flags given on the command line win).
DEFAULTS = dict(batch=16, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=8, moe_intermediate=512,
                router_hidden=64, vocab=1024, reps=3, warmup=1)
QUICK = dict(batch=4, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4, moe_intermediate=64,
             router_hidden=16, vocab=512, prompt_len=8, new_tokens=16, reps=2, warmup=1)
GOAL_REF_SPEEDUP = 5.0
READ_WEIGHTS, READ_CALLS = "read_weights", 8  # the timed parameter-sized reads per repetition (not a candidate)


# The old "tiled" behaviour, for before/after runs in one process: registered only by this benchmark.
LEGACY_VARIANTS = {"tiled64": lambda lhs, rhs, gs, t: gmm_ops.tiled_gmm(lhs, rhs, gs.astype("int32"), t, 64)}


def with_experts_backend(model, backend: str):
  """A copy of `model` whose expert modules call gmm with `backend` (a static attribute: its own compiled program)."""
  if backend in LEGACY_VARIANTS:
    gmm_ops._BACKENDS.setdefault(backend, LEGACY_VARIANTS[backend])
  elif backend not in EXPERT_BACKENDS:
    raise SystemExit(f"--experts_variants: {backend!r} is not one of {EXPERT_BACKENDS + tuple(LEGACY_VARIANTS)}")
  model = nnx.clone(model)
  experts = [node for _, node in nnx.iter_graph(model) if hasattr(node, "gate_up_proj") and hasattr(node, "backend")]
  assert experts, "no expert modules found"
  for node in experts:
    node.backend = backend
  return model


def routing_balance(model, tokens_BT) -> list[float]:
  """Per layer, the busiest expert's share of `tokens_BT`'s tokens divided by the even share (1.0 = even)."""
  counts_LX = np.asarray(zaya_jax.forward(model, tokens_BT).router.counts_LX1)[:, :-1]
  return [round(float(c.max() / max(c.sum(), 1) * len(c)), 2) for c in counts_LX]


def balance_routing(model, prompts_BP, lens_B, new_tokens: int, rounds: int = 6, steps: int = 50) -> None:
  """Sets `model`'s balancing biases as PID balancing would have in training, for this benchmark's tokens: each round
  generates greedily, then takes `steps` steps of the training's controller (zaya_jax.train.balancing, kp 1e-2)
  on the forward over prompts + generated tokens (the generation changes as the routing does, hence the rounds).
  main() reports the balance on the generation it times, made with the final biases."""
  routers = [node for _, node in nnx.iter_graph(model) if hasattr(node, "balancing_biases")]
  rule = balancing.BalancingConfig(mode="pid", kp=1e-2)
  pid = balancing.init_pid(len(routers), model.config.moe.num_experts)
  for _ in range(rounds):
    out = generate(model, prompts_BP, lens_B, key=jax.random.key(0), max_new_tokens=new_tokens, sampling=GREEDY)
    tokens_BT = np.concatenate([prompts_BP, np.asarray(out.tokens_BN)], axis=1)
    for _ in range(steps):
      counts_LX1 = zaya_jax.forward(model, tokens_BT).router.counts_LX1
      biases_LX1, pid = balancing.pid_update(rule, pid, jnp.stack([r.balancing_biases[...] for r in routers]),
                                             counts_LX1)
      for router, biases_X1 in zip(routers, biases_LX1, strict=True):
        router.balancing_biases[...] = biases_X1


def apply_defaults() -> None:
  for name, value in {**DEFAULTS, **(QUICK if FLAGS.quick else {})}.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  retained = bf.apply_host_memory()
  apply_defaults()
  transformers.utils.logging.disable_progress_bar()
  B, P, N = FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  print(f"machine: {cpu}, nproc={os.cpu_count()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}")
  print(f"freed host memory kept mapped (--retain_host_memory): {retained}")

  hf_kwargs = dict(
      vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, num_hidden_layers=FLAGS.layers,
      num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim,
      num_experts=FLAGS.experts, moe_intermediate_size=FLAGS.moe_intermediate, router_hidden_size=FLAGS.router_hidden,
      max_position_embeddings=max(P + N, 256), bos_token_id=2, eos_token_id=1, pad_token_id=0)
  prompts_BP = np.random.default_rng(FLAGS.seed).integers(3, FLAGS.vocab, (B, P)).astype(np.int32)
  lens_B = np.full((B,), P, np.int32)
  with tempfile.TemporaryDirectory() as path:
    make_reference(path, seed=FLAGS.seed, dtype=bf.TORCH_DTYPES[FLAGS.dtype], **hf_kwargs)
    model = zaya_jax.load_hf(path, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
    if FLAGS.routing == "balanced":
      balance_routing(model, prompts_BP, lens_B, N)
      path = os.path.join(path, "balanced")
      zaya_jax.save_hf(model, path)  # the references load the same biases
    refs = {"ref_eager": bf.load_reference(path, fast=False)}
    if FLAGS.sdpa:
      refs["ref_sdpa"] = bf.load_reference(path, fast=True)
  cfg = model.config
  n_ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  impls = {name: (r.config._attn_implementation, r.config._experts_implementation) for name, r in refs.items()}
  print(f"config: B={B} P={P} N={N} D={cfg.hidden_size} L={cfg.num_layers} H={cfg.attention.num_heads} "
        f"K={cfg.attention.num_kv_heads} E={cfg.attention.head_dim} X={cfg.moe.num_experts} "
        f"F={cfg.moe.intermediate_size} R={cfg.moe.router_hidden_size} V={cfg.vocab_size} dtype={FLAGS.dtype}; "
        f"params {n_ours / 1e6:.2f}M; experts backend={cfg.moe.backend}; reference (attention, experts): {impls}")

  prompts_t = torch.as_tensor(prompts_BP, dtype=torch.long)
  key = jax.random.key(0)

  def ours_runner(variant_model):
    def run():
      out = generate(variant_model, prompts_BP, lens_B, key=key, max_new_tokens=N, sampling=GREEDY)
      return np.asarray(out.tokens_BN)  # the host copy waits for the result
    return run

  variants = FLAGS.experts_variants
  ours_names = ["ours"] + [f"ours[{v}]" for v in variants[1:]]
  ours_runners = {name: ours_runner(with_experts_backend(model, v) if v != cfg.moe.backend else model)
                  for name, v in zip(ours_names, variants, strict=True)}
  run_ours = ours_runners["ours"]

  def ref_runner(ref):
    def run():
      with torch.no_grad():
        seq = ref.generate(prompts_t, attention_mask=torch.ones_like(prompts_t), max_new_tokens=N, min_new_tokens=N,
                           do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
      return seq[:, P:].numpy()
    return run

  runners = {**ours_runners, **{name: ref_runner(r) for name, r in refs.items()}}

  # First call of ours compiles; its excess over the steady-state median is reported as compile time.
  first_call_s = bf.timed(run_ours)
  ours = run_ours()
  mismatches = {}
  for name in [*refs, *ours_names[1:]]:
    theirs = runners[name]()
    rows_equal = (theirs == ours).all(axis=1)
    mismatches[name] = int((~rows_equal).sum())
    if not rows_equal.all():
      b = int(np.flatnonzero(~rows_equal)[0])
      t = int(np.flatnonzero(theirs[b] != ours[b])[0])
      print(f"{name}: row {b} first differs at new token {t}: ours {ours[b, t:t + 5]}, theirs {theirs[b, t:t + 5]}")
  balance = routing_balance(model, np.concatenate([prompts_BP, ours], axis=1))
  print(f"rows whose {N} greedy tokens differ from ours: {mismatches} (of {B}); distinct tokens generated: "
        f"{len(np.unique(ours))}; routing ({FLAGS.routing}), busiest expert / even share per layer: {balance}")
  if any(mismatches.values()):
    raise SystemExit(f"TOKEN MISMATCH: {mismatches}; timings would compare different generations")

  # What a step costs at least: it reads every parameter once (the tied LM head reads the whole embedding). Timed as
  # READ_CALLS jitted sums over a buffer of the parameters' size per repetition, interleaved with the rest, so a model
  # whose weights outgrow the host's last-level cache meets the memory bandwidth the host actually gives. (A call
  # includes a dispatch, ~0.05 ms: for models of a few MB the figure is mostly that.)
  weight_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model)))
  weights_buf = jnp.ones((weight_bytes // 4,), jnp.float32)
  read_once = jax.jit(jnp.sum)

  def read_weights():
    for _ in range(READ_CALLS):
      read_once(weights_buf).block_until_ready()

  times, others = bf.interleaved_times({**runners, READ_WEIGHTS: read_weights})
  read_times = [t / READ_CALLS for t in times.pop(READ_WEIGHTS)]
  read_s = statistics.median(read_times)
  median = {name: statistics.median(ts) for name, ts in times.items()}

  rows = {name: dict(median_s=median[name], min_s=min(times[name]), tokens_per_s=B * N / median[name],
                     ms_per_step=1e3 * median[name] / N) for name in runners}
  speedups = {name: rows["ours"]["tokens_per_s"] / rows[name]["tokens_per_s"] for name in refs}
  variant_speedups = {o: {name: rows[o]["tokens_per_s"] / rows[name]["tokens_per_s"] for name in refs}
                      for o in ours_names}
  fastest_ref = max(refs, key=lambda name: rows[name]["tokens_per_s"])
  goal = f"ours >= {GOAL_REF_SPEEDUP}x the fastest reference's tokens/s ({fastest_ref})"
  met = speedups[fastest_ref] >= GOAL_REF_SPEEDUP

  print(f"\n{'candidate':<16} {'median s':>9} {'min s':>8} {'tokens/s':>10} {'ms/step':>8} {'ours / it':>10}")
  for name, row in rows.items():
    ratio = f"{speedups[name]:.2f}x" if name in speedups else ""
    print(f"{name:<16} {row['median_s']:>9.3f} {row['min_s']:>8.3f} {row['tokens_per_s']:>10.0f} "
          f"{row['ms_per_step']:>8.2f} {ratio:>10}")
  print("\n(tokens/s = B*N / time of the whole call, prefill of B*P prompt tokens included; ms/step = time / N)")
  if FLAGS.routing == "balanced":  # the calibration's calls compiled it: the first timed call's excess is noise
    print(f"ours compiled during the routing calibration (first call {first_call_s:.2f} s)")
  else:
    print(f"ours compile ~{first_call_s - median['ours']:.2f} s (first call {first_call_s:.2f} s)")
  print(f"goal {goal}: {'MET' if met else 'NOT MET'} ({speedups[fastest_ref]:.2f}x)")
  goal_step_ms = rows[fastest_ref]["ms_per_step"] / GOAL_REF_SPEEDUP
  print(f"reading the {weight_bytes / 2**20:.1f} MiB of parameters once (a jitted sum over a buffer of that size, "
        f"{READ_CALLS} per repetition): median {1e3 * read_s:.2f} ms, min {1e3 * min(read_times):.2f} "
        f"({weight_bytes / read_s / 1e9:.0f} GB/s at the median); every step reads them, and the goal needs "
        f"<= {goal_step_ms:.2f} ms a step")
  for o in ours_names[1:]:
    print(f"{o} / references: " + ", ".join(f"{name} {r:.2f}x" for name, r in variant_speedups[o].items())
          + f"; ours / {o}: {rows[o]['median_s'] / median['ours']:.2f}x")
  print(f"other processes used {others:.0%} of the CPUs while timing"
        + (": timings are inflated and noisy, compare min s too or rerun on a quiet machine" if others > 0.1 else ""))

  results = dict(
      machine=dict(cpu=cpu, nproc=os.cpu_count(), other_processes_cpu_share=others, retain_host_memory=retained,
                   torch_threads=torch.get_num_threads(), jax=jax.__version__, torch=torch.__version__,
                   transformers=transformers.__version__),
      config=dict(batch=B, prompt_len=P, new_tokens=N, dtype=FLAGS.dtype, reps=FLAGS.reps, warmup=FLAGS.warmup,
                  routing=FLAGS.routing, routing_balance=balance,
                  params_ours=n_ours, zaya=cfg.to_hf(), experts_backend=cfg.moe.backend, reference_impls=impls,
                  experts_variants=dict(zip(ours_names, variants, strict=True))),
      rows_with_token_mismatch=mismatches, first_call_s=first_call_s,
      compile_s=None if FLAGS.routing == "balanced" else first_call_s - median["ours"],  # calibration compiled it
      results=rows, times_s=times, weight_read=dict(bytes=weight_bytes, median_ms=1e3 * read_s,
                                                          times_ms=[1e3 * t for t in read_times]), speedup=speedups,
      speedup_by_variant=variant_speedups, goal={goal: met})
  bf.write_results(results, "bench_decode" + ("_balanced" if FLAGS.routing == "balanced" else ""))


if __name__ == "__main__":
  app.run(main)
