"""Decode speed against model size: experiments/bench_decode.py at several model sizes, 16 rows each.

The reference's cached `generate` costs a roughly fixed Python overhead per token plus its arithmetic; ours is one
compiled program whose step cost is the arithmetic (at XLA:CPU's small-M matmul rates). So the ratio falls as the
model grows; this sweep shows where it crosses the 5x goal. Each size runs bench_decode in its own process (fresh
compile caches, no cross-talk), writes bench_decode's full JSON to results/decode_sizes/<size>.json, and the summary
goes to results/decode_sizes.json.

  python -m experiments.decode_sizes                 # from the repo root: every size, B=16, P=32, N=128
  python -m experiments.decode_sizes --sizes=tiny,3.6m --reps=2
  python -m experiments.decode_sizes --quick         # smoke test: the two smallest sizes, N=16, 1 rep
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments.common import apply_quick, quiet_library_logging, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> bench_decode shape flags. "tiny" is zaya_jax.ZayaConfig.tiny()'s shape (bench_decode --quick is close to
# it, with experts of 64); "14m" is bench_decode's default.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4, moe_intermediate=48,
                 router_hidden=16, vocab=512),
    "1m": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, experts=8, moe_intermediate=128,
                 router_hidden=32, vocab=1024),
    "3.6m": dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, experts=8, moe_intermediate=256,
                 router_hidden=32, vocab=1024),
    "14m": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=8, moe_intermediate=512,
                router_hidden=64, vocab=1024),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", list(SIZES), f"Model sizes to run, from {list(SIZES)}.")
flags.DEFINE_integer("reps", 3, "Timed repetitions per candidate in each bench_decode run.", lower_bound=1)
flags.DEFINE_bool("quick", False, "Smoke test: the two smallest sizes, 16 new tokens, 1 rep (explicit --sizes and "
                  "--reps win).")
flags.DEFINE_string("out_dir", os.path.join(ROOT, "experiments", "results"), "Where decode_sizes.json and "
                    "decode_sizes/<size>.json go.")


def run_size(name: str, out: str, reps: int, new_tokens: int) -> dict:
  shape = [f"--{k}={v}" for k, v in SIZES[name].items()]
  cmd = [sys.executable, "-m", "experiments.bench_decode", *shape, "--batch=16", "--prompt_len=32",
         f"--new_tokens={new_tokens}", f"--reps={reps}", f"--out={out}"]
  print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  print(proc.stdout[-1500:], flush=True)
  if proc.returncode != 0:
    raise SystemExit(f"bench_decode failed for size {name} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(out) as f:
    return json.load(f)


def main(argv):
  del argv
  quiet_library_logging()  # jax's backend probing and Orbax log at INFO: keep the results readable
  apply_quick({"sizes": list(SIZES)[:2], "reps": 1})
  unknown = [s for s in FLAGS.sizes if s not in SIZES]
  if unknown:
    raise SystemExit(f"--sizes: unknown {unknown}; choose from {list(SIZES)}")
  sizes, reps, new_tokens = FLAGS.sizes, FLAGS.reps, 16 if FLAGS.quick else 128
  suffix = "_quick" if FLAGS.quick else ""
  per_size_dir = os.path.join(FLAGS.out_dir, "decode_sizes" + suffix)
  os.makedirs(per_size_dir, exist_ok=True)

  rows = {}
  for name in sizes:
    r = run_size(name, os.path.join(per_size_dir, f"{name}.json"), reps, new_tokens)
    ms = {cand: row["ms_per_step"] for cand, row in r["results"].items()}
    fastest_ref = min((c for c in ms if c.startswith("ref_")), key=ms.get)
    rows[name] = dict(params=r["config"]["params_ours"], ms_per_step=ms, fastest_ref=fastest_ref,
                      speedup=ms[fastest_ref] / ms["ours"], routing_balance=r["config"]["routing_balance"],
                      other_processes_cpu_share=r["machine"]["other_processes_cpu_share"])

  print(f"\n{'size':<6} {'params':>8} {'ours ms/step':>13} {'ref_sdpa':>9} {'ref_eager':>10} {'ours / fastest':>15}")
  for name, row in rows.items():
    ms = row["ms_per_step"]
    print(f"{name:<6} {row['params'] / 1e6:>7.2f}M {ms['ours']:>13.2f} {ms.get('ref_sdpa', float('nan')):>9.2f} "
          f"{ms['ref_eager']:>10.2f} {row['speedup']:>14.2f}x")
  print("(16 rows, prompt 32, greedy; ms/step = whole call / new tokens; goal: ours >= 5x the fastest reference)")
  write_json(os.path.join(FLAGS.out_dir, f"decode_sizes{suffix}.json"),
             dict(batch=16, prompt_len=32, new_tokens=new_tokens, reps=reps, sizes=rows, goal_speedup=5.0))


if __name__ == "__main__":
  app.run(main)
