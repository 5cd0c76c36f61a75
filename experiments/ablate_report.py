"""The table and plot of an ablation study, from its runs.jsonl alone (experiments/ablate.py writes it).

  python -m experiments.ablate_report --out=experiments/results/attention

table.md: per variant, mean ± sample std over seeds of the final held-out loss, and the other figures of its runs.
<study>.png: training-loss curves (mean over seeds) and, per study, the loss against what the variant changes:
KV-cache bytes per token (attention), expert-load imbalance (balancing), or tokens/s (the others).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from experiments.common import read_jsonl

FLAGS = flags.FLAGS


def summarize(rows: list[dict]) -> list[dict]:
  """One entry per variant (in first-seen order): its seeds and the mean/std of each figure."""
  by_variant: dict[str, list[dict]] = {}
  for row in rows:
    by_variant.setdefault(row["variant"], []).append(row)
  out = []
  for variant, runs in by_variant.items():
    def stats(key, runs=runs):
      values = [r[key] for r in runs if r.get(key) is not None]
      if not values:
        return None, None
      return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

    entry = {"variant": variant, "seeds": sorted(r["seed"] for r in runs)}
    for key in ("eval_loss", "tokens_per_s", "load_max_over_min", "skip_rate"):
      entry[key], entry[f"{key}_std"] = stats(key)
    for key in ("params", "params_non_embedding", "kv_cache_bytes_per_token", "steps", "tokens", "cache_dtype"):
      entry[key] = runs[0][key]
    entry["commit"] = sorted({r["commit"] for r in runs})
    out.append(entry)
  # Paired by seed against the first variant (every variant sees the same batches in the same order for a seed, so
  # the difference removes what the seed does to both).
  first = {r["seed"]: r["eval_loss"] for r in by_variant[out[0]["variant"]]}
  for entry in out:
    deltas = [r["eval_loss"] - first[r["seed"]] for r in by_variant[entry["variant"]] if r["seed"] in first]
    entry["delta_vs_first"] = float(np.mean(deltas)) if deltas else None
    entry["delta_vs_first_std"] = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else None
  return out


def _pm(mean, std, fmt: str) -> str:
  if mean is None:
    return "–"
  return format(mean, fmt) + ("" if std is None else f" ± {format(std, fmt.lstrip('+'))}")


def table(rows: list[dict]) -> str:
  study = rows[0]["study"]
  entries = summarize(rows)
  routing = study == "balancing"
  head = ["variant", "seeds", "params (non-emb.)", "tokens", "eval loss", f"Δ vs {entries[0]['variant']} (paired)",
          "tokens/s", "KV B/token"]
  if routing:
    head += ["load max/min", "skip rate"]
  lines = [f"### {study}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in entries:
    cells = [e["variant"], ",".join(map(str, e["seeds"])), f"{e['params']:,} ({e['params_non_embedding']:,})",
             f"{e['tokens']:,}", _pm(e["eval_loss"], e["eval_loss_std"], ".4f"),
             _pm(e["delta_vs_first"], e["delta_vs_first_std"], "+.4f"),
             _pm(e["tokens_per_s"], e["tokens_per_s_std"], ",.0f"), f"{e['kv_cache_bytes_per_token']:,}"]
    if routing:
      cells += [_pm(e["load_max_over_min"], e["load_max_over_min_std"], ".2f"),
                _pm(e["skip_rate"], e["skip_rate_std"], ".3f")]
    lines.append("| " + " | ".join(cells) + " |")
  commits = sorted({c for e in entries for c in e["commit"]})
  lines += ["", f"Mean ± sample std over seeds; eval loss = held-out cross entropy (nats/token) after the last step; "
            f"Δ = eval loss minus {entries[0]['variant']}'s for the same seed (same data order), mean ± std; "
            f"KV bytes per token over all layers in {entries[0]['cache_dtype']}; tokens/s on the machine that ran it "
            f"(noisy). From runs.jsonl, commit(s) {', '.join(commits)}."]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  study = rows[0]["study"]
  entries = summarize(rows)
  fig, (curves, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for e in entries:
    runs = [r for r in rows if r["variant"] == e["variant"]]
    n = min(len(r["curve"]) for r in runs)
    steps = [p[0] for p in runs[0]["curve"][:n]]
    loss = np.mean([[p[1] for p in r["curve"][:n]] for r in runs], axis=0)
    curves.plot(steps, loss, label=e["variant"])
  curves.set(xlabel="step", ylabel="training loss (mean over seeds)", title=f"{study}: training loss")
  curves.legend()
  x_key, x_label = {"attention": ("kv_cache_bytes_per_token", "KV-cache bytes per token"),
                    "balancing": ("load_max_over_min", "expert load max/min (last 20% of steps)")}.get(
                        study, ("tokens_per_s", "training tokens/s"))
  for e in entries:
    right.errorbar(e[x_key], e["eval_loss"], yerr=e["eval_loss_std"] or 0, fmt="o", capsize=4, label=e["variant"])
    right.annotate(e["variant"], (e[x_key], e["eval_loss"]), textcoords="offset points", xytext=(6, 4))
  right.set(xlabel=x_label, ylabel="held-out loss (mean ± std)", title=f"{study}: final loss")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(out: str) -> str:
  """table.md and <study>.png in `out` from out/runs.jsonl; returns the table."""
  if not os.path.isdir(out):
    raise ValueError(f"{out} does not exist (a study's --out folder)")
  rows = read_jsonl(os.path.join(out, "runs.jsonl"))
  if not rows:
    raise ValueError(f"{os.path.join(out, 'runs.jsonl')} has no finished runs")
  text = table(rows)
  tmp = os.path.join(out, "table.md.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(out, "table.md"))
  plot(rows, os.path.join(out, f"{rows[0]['study']}.png"))
  return text


def main(argv):
  del argv
  try:
    print(write_report(FLAGS.out))
  except (ValueError, FileNotFoundError) as e:  # not a study folder, or no finished run yet: one line
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "A study's output folder (holding runs.jsonl).", required=True)
  app.run(main)
