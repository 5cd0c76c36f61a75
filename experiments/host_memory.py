"""What keeping freed host memory (zaya_jax.host_memory.retain_freed_memory) does to XLA:CPU calls, on this CPU.

Each workload runs in fresh child processes, alternately with glibc's default malloc settings and with
`retain_freed_memory()` applied at start-up (a process-wide setting, so the two cannot share a process); each child
times --calls calls after warm-up and counts the minor page faults they took. Reported per workload: median ms per
call and page faults per call of each setting, and the speedup, over --rounds alternations.

Workloads (the registered experiment configs' models and batches, random weights):
  train_tiny, train_small20m   one jitted training step (forward, backward, clipping, AdamW, PID)
  forward_small20m             one jitted forward of the small20m model over its batch
  decode_small20m              greedy generation, 16 rows x (32 prompt + 64 new tokens), one jitted program

  python -m experiments.host_memory                       # all workloads, 3 rounds
  python -m experiments.host_memory --workloads=train_tiny --rounds=2
  python -m experiments.host_memory --arena_max=2 --out=experiments/results/host_memory_arena2.json
  python -m experiments.host_memory --calls_on_caller_thread=false --out=...   # thresholds only, async dispatch
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments.common import write_json

FLAGS = flags.FLAGS
WORKLOADS = ("train_tiny", "train_small20m", "forward_small20m", "decode_small20m")
flags.DEFINE_list("workloads", list(WORKLOADS), f"Workloads to run, of {WORKLOADS}.")
flags.DEFINE_integer("rounds", 3, "Alternations of (default, retained) child processes per workload.",
                     lower_bound=1)
flags.DEFINE_integer("calls", 10, "Timed calls per child after 3 warm-up calls.", lower_bound=1)
flags.DEFINE_string("out", "experiments/results/host_memory.json", "Where to write the results.")
flags.DEFINE_string("child", None, "Internal: run this workload once and print its JSON line.")
flags.DEFINE_bool("retain", False, "Internal: the child applies retain_freed_memory() first.")
flags.DEFINE_integer("arena_max", None, "retain_freed_memory's arena_max in the retained children (default: glibc's).")
flags.DEFINE_bool("calls_on_caller_thread", True, "retain_freed_memory's calls_on_caller_thread in the retained "
                  "children (false: JAX's asynchronous CPU dispatch, as before session 7).")


def build_workload(name: str):
  """A function that runs one call of the workload to completion."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import zaya_jax
  from zaya_jax.infer import GREEDY, generate
  from zaya_jax.train import step as train_step_lib
  from zaya_jax.train.experiment import get_experiment

  kind, preset = name.split("_", 1)
  cfg = get_experiment(preset)
  model = zaya_jax.ZayaForCausalLM(cfg.model, rngs=nnx.Rngs(0))
  B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  ids = np.random.default_rng(0).integers(3, V, (B, T + 1)).astype(np.int32)
  if kind == "train":
    batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.float32)}
    trainer, state = train_step_lib.create(model, cfg.optimizer, cfg.step, cfg.balancing, 10**6, 0)
    holder = [state]

    def train_call():
      holder[0], metrics = train_step_lib.jit_train_step(trainer, holder[0], batch)
      float(metrics["loss"])
    return train_call
  if kind == "forward":
    return lambda: zaya_jax.forward(model, ids[:, :-1]).logits_BTV.block_until_ready()
  if kind == "decode":
    prompts = ids[:16, :32] if B >= 16 else np.resize(ids[:, :32], (16, 32))
    lens = np.full((16,), 32, np.int32)
    return lambda: np.asarray(generate(model, prompts, lens, key=jax.random.key(0), max_new_tokens=64,
                                       sampling=GREEDY).tokens_BN)
  raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")


def run_child(name: str, retain: bool, calls: int, arena_max: int | None, caller_thread: bool) -> dict:
  applied = False
  if retain:
    from zaya_jax import host_memory
    applied = host_memory.retain_freed_memory(arena_max=arena_max, calls_on_caller_thread=caller_thread)
  call = build_workload(name)
  for _ in range(3):
    call()
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
  return dict(workload=name, retain=retain, applied=applied, median_ms=1e3 * statistics.median(times),
              min_ms=1e3 * min(times), page_faults_per_call=faults / calls)


def main(argv):
  del argv
  if FLAGS.child:
    print("RESULT " + json.dumps(run_child(FLAGS.child, FLAGS.retain, FLAGS.calls, FLAGS.arena_max,
                                             FLAGS.calls_on_caller_thread)), flush=True)
    return
  unknown = sorted(set(FLAGS.workloads) - set(WORKLOADS))
  if unknown:
    raise SystemExit(f"--workloads: unknown {unknown}; known: {WORKLOADS}")
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
  print(f"machine: {cpu}, nproc={os.cpu_count()}")
  results = {}
  for name in FLAGS.workloads:
    runs = {False: [], True: []}
    for _ in range(FLAGS.rounds):
      for retain in (False, True):
        cmd = [sys.executable, "-m", "experiments.host_memory", f"--child={name}", f"--retain={retain}",
               f"--calls={FLAGS.calls}", f"--calls_on_caller_thread={FLAGS.calls_on_caller_thread}"]
        cmd += [f"--arena_max={FLAGS.arena_max}"] if FLAGS.arena_max else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
          raise SystemExit(f"child {cmd} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        runs[retain].append(json.loads(line[len("RESULT "):]))
    summary = {}
    for retain, rows in runs.items():
      summary["retained" if retain else "default"] = dict(
          median_ms=statistics.median(r["median_ms"] for r in rows),
          page_faults_per_call=statistics.median(r["page_faults_per_call"] for r in rows),
          applied=all(r["applied"] for r in rows) if retain else None)
    summary["speedup"] = summary["default"]["median_ms"] / summary["retained"]["median_ms"]
    results[name] = dict(summary=summary, runs=dict(default=runs[False], retained=runs[True]))
    d, r = summary["default"], summary["retained"]
    print(f"{name:<18} default {d['median_ms']:8.1f} ms/call {d['page_faults_per_call']:8.0f} faults/call | "
          f"retained {r['median_ms']:8.1f} ms/call {r['page_faults_per_call']:8.0f} faults/call | "
          f"speedup {summary['speedup']:.2f}x", flush=True)
  from zaya_jax import host_memory

  settings = {name: param.default for name, param in
              inspect.signature(host_memory.retain_freed_memory).parameters.items()}
  settings.update(arena_max=FLAGS.arena_max, calls_on_caller_thread=FLAGS.calls_on_caller_thread)
  write_json(FLAGS.out, dict(machine=dict(cpu=cpu, nproc=os.cpu_count()), calls=FLAGS.calls, rounds=FLAGS.rounds,
                             settings=settings, results=results))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
