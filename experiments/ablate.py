"""Architecture ablations: does each piece of MoE++ pay for itself?

  python -m experiments.ablate --study=attention --mode=full            # 3 seeds; see experiments/README.md
  python -m experiments.ablate --study=router --mode=quick              # < 10 min smoke run, 1 seed
  python -m experiments.ablate_report --out=experiments/results/attention   # table.md + PNG, from runs.jsonl alone

Studies (variant: overrides of the base, the registered `tiny` preset; the first variant is ZAYA1's):
  attention  cca | gqa (same kv heads, no convolutions) | mha (kv heads = heads) | mla (latent kv, shared RoPE key)
  router     mlp_eda (ZAYA1's MLP router with depth mixing) | linear (one projection, no EDA)
  balancing  pid | pid_kp1e-4 | aux_loss | none (also reports expert-load imbalance and skip rate)
  residual   on | off (learned residual scaling against plain adds)

Every variant trains on the embedded corpus for the same steps and batch (the same token budget) and, by moving its
expert FFN width, to the parameter count of the study's first variant (to within one FFN column of all experts: the
table shows each variant's count). Each run reports its final held-out loss, training tokens/s (median step time of
the last 20 steps, this machine) and the decode cache bytes per token (from the decode state's structure).

Output, under --out (default experiments/results/<study>[_quick]):
  shared/                 tokenizer and token cache, built once and copied into every run
  runs/<variant>-s<seed>/ the training runs (metrics.jsonl, checkpoints: an interrupted run resumes)
  runs.jsonl              one line per finished run: its settings, config, figures and loss curve
  table.md, <study>.png   written from runs.jsonl by experiments/ablate_report.py (also at the end of a study)
A rerun skips the finished runs (same settings) and resumes unfinished ones.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
from absl import app, flags

from experiments import ablate_report
from experiments.common import append_jsonl, git_commit, quiet_library_logging, read_jsonl
from zaya_jax.train.experiment import changed_settings, jsonable

FLAGS = flags.FLAGS

STUDIES: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {
        "cca": (),
        "gqa": ("model.attention.kind='gqa'",),
        "mha": ("model.attention.kind='gqa'", "model.attention.num_kv_heads=4"),
        "mla": ("model.attention.kind='mla'", "model.attention.num_kv_heads=4", "model.attention.mla_kv_rank=24"),
    },
    "router": {"mlp_eda": (), "linear": ("model.moe.router='linear'",)},
    # pid_kp1e-4: the controller's gain before experiments/pid_gain_sweep.py chose 1e-3.
    "balancing": {"pid": (), "pid_kp1e-4": ("balancing.kp=1e-4",), "aux_loss": ("balancing.mode='aux_loss'",),
                  "none": ("balancing.mode='none'",)},
    "residual": {"on": (), "off": ("model.residual_scaling=False",)},
}


@dataclasses.dataclass(frozen=True)
class Mode:
  name: str
  steps: int
  seeds: int
  corpus_bytes: int  # of the embedded corpus
  eval_batches: int = 8


MODES = {
    "quick": Mode("quick", steps=150, seeds=1, corpus_bytes=2 * 2**20, eval_batches=4),
    "full": Mode("full", steps=2000, seeds=3, corpus_bytes=12 * 2**20),
}


def base_overrides(mode: Mode) -> tuple[str, ...]:
  """What every run of a study shares on top of the `tiny` preset."""
  every = max(1, mode.steps // 4)
  return (f"loop.steps={mode.steps}", f"loop.eval_every={2 * every if mode.steps >= 8 else 0}",
          f"loop.checkpoint_every={every}", "loop.max_to_keep=1", f"loop.log_every={every}", "loop.sample_tokens=0",
          f"loop.eval_batches={mode.eval_batches}", f"data.default_corpus_bytes={mode.corpus_bytes}")


def variant_config(mode: Mode, overrides: tuple[str, ...], seed: int, tokenizer: str | None, target_params: int | None):
  """The experiment config of one run: the preset, the study's base, the variant, the seed, and (given a target)
  the expert FFN width that brings the variant to the target parameter count."""
  from zaya_jax.figures import model_figures
  from zaya_jax.train.experiment import get_experiment, override

  extra = [f"loop.seed={seed}"] + ([f"data.tokenizer={tokenizer!r}"] if tokenizer else [])
  cfg = override(get_experiment("tiny"), [*base_overrides(mode), *overrides, *extra])
  if target_params is not None:
    width = cfg.model.moe.intermediate_size
    count = lambda f: model_figures(cfg.model.replace(
        moe=dataclasses.replace(cfg.model.moe, intermediate_size=f))).total_params
    per_column = count(width + 1) - count(width)
    width = max(1, width + round((target_params - count(width)) / per_column))
    cfg = override(cfg, [f"model.moe.intermediate_size={width}"])
  return cfg


def prepare_shared_data(cfg, out: str, log) -> str:
  """Trains the tokenizer and tokenizes the corpus once (into out/shared); returns the tokenizer path."""
  from zaya_jax.train.data import make_data

  shared = os.path.join(out, "shared")
  path = os.path.join(shared, "tokenizer.json")
  if not (os.path.exists(path) and _token_caches(shared)):  # a kill mid-tokenisation leaves no cache: redo it
    t0 = time.perf_counter()
    make_data(cfg.data, shared, model_vocab_size=cfg.model.vocab_size)
    log(f"shared data: tokenizer and token cache in {shared} ({time.perf_counter() - t0:.0f} s)")
  relative = os.path.relpath(path)  # recorded in every run's config: no machine's absolute path in the results
  return path if relative.startswith("..") else relative


def _token_caches(folder: str) -> list[str]:
  return [p for p in glob.glob(os.path.join(folder, "tokens-*.npz")) if ".tmp." not in os.path.basename(p)]


def differences(saved_config: dict, cfg) -> list[str]:
  """The settings in which a saved run's config differs from `cfg`. Fields only one side has are ignored (the
  library may add config fields, with defaults, between a run and its rerun), and so is the shared tokenizer's path
  (the same file, however the output folder was named)."""
  from zaya_jax.train.experiment import to_dict

  return [name for name in changed_settings(jsonable(saved_config), jsonable(to_dict(cfg))) if name != "data.tokenizer"]


def _mean_last(rows: list[dict], key: str, fraction: float = 0.2) -> float | None:
  values = [float(np.mean(r[key])) for r in rows if key in r]
  if not values:
    return None
  return float(np.mean(values[-max(1, int(len(values) * fraction)):]))


def loss_curve(rows: list[dict], points: int = 60) -> list[list[float]]:
  """(step, mean training loss) over `points` equal windows of the training steps."""
  steps = [r for r in rows if "loss" in r]
  windows = np.array_split(np.arange(len(steps)), min(points, len(steps)))
  return [[float(steps[w[-1]]["step"]), float(np.mean([steps[i]["loss"] for i in w]))] for w in windows if len(w)]


def run_one(study: str, variant: str, seed: int, cfg, out: str, log, commit: str) -> dict:
  """Trains runs/<variant>-s<seed> (or resumes it) and returns its runs.jsonl line."""
  from zaya_jax.figures import decode_state_bytes, model_figures
  from zaya_jax.train.experiment import to_dict
  from zaya_jax.train.loop import train

  name = f"{variant}-s{seed}"
  workdir = os.path.join(out, "runs", name)
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved):
    with open(saved) as f:
      changed = differences(json.load(f), cfg)
    if changed:
      raise ValueError(f"{workdir} was started with other settings ({', '.join(changed)}); use another --out or "
                       "delete it")
  os.makedirs(workdir, exist_ok=True)
  for cache in _token_caches(os.path.join(out, "shared")):  # the same key: make_data finds it
    if not os.path.exists(os.path.join(workdir, os.path.basename(cache))):
      shutil.copy(cache, workdir)
  t0 = time.perf_counter()
  result = train(cfg, workdir, log=lambda line: log(f"[{name}] {line}"))
  if result.preempted:
    raise SystemExit(f"{name} was preempted (SIGTERM); rerun to resume")
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  figures = model_figures(cfg.model)
  kv_bytes, state_bytes = decode_state_bytes(cfg.model)
  return {
      "study": study, "variant": variant, "seed": seed,
      "steps": result.final_step, "tokens": result.final_step * cfg.data.batch_size * cfg.data.seq_len,
      "eval_loss": result.eval_loss, "final_train_loss": _mean_last(train_rows, "loss", 0.05),
      # The last timed step (a launch's compiling first step reports none).
      "tokens_per_s": next((r["tokens_per_s"] for r in reversed(train_rows) if r.get("tokens_per_s")), None),
      "params": figures.total_params, "params_non_embedding": figures.total_params - figures.embedding_params,
      "active_params": figures.active_params,
      "kv_cache_bytes_per_token": kv_bytes, "decode_state_bytes_per_sequence": state_bytes,
      "cache_dtype": cfg.model.dtype,
      # Routing over the last 20% of steps, averaged over layers: max/min expert token count and skip-slot rate.
      "load_max_over_min": _mean_last(train_rows, "load_max_over_min"),
      "skip_rate": _mean_last(train_rows, "skip_rate"),
      "curve": loss_curve(train_rows),
      "seconds": time.perf_counter() - t0, "resumed_from": result.resumed_from,
      "config": to_dict(cfg), "commit": commit,  # the code this process loaded (taken when the study started)
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
  }


def run_study(study: str, mode: Mode, out: str, seeds: int | None = None, log=print) -> list[dict]:
  """Every (variant, seed) of the study not yet in out/runs.jsonl; then the table and the plot. Returns all lines."""
  from zaya_jax.figures import model_figures

  if study not in STUDIES:
    raise ValueError(f"unknown study {study!r}; known: {sorted(STUDIES)}")
  seeds = mode.seeds if seeds is None else seeds
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}")
  os.makedirs(out, exist_ok=True)
  results_path = os.path.join(out, "runs.jsonl")
  variants = STUDIES[study]
  commit = git_commit()
  first = variant_config(mode, next(iter(variants.values())), 0, None, None)
  tokenizer = prepare_shared_data(first, out, log)
  target = model_figures(first.model).total_params
  for seed in range(seeds):
    for variant, overrides in variants.items():
      cfg = variant_config(mode, overrides, seed, tokenizer, target)
      done = [r for r in read_jsonl(results_path) if r["variant"] == variant and r["seed"] == seed]
      if done:
        changed = differences(done[0]["config"], cfg)
        if changed:
          raise ValueError(f"{results_path} holds {variant}-s{seed} with other settings ({', '.join(changed)}); "
                           "use another --out")
        log(f"{variant}-s{seed}: done already, in {results_path} (--out=<another folder> runs it afresh)")
        continue
      line = run_one(study, variant, seed, cfg, out, log, commit)
      append_jsonl(results_path, line)
      log(f"{variant}-s{seed}: eval loss {line['eval_loss']:.4f}, {line['tokens_per_s'] or 0:,.0f} tok/s, "
          f"{line['params']:,} params ({line['seconds']:.0f} s)")
  table = ablate_report.write_report(out)
  log(table)
  return read_jsonl(results_path)


def define_flags() -> None:
  flags.DEFINE_enum("study", None, sorted(STUDIES), "Which ablation study to run.")
  flags.DEFINE_enum("mode", "quick", sorted(MODES), "quick: < 10 min smoke run; full: the study (< 90 min).")
  flags.DEFINE_integer("seeds", None, "Seeds per variant (default: the mode's).")
  flags.DEFINE_integer("steps", None, "Override the mode's training steps.")
  flags.DEFINE_string("out", None, "Output folder; default experiments/results/<study> (full) or <study>_quick.")
  flags.mark_flag_as_required("study")


def main(argv):
  del argv
  quiet_library_logging()
  from zaya_jax import host_memory

  host_memory.retain_freed_memory()  # the runs' step temporaries stay mapped (zaya_jax/host_memory.py)
  mode = MODES[FLAGS.mode]
  if FLAGS.steps is not None:
    mode = dataclasses.replace(mode, steps=FLAGS.steps)
  suffix = "" if mode.name == "full" else f"_{mode.name}"
  out = FLAGS.out or os.path.join("experiments", "results", f"{FLAGS.study}{suffix}")
  try:
    run_study(FLAGS.study, mode, out, FLAGS.seeds)
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
