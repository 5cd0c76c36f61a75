"""A training run in its own process for tests/test_train.py, with optional self-inflicted `kill -9`s.

  python tests/train_driver.py WORKDIR CORPUS STEPS CHECKPOINT_EVERY [kill_after=S] [kill_in_save=S] [set=k=v ...]

sigterm_after=S: SIGTERM once step S is logged (a preemption notice). sigterm_on=TEXT: SIGTERM once a line starting
with TEXT is logged (e.g. "data:", before the first step).
kill_after=S: SIGKILL once step S is logged, after waiting for the checkpoint at CHECKPOINT_EVERY's last multiple
below S to be committed (so the resume point is known). kill_in_save=S: SIGKILL right after the asynchronous save of
step S has started, while Orbax is still writing it. process=RANK/COUNT@PORT: one process of a multi-process run
(jax.distributed, coordinator on localhost:PORT). A finished run writes WORKDIR/final_params.npz (process 0).
"""

import os
import signal
import sys
import time

import jax
import numpy as np

from zaya_jax.checkpoint.hf import flat_params
from zaya_jax.parallel import distributed
from zaya_jax.train import checkpointing, loop
from zaya_jax.train.experiment import get_experiment, override


def small_config(corpus: str, steps: int, checkpoint_every: int, extra=()):
  return override(get_experiment("tiny"), [
      "model.vocab_size=512", f"data.paths=({corpus!r},)", "data.vocab_size=512", "data.seq_len=32",
      "data.batch_size=4", "data.eval_fraction=0.25", "data.shuffle_window=8", f"loop.steps={steps}",
      f"loop.checkpoint_every={checkpoint_every}", "loop.log_every=1", "loop.eval_every=0", "loop.eval_batches=1",
      "loop.sample_tokens=0", "optimizer.warmup_steps=2", *extra])


def main(argv):
  workdir, corpus, steps, every = argv[1], argv[2], int(argv[3]), int(argv[4])
  options = dict(a.split("=", 1) for a in argv[5:] if not a.startswith("set="))
  extra = [a[len("set="):] for a in argv[5:] if a.startswith("set=")]
  cfg = small_config(corpus, steps, every, extra)

  kill_after = int(options.get("kill_after", 0))
  sigterm_after = int(options.get("sigterm_after", 0))
  sigterm_on = options.get("sigterm_on")
  kill_in_save = int(options.get("kill_in_save", 0))
  if "process" in options:
    rank, rest = options["process"].split("/")
    count, port = rest.split("@")
    distributed.initialize(distributed.DistributedConfig(f"localhost:{port}", int(count), int(rank),
                                                         initialization_timeout=60))

  def log(line: str):
    print(line, flush=True)
    if sigterm_on and line.startswith(sigterm_on):
      os.kill(os.getpid(), signal.SIGTERM)
    if sigterm_after and line.startswith(f"step {sigterm_after:>6}/"):
      os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's preemption notice would
      if jax.process_count() > 1:  # jax.distributed's notifier polls for the signal once a second: hold this host
        time.sleep(2)  # (and so the others, at the next step) until the notice is out, so it lands mid-run
    if kill_after and line.startswith(f"step {kill_after:>6}/"):
      committed = os.path.join(workdir, "checkpoints", str(kill_after // every * every), "commit_success.txt")
      deadline = time.time() + 30
      while not os.path.exists(committed) and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)

  if kill_in_save:
    original = checkpointing.RunCheckpointer.save

    def save_then_die(self, step, *args, **kwargs):
      started = original(self, step, *args, **kwargs)
      if started and step == kill_in_save:
        os.kill(os.getpid(), signal.SIGKILL)
      return started

    checkpointing.RunCheckpointer.save = save_then_die

  result = loop.train(cfg, workdir, log=log)
  if not result.preempted and jax.process_index() == 0:
    model = result.trainer.merge(result.state.params, result.state.biases)
    params = {k: np.asarray(v[...]) for k, v in flat_params(model).items()}
    np.savez(os.path.join(workdir, "final_params.npz"), **params)
  print(f"RESULT resumed_from={result.resumed_from} final_step={result.final_step} preempted={result.preempted}")


if __name__ == "__main__":
  main(sys.argv)
