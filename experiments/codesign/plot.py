"""Accuracy against generated tokens per problem, both models, every method — drawn from results.jsonl only.

  python -m experiments.codesign.plot --out=experiments/results/codesign   # writes accuracy_vs_tokens.png there

Each method is one line per model (solid: the aggregation-trained model, dashed: the plain one) through its budgets:
majority@k over k independent samples, and RSA / Markovian RSA after rounds T = 0, 1, ...; error bars are the 95%
CIs stored in the file. The single-sample accuracy is the marker at one sample's tokens.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
STYLE = {"plain": "--", "aggregation": "-"}
COLOURS = {"single": "black", "majority": "tab:blue", "rsa": "tab:orange", "markovian": "tab:green",
           "majority_matched": "tab:purple"}
LABELS = {"single": "single sample", "majority": "majority@k", "rsa": "RSA (full candidates)",
          "markovian": "Markovian RSA (tails)", "majority_matched": "majority on Markovian RSA's tokens"}


def load(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
  """{(model, method): points sorted by tokens}; RSA points are the mean-correctness ones (not the votes)."""
  out: dict[tuple[str, str], list[dict]] = {}
  for r in rows:
    if r["point"].endswith(" vote"):
      continue
    out.setdefault((r["model"], r["method"]), []).append(r)
  return {k: sorted(v, key=lambda r: r["tokens_per_problem"]) for k, v in out.items()}


def plot(results: str, png: str) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = load(results)
  if not rows:
    raise ValueError(f"{results} holds no results")
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for (model, method), pts in sorted(series(rows).items()):
    x = [p["tokens_per_problem"] for p in pts]
    y = [100 * p["accuracy"] for p in pts]
    err = [[100 * (p["accuracy"] - p["ci95"][0]) for p in pts], [100 * (p["ci95"][1] - p["accuracy"]) for p in pts]]
    name = {"plain": "plain", "aggregation": "agg-trained"}[model]
    ax.errorbar(x, y, yerr=err, linestyle=STYLE[model], marker="o" if method != "single" else "*",
                markersize=5 if method != "single" else 11, color=COLOURS[method], capsize=2, alpha=0.9,
                label=f"{LABELS[method]} — {name}")
  ax.set_xscale("log")
  ax.set_xlabel("generated tokens per problem (mean)")
  ax.set_ylabel("accuracy % (95% CI over problems)")
  first = rows[0]
  ax.set_title(f"Co-design at small scale ({first['mode']} mode, {first['problems']} problems, "
               f"temperature {first['temperature']})", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(png, dpi=130)
  plt.close(fig)
  return png


def define_flags() -> None:
  """Flags are defined only when this module is the program (run.py has an --out of its own)."""
  flags.DEFINE_string("out", "experiments/results/codesign", "The study's folder: reads results.jsonl, writes the PNG.")
  flags.DEFINE_string("png", None, "Output file (default: <out>/accuracy_vs_tokens.png).")


def main(argv):
  del argv
  png = FLAGS.png or os.path.join(FLAGS.out, "accuracy_vs_tokens.png")
  try:
    print(plot(os.path.join(FLAGS.out, "results.jsonl"), png))
  except (ValueError, FileNotFoundError) as e:  # no summarized study there: one line
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
