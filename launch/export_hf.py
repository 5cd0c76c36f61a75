"""Exports a training run's checkpoint as a Hugging Face folder.

  python launch/export_hf.py --workdir=runs/tiny --output=exports/tiny
  python launch/export_hf.py --workdir=runs/cpt --step=4000 --dtype=bfloat16 --output=exports/cpt-4000

The folder holds config.json, the weights as safetensors (sharded past --max_shard_gb) and the run's tokenizer files
(tokenizer.json, and special_tokens_map.json, chat_template.jinja where the run has them; its tokenizer_config.json,
or one naming the run's eos and pad tokens for `transformers.AutoTokenizer`). The model loads with
`transformers.AutoModelForCausalLM.from_pretrained`, `zaya_jax.load_hf`, launch/generate.py and
launch/rsa.py, and starts another run through `launch/train.py --init_from`. Only the model is read from the
checkpoint (not the optimizer state). --dtype converts the weights (round to nearest even, as torch does; the
balancing biases stay fp32); the default keeps the run's parameter dtype (fp32 masters for training configs).
The folder is written beside its final name and renamed into place: it appears complete or not at all. An existing
--output is kept unless --overwrite; one inside the run directory (or containing it) is refused. Bad input prints
one `error:` line and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags

from zaya_jax.checkpoint.hf import SAVED_MODEL_FILES, save_hf
from zaya_jax.config import DTYPES
from zaya_jax.folders import check_target
from zaya_jax.infer import cli
from zaya_jax.tokenizer import TOKENIZER_FILE, side_files, transformers_config
from zaya_jax.train.checkpointing import load_run, resolve_step

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (as launch/train.py writes it).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
_OUTPUT = flags.DEFINE_string("output", None, "The Hugging Face folder to write.")
_DTYPE = flags.DEFINE_enum("dtype", None, DTYPES,
                           "Weight dtype of the export (default: the run's parameter dtype).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file, in GiB; more weights are sharded "
                                   "with an index, as transformers does.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv) -> int:
  del argv
  if not _WORKDIR.value or not _OUTPUT.value:
    raise cli.CLIError("--workdir and --output are required")
  if _MAX_SHARD_GB.value <= 0:
    raise cli.CLIError(f"--max_shard_gb must be positive, got {_MAX_SHARD_GB.value}")
  output = os.path.abspath(os.path.expanduser(_OUTPUT.value))
  workdir = os.path.abspath(_WORKDIR.value)
  real_output, real_workdir = os.path.realpath(output), os.path.realpath(workdir)
  if os.path.commonpath([real_output, real_workdir]) in (real_output, real_workdir):  # equal, above or inside
    raise cli.CLIError(f"--output {output} must lie outside the run directory {workdir} (and not contain it)")
  try:
    check_target(output, overwrite=_OVERWRITE.value, own_files=SAVED_MODEL_FILES)
  except FileExistsError as e:
    raise cli.CLIError(f"--output: {e}".replace("pass overwrite=True", "pass --overwrite")) from None
  step = resolve_step(workdir, _STEP.value)  # a run directory with this step, or a CheckpointError naming the steps
  model, tokenizer, cfg = load_run(workdir, step)
  with tempfile.TemporaryDirectory() as scratch:
    tokenizer_files = []
    if tokenizer is not None:
      tokenizer_files = [os.path.join(workdir, TOKENIZER_FILE), *side_files(workdir)]
      if not any(f.endswith("tokenizer_config.json") for f in tokenizer_files):  # a BPE trained by the run
        generated = os.path.join(scratch, "tokenizer_config.json")
        with open(generated, "w") as f:
          json.dump(transformers_config(tokenizer), f, indent=2)
        tokenizer_files.append(generated)
    else:  # a run on ArrayRecord token ids without a tokenizer: the folder is still a loadable model
      print(f"note: {workdir} has no {TOKENIZER_FILE}; the export holds the model only", file=sys.stderr)
    save_hf(model, output, dtype=_DTYPE.value, overwrite=_OVERWRITE.value, extra_files=tokenizer_files,
            max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
  dtype = _DTYPE.value or cfg.model.param_dtype
  print(f"wrote {output}: {dtype} weights of {workdir} at step {step}")
  return 0


if __name__ == "__main__":
  app.run(cli.main_wrapper(main))
