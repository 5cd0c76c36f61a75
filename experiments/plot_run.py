"""Loss and expert-load curves of training runs, drawn from their metrics.jsonl to one PNG.

  python experiments/plot_run.py --workdir=runs/tiny [--workdir=runs/other ...] [--out=runs/tiny/run.png]

Panels: train loss (with eval loss as markers), the per-layer max/min expert token-count ratio (log scale), skip
rate and router entropy per layer. Runs overlay in one figure, labelled by their directory name.
"""

from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on the cluster or in CI
import matplotlib.pyplot as plt
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from experiments.common import read_jsonl

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory holding metrics.jsonl (repeatable).",
                                     required=True)
_OUT = flags.DEFINE_string("out", None, "PNG path (default: <first workdir>/run.png).")


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of a run directory."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a run directory?")
  rows = read_jsonl(path)  # a line cut by a crash mid-write is skipped
  return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def plot_runs(workdirs: list[str], out: str) -> str:
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  (ax_loss, ax_load), (ax_skip, ax_entropy) = axes
  for workdir in workdirs:
    name = os.path.basename(os.path.normpath(workdir))
    train, evals = read_metrics(workdir)
    if not train:
      raise ValueError(f"{workdir}/metrics.jsonl has no training rows")
    steps = np.array([r["step"] for r in train])
    line, = ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8, label=f"{name} train")
    if evals:
      ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color=line.get_color(),
                   label=f"{name} eval")
    for key, ax in (("load_max_over_min", ax_load), ("skip_rate", ax_skip), ("router_entropy", ax_entropy)):
      rows = [r for r in train if key in r]  # a run logged before the metric existed has a blank panel
      if not rows:
        continue
      per_layer = np.array([r[key] for r in rows])  # [steps, layers]
      for layer in range(per_layer.shape[1]):
        ax.plot([r["step"] for r in rows], per_layer[:, layer], lw=0.7, color=line.get_color(),
                alpha=0.4 + 0.6 / (layer + 1),
                label=f"{name} layer {layer}" if per_layer.shape[1] <= 4 else (name if layer == 0 else None))
  ax_loss.set(title="loss", xlabel="step", ylabel="cross entropy (nats/token)")
  ax_load.set(title="expert load max/min (tokens)", xlabel="step", yscale="log")
  ax_skip.set(title="skip rate", xlabel="step")
  ax_entropy.set(title="router entropy (nats)", xlabel="step")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv):
  del argv
  out = _OUT.value or os.path.join(_WORKDIR.value[0], "run.png")
  try:
    print(plot_runs(_WORKDIR.value, out))
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
