"""Forward speed of zaya_jax against the reference `transformers` ZAYA1, side by side on this CPU.

Builds one random reference model, saves it, loads the same weights into zaya_jax, checks that the
logits agree, then times (interleaved, median of --reps) our jitted forward, the reference with eager
attention and experts, the reference with its default fast paths (sdpa attention, default experts
implementation) and a large jnp.dot as the machine's matmul ceiling. FLOPs are counted analytically.

  python -m experiments.bench_forward            # from the repo root; ~16M-parameter model, batch 4 x 256 tokens
  python -m experiments.bench_forward --quick    # tiny smoke test, seconds

Goals (project issue): ours >= 1.5x the eager reference's tokens/s, and >= half the large-matmul FLOP/s.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

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
from experiments.common import apply_quick, quiet_library_logging, write_json
from zaya_jax import host_memory
from zaya_jax.model.decoder import EXACT_ROUNDING

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Tiny config and 2 reps (flags given explicitly still win).")
flags.DEFINE_integer("batch", 4, "Batch size B.")
flags.DEFINE_integer("seq", 256, "Sequence length T.")
flags.DEFINE_integer("hidden", 256, "Hidden size D.")
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("heads", 4, "Query heads H.")
flags.DEFINE_integer("kv_heads", 2, "Key/value heads K.")
flags.DEFINE_integer("head_dim", 64, "Head dim E.")
flags.DEFINE_integer("experts", 8, "Experts X (the router has X + 1 classes).")
flags.DEFINE_integer("moe_intermediate", 512, "Expert FFN width F.")
flags.DEFINE_integer("router_hidden", 64, "Router hidden size R.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary size V.")
flags.DEFINE_integer("reps", 10, "Timed repetitions per candidate (median reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed calls per candidate before timing (after compile).", lower_bound=0)
flags.DEFINE_integer("matmul_size", 2048, "N of the N x N @ N x N jnp.dot ceiling.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype of both models.")
flags.DEFINE_float("atol", None, "Max |logits diff| allowed (default 1e-4 for float32, 5e-2 for bfloat16).")
flags.DEFINE_bool("sdpa", True, "Also time the reference with sdpa attention and its default experts path.")
flags.DEFINE_integer("seed", 0, "Seed of weights and token ids.")
flags.DEFINE_bool("retain_host_memory", True, "Keep freed host memory mapped and run JAX's CPU calls on the "
                  "calling thread (zaya_jax.host_memory) in this process, which runs ours and the reference alike; "
                  "false: glibc's defaults and JAX's asynchronous dispatch.")
flags.DEFINE_string("out", None, "Where to write the JSON results (default: experiments/results/<benchmark>...json, "
                    "named after the benchmark and its mode, e.g. bench_forward_bf16_quick.json).")

QUICK = dict(batch=2, seq=32, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4,
             moe_intermediate=64, router_hidden=16, vocab=512, reps=2, warmup=1, matmul_size=256)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GOAL_REF_SPEEDUP = 1.5
GOAL_MATMUL_FRACTION = 0.5


def apply_host_memory() -> bool:
  """The process-wide allocator setting of --retain_host_memory, before anything allocates; whether it applied."""
  return FLAGS.retain_host_memory and host_memory.retain_freed_memory()


def hf_config() -> transformers.ZayaConfig:
  return transformers.ZayaConfig(
      vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, num_hidden_layers=FLAGS.layers,
      num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim,
      num_experts=FLAGS.experts, moe_intermediate_size=FLAGS.moe_intermediate,
      router_hidden_size=FLAGS.router_hidden, max_position_embeddings=max(FLAGS.seq, 256),
      bos_token_id=2, eos_token_id=1, pad_token_id=0)


def build_reference(path: str) -> None:
  """A random fp32 reference saved to `path`: default init except where it makes the model degenerate.

  qk temperatures init to 0, which makes attention uniform: set to 3. Router weights init to std 0.02,
  which makes router probabilities near-uniform: in bf16 the top two then tie and rounding picks the
  expert. Fan-in scaled router weights decide clearly; bf16 probabilities still tie exactly now and then,
  and tiny random balancing biases (far below the bf16 step of a probability) break those ties alike in both.
  """
  torch.manual_seed(FLAGS.seed)
  ref = transformers.ZayaForCausalLM._from_config(
      hf_config(), attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for layer in ref.model.layers:
      layer.self_attn.qk_norm.temp.fill_(3.0)
      gate = layer.mlp.gate
      for lin in (gate.down_proj, gate.router_mlp.fc1, gate.router_mlp.fc2, gate.router_mlp.out_proj):
        lin.weight.normal_(0.0, lin.in_features**-0.5)
      gate.balancing_biases[:-1] = 1e-5 * torch.randn(FLAGS.experts)  # the skip slot keeps -1: unreachable
  ref.eval().save_pretrained(path)


def load_reference(path: str, fast: bool) -> torch.nn.Module:
  kw = {} if fast else dict(experts_implementation="eager")
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=TORCH_DTYPES[FLAGS.dtype], attn_implementation="sdpa" if fast else "eager", **kw).eval()


def forward_flops(cfg: zaya_jax.ZayaConfig, B: int, T: int, routed_L: np.ndarray) -> dict[str, float]:
  """2*m*n*k for every matmul the forward executes (elementwise work not counted).

  Attention scores and values are counted over the full T x T square: the dense XLA path and the eager
  reference both compute every entry and mask afterwards. Experts count the tokens actually routed to
  an expert in each layer (`routed_L`); skip-slot tokens cost nothing in ours.
  """
  att, moe = cfg.attention, cfg.moe
  M, D, H, K, E = B * T, cfg.hidden_size, att.num_heads, att.num_kv_heads, att.head_dim
  R, F, L = moe.router_hidden_size, moe.intermediate_size, cfg.num_layers
  C = att.conv_channels
  per_layer = {
      "qkv_proj": 2 * M * D * (H * E + K * E + K * E),  # q, k, and the two value halves (K*E/2 each)
      "o_proj": 2 * M * H * E * D,
      "conv_depthwise": 2 * M * C * att.cca_time0,
      "conv_grouped": 2 * M * C * E * att.cca_time1,  # per head: [M, P*E] @ [P*E, E]
      "attn_scores": 2 * B * H * T * T * E,
      "attn_values": 2 * B * H * T * T * E,
      "router": 2 * M * (D * R + 2 * R * R + R * moe.num_router_classes),
  }
  flops = {k: float(v * L) for k, v in per_layer.items()}
  flops["experts"] = float(2 * 3 * D * F * routed_L.sum())  # gate_up [2F, D] and down [D, F] per routed token
  flops["lm_head"] = float(2 * M * D * cfg.vocab_size)
  flops["total"] = sum(flops.values())
  return flops


def cpu_share_of_other_processes():
  """Starts a meter; calling the result gives the share of all CPUs that other processes used since.

  Timings of a 2-core machine shared with other jobs are meaningless without this.
  """
  def busy_s() -> float:
    with open("/proc/stat") as f:
      user, nice, system, _, _, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

  def ours_s() -> float:
    t = os.times()
    return t.user + t.system

  start = (time.perf_counter(), busy_s(), ours_s())

  def share() -> float:
    wall = time.perf_counter() - start[0]
    return max(0.0, (busy_s() - start[1]) - (ours_s() - start[2])) / (wall * (os.cpu_count() or 1))
  return share


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_times(runners: dict) -> tuple[dict[str, list[float]], float]:
  """({name: seconds per rep}, other processes' CPU share) after FLAGS.warmup untimed calls of each runner.

  Candidates are interleaved within each of FLAGS.reps repetitions so slow drifts of the machine hit all alike.
  """
  for fn in runners.values():
    for _ in range(FLAGS.warmup):
      fn()
  times = {name: [] for name in runners}
  others_cpu_share = cpu_share_of_other_processes()
  for _ in range(FLAGS.reps):
    for name, fn in runners.items():
      times[name].append(timed(fn))
  return times, others_cpu_share()


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  retained = apply_host_memory()
  apply_quick(QUICK)
  transformers.utils.logging.disable_progress_bar()
  B, T = FLAGS.batch, FLAGS.seq
  atol = FLAGS.atol if FLAGS.atol is not None else (1e-4 if FLAGS.dtype == "float32" else 5e-2)
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  print(f"machine: {cpu}, nproc={os.cpu_count()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}")
  print(f"freed host memory kept mapped (--retain_host_memory): {retained}")

  with tempfile.TemporaryDirectory() as path:
    build_reference(path)
    refs = {"ref_eager": load_reference(path, fast=False)}
    if FLAGS.sdpa:
      refs["ref_sdpa"] = load_reference(path, fast=True)
    model = zaya_jax.load_hf(path, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
  cfg = model.config
  n_ref = sum(p.numel() for p in refs["ref_eager"].parameters())
  n_ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  impls = {name: (r.config._attn_implementation, r.config._experts_implementation) for name, r in refs.items()}
  print(f"config: B={B} T={T} D={cfg.hidden_size} L={cfg.num_layers} H={cfg.attention.num_heads} "
        f"K={cfg.attention.num_kv_heads} E={cfg.attention.head_dim} X={cfg.moe.num_experts} "
        f"F={cfg.moe.intermediate_size} R={cfg.moe.router_hidden_size} V={cfg.vocab_size} dtype={FLAGS.dtype}; "
        f"params ours={n_ours / 1e6:.2f}M ref={n_ref / 1e6:.2f}M; experts backend={cfg.moe.backend}; "
        f"reference (attention, experts): {impls}")

  ids_BT = np.random.default_rng(FLAGS.seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  ids_t = torch.as_tensor(ids_BT, dtype=torch.long)

  def run_ours():
    out = zaya_jax.forward(model, ids_BT)
    out.logits_BTV.block_until_ready()
    return out

  def ref_runner(ref):
    def run():
      with torch.no_grad():
        return ref(input_ids=ids_t, use_cache=False).logits  # a scoring/prefill forward: no KV cache built
    return run

  runners = {"ours": run_ours, **{name: ref_runner(r) for name, r in refs.items()}}

  # First call of ours compiles; its excess over the steady-state median is reported as compile time.
  first_call_s = timed(run_ours)
  out = run_ours()
  logits = np.asarray(out.logits_BTV.astype(jnp.float32))
  routed_L = np.asarray(out.router.counts_LX1)[:, :-1].sum(axis=1)
  diffs = {}
  for name in refs:
    ref_logits = runners[name]().float().numpy()
    diffs[name] = float(np.abs(logits - ref_logits).max())
  print("max |logits ours - ref|: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items())
        + f" (|logits| max {np.abs(logits).max():.3f}, atol {atol:g})")
  bad = {k: v for k, v in diffs.items() if not v <= atol}
  if bad:
    raise SystemExit(f"LOGITS MISMATCH: {bad} exceed atol={atol:g}; timings would compare different models")

  # The same computation with the model split once up front: the gap to "ours" is forward()'s per-call host
  # overhead (nnx.split of the model, token-id check).
  graphdef, state = nnx.split(model)
  presplit = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits_BTV, compiler_options=EXACT_ROUNDING)
  np.testing.assert_array_equal(np.asarray(presplit(state, ids_BT).astype(jnp.float32)), logits)
  runners = {"ours": run_ours, "ours_presplit": lambda: presplit(state, ids_BT).block_until_ready(),
             **{name: runners[name] for name in refs}}

  n = FLAGS.matmul_size
  a_NN = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(FLAGS.dtype))
  b_NN = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(FLAGS.dtype))
  dot = jax.jit(jnp.dot)
  dot(a_NN, b_NN).block_until_ready()
  runners["matmul"] = lambda: dot(a_NN, b_NN).block_until_ready()

  times, others = interleaved_times(runners)
  median = {name: statistics.median(ts) for name, ts in times.items()}

  flops = forward_flops(cfg, B, T, routed_L)
  matmul_gflops = 2 * n**3 / median["matmul"] / 1e9
  rows = {}
  for name in (k for k in runners if k != "matmul"):
    rows[name] = dict(median_ms=1e3 * median[name], min_ms=1e3 * min(times[name]),
                      tokens_per_s=B * T / median[name], gflops=flops["total"] / median[name] / 1e9)
  speedup = rows["ours"]["tokens_per_s"] / rows["ref_eager"]["tokens_per_s"]
  matmul_fraction = rows["ours"]["gflops"] / matmul_gflops
  goals = {f"ours >= {GOAL_REF_SPEEDUP}x ref_eager tokens/s": speedup >= GOAL_REF_SPEEDUP,
           f"ours >= {GOAL_MATMUL_FRACTION:.0%} of large-matmul FLOP/s": matmul_fraction >= GOAL_MATMUL_FRACTION}

  print(f"\nforward FLOPs {flops['total'] / 1e9:.2f} G per call (attention over the full T x T square; experts "
        f"for {int(routed_L.sum())} routed of {B * T * cfg.num_layers} token-layers):")
  print("  " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items() if k != "total"))
  print(f"\n{'candidate':<14} {'median ms':>10} {'min ms':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'vs ref_eager':>13}")
  for name, row in rows.items():
    ratio = row["tokens_per_s"] / rows["ref_eager"]["tokens_per_s"]
    print(f"{name:<14} {row['median_ms']:>10.2f} {row['min_ms']:>9.2f} {row['tokens_per_s']:>10.0f} "
          f"{row['gflops']:>9.2f} {ratio:>12.2f}x")
  print(f"{'matmul':<14} {1e3 * median['matmul']:>10.2f} {1e3 * min(times['matmul']):>9.2f} {'':>10} "
        f"{matmul_gflops:>9.2f}   ({n}x{n} @ {n}x{n} jnp.dot, {FLAGS.dtype})")
  print(f"\nours compile ~{first_call_s - median['ours']:.2f} s (first call {first_call_s:.2f} s); "
        f"ours/ref_eager tokens/s {speedup:.2f}x; ours/matmul FLOP/s {matmul_fraction:.1%}")
  for goal, met in goals.items():
    print(f"goal {goal}: {'MET' if met else 'NOT MET'}")
  print(f"other processes used {others:.0%} of the CPUs while timing"
        + (": timings are inflated and noisy, compare min ms too or rerun on a quiet machine" if others > 0.1 else ""))

  results = dict(
      machine=dict(cpu=cpu, nproc=os.cpu_count(), other_processes_cpu_share=others, retain_host_memory=retained,
                   torch_threads=torch.get_num_threads(), jax=jax.__version__,
                   torch=torch.__version__, transformers=transformers.__version__),
      config=dict(batch=B, seq=T, dtype=FLAGS.dtype, reps=FLAGS.reps, params_ours=n_ours, params_ref=n_ref,
                  zaya=cfg.to_hf(), experts_backend=cfg.moe.backend, reference_impls=impls),
      logits_max_abs_diff=diffs, flops=flops, routed_tokens_per_layer=routed_L.tolist(),
      compile_s=first_call_s - median["ours"], first_call_s=first_call_s, results=rows,
      matmul=dict(size=n, median_ms=1e3 * median["matmul"], gflops=matmul_gflops),
      times_s=times, speedup_vs_ref_eager=speedup, fraction_of_matmul=matmul_fraction, goals=goals)
  write_results(results, "bench_forward")


def write_results(results: dict, stem: str) -> None:
  """To --out, or experiments/results/<stem>[_bf16][_quick].json after the --dtype and --quick flags."""
  out_path = FLAGS.out or os.path.join(
      "experiments", "results",
      stem + ("_bf16" if FLAGS.dtype == "bfloat16" else "") + ("_quick" if FLAGS.quick else "") + ".json")
  write_json(out_path, results)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
