"""Train-step speed of zaya_jax against the reference `transformers` ZAYA1 in PyTorch, side by side on this CPU.

One step = forward + backward + global-norm clipping + AdamW on the same weights, batch and hyperparameters. The
reference step is `loss.backward(); clip_grad_norm_; AdamW.step(); zero_grad()` on the eager (and the sdpa) model;
ours is `zaya_jax.train.step.jit_train_step` (balancing off: the reference has no controller). Before timing, the
first step's loss of both must agree, so the timings compare the same computation.

  python -m experiments.bench_train --preset=tiny       # the `tiny` experiment's model and batch (8 x 128)
  python -m experiments.bench_train --preset=small20m   # the ~20M-parameter `small20m` model, batch 8 x 256
  python -m experiments.bench_train --quick             # smoke test

Goal (project issue): ours >= 1.5x the reference's train-step tokens/s.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

import zaya_jax
from experiments import bench_forward as bf  # its model-shape flags, reference builder/loader, timer, CPU meter
from experiments.common import quiet_library_logging, write_json
from zaya_jax.train import step as train_step_lib
from zaya_jax.train.balancing import BalancingConfig
from zaya_jax.train.optim import OptimizerConfig

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(bf)  # its shape, --quick and --out flags: listed by --help too
flags.DEFINE_enum("preset", "small20m", ["tiny", "small20m"], "Model and batch of a registered experiment config.")
flags.DEFINE_float("lr", 1e-3, "AdamW learning rate (constant) of both.")
flags.DEFINE_integer("steps_per_rep", 1, "Consecutive steps each candidate runs in a timed repetition (a step's time "
                     "is the repetition's / this). 1: each step right after the other candidates' steps, its "
                     "framework's threads cold; more: back to back, as a training loop runs them.", lower_bound=1)

PRESETS = {
    # zaya_jax.train.experiment's `tiny` and `small20m` models and batches, in bench_forward's flag names.
    "tiny": dict(batch=8, seq=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4,
                 moe_intermediate=48, router_hidden=16, vocab=1024, reps=10, warmup=2),
    "small20m": dict(batch=8, seq=256, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=8,
                     moe_intermediate=512, router_hidden=64, vocab=8192, reps=6, warmup=1),
}
QUICK = dict(batch=2, seq=32, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4, moe_intermediate=64,
             router_hidden=16, vocab=512, reps=2, warmup=1)
GOAL_REF_SPEEDUP = 1.5
BETAS, EPS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0


def apply_defaults() -> None:
  for name, value in (QUICK if FLAGS.quick else PRESETS[FLAGS.preset]).items():
    if not FLAGS[name].present:
      FLAGS[name].value = value


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  retained = bf.apply_host_memory()
  apply_defaults()
  transformers.utils.logging.disable_progress_bar()
  B, T = FLAGS.batch, FLAGS.seq
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  print(f"machine: {cpu}, nproc={os.cpu_count()}, jax {jax.__version__}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, transformers {transformers.__version__}")
  print(f"freed host memory kept mapped (--retain_host_memory): {retained}")

  with tempfile.TemporaryDirectory() as path:
    bf.build_reference(path)
    refs = {"ref_eager": bf.load_reference(path, fast=False)}
    if FLAGS.sdpa:
      refs["ref_sdpa"] = bf.load_reference(path, fast=True)
    model = zaya_jax.load_hf(path, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
  cfg = model.config
  n_params = sum(p.numel() for p in refs["ref_eager"].parameters())
  print(f"config {'quick' if FLAGS.quick else FLAGS.preset}: B={B} T={T} D={cfg.hidden_size} L={cfg.num_layers} "
        f"X={cfg.moe.num_experts} F={cfg.moe.intermediate_size} V={cfg.vocab_size} dtype={FLAGS.dtype}; "
        f"{n_params / 1e6:.2f}M parameters; experts backend={cfg.moe.backend}")

  ids = np.random.default_rng(FLAGS.seed).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
           "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.float32)}
  opt_cfg = OptimizerConfig(lr=FLAGS.lr, warmup_steps=0, schedule="constant", b1=BETAS[0], b2=BETAS[1], eps=EPS,
                            weight_decay=WEIGHT_DECAY, clip_norm=CLIP)
  trainer, state = train_step_lib.create(model, opt_cfg, train_step_lib.StepConfig(), BalancingConfig(mode="none"),
                                         10**6, FLAGS.seed)
  holder = [state]

  def run_ours():
    holder[0], metrics = train_step_lib.jit_train_step(trainer, holder[0], batch)
    return float(metrics["loss"])  # the host copy waits for the step

  inputs_t = torch.as_tensor(ids[:, :-1], dtype=torch.long)
  targets_t = torch.as_tensor(ids[:, 1:], dtype=torch.long)

  def ref_runner(ref):
    ref.train()
    # Decay only rank >= 2 parameters, as ours does.
    groups = [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=FLAGS.lr, betas=BETAS, eps=EPS)

    def run():
      logits = ref(input_ids=inputs_t, use_cache=False).logits
      loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets_t.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss.item()
    return run

  runners = {"ours": run_ours, **{name: ref_runner(r) for name, r in refs.items()}}
  first_call_s = bf.timed(lambda: holder.append(run_ours()))
  first_losses = {"ours": holder.pop(), **{name: runners[name]() for name in refs}}
  print("first-step loss: " + ", ".join(f"{k}={v:.6f}" for k, v in first_losses.items()))
  atol = FLAGS.atol if FLAGS.atol is not None else (1e-4 if FLAGS.dtype == "float32" else 2e-2)
  bad = {k: v for k, v in first_losses.items() if abs(v - first_losses["ours"]) > atol}
  if bad:
    raise SystemExit(f"LOSS MISMATCH {bad} vs ours {first_losses['ours']}: timings would compare different models")

  k = FLAGS.steps_per_rep
  times, others = bf.interleaved_times({name: (lambda fn=fn: [fn() for _ in range(k)]) for name, fn in runners.items()})
  times = {name: [t / k for t in ts] for name, ts in times.items()}
  median = {name: statistics.median(ts) for name, ts in times.items()}
  rows = {name: dict(median_ms=1e3 * m, min_ms=1e3 * min(times[name]), tokens_per_s=B * T / m)
          for name, m in median.items()}
  fastest_ref = min(refs, key=lambda name: median[name])
  speedup = {name: median[name] / median["ours"] for name in refs}
  print(f"\n{'candidate':<10} {'median ms':>10} {'min ms':>9} {'tokens/s':>10} {'ours is':>9}")
  for name, row in rows.items():
    ratio = "" if name == "ours" else f"{speedup[name]:.2f}x"
    print(f"{name:<10} {row['median_ms']:>10.1f} {row['min_ms']:>9.1f} {row['tokens_per_s']:>10.0f} {ratio:>9}")
  met = speedup[fastest_ref] >= GOAL_REF_SPEEDUP
  print(f"\nours compile ~{first_call_s - median['ours']:.1f} s; goal ours >= {GOAL_REF_SPEEDUP}x the fastest "
        f"reference ({fastest_ref}): {speedup[fastest_ref]:.2f}x, {'MET' if met else 'NOT MET'}")
  print(f"other processes used {others:.0%} of the CPUs while timing"
        + (": timings are inflated and noisy, compare min ms too or rerun on a quiet machine" if others > 0.1 else ""))

  results = dict(
      machine=dict(cpu=cpu, nproc=os.cpu_count(), other_processes_cpu_share=others, retain_host_memory=retained,
                   torch_threads=torch.get_num_threads(), jax=jax.__version__, torch=torch.__version__,
                   transformers=transformers.__version__),
      config=dict(preset="quick" if FLAGS.quick else FLAGS.preset, batch=B, seq=T, dtype=FLAGS.dtype,
                  reps=FLAGS.reps, steps_per_rep=k, params=n_params, zaya=cfg.to_hf(), experts_backend=cfg.moe.backend),
      first_step_loss=first_losses, compile_s=first_call_s - median["ours"], results=rows, times_s=times,
      speedup_vs_ref=speedup, goal_met=met)
  out_path = FLAGS.out or os.path.join(
      "experiments", "results", f"bench_train_{'quick' if FLAGS.quick else FLAGS.preset}.json")
  write_json(out_path, results)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
