"""Text generation from a trained run or a Hugging Face ZAYA1 folder.

  python launch/generate.py --model=runs/tiny --prompt="import os" --max_new_tokens=64 --temperature=0
  python launch/generate.py --model=/models/ZAYA1-8B --chat --prompt="What is 7 * 6?" --max_new_tokens=512 \\
      --temperature=1.0 --top_p=0.95 --seed=3
  python launch/generate.py --model=runs/tiny --prompts_file=prompts.jsonl --n=4 --output=samples.jsonl

--model is an Orbax run directory (config.json + checkpoints/ + tokenizer.json, as launch/train.py writes it; the
latest complete step unless --step) or a Hugging Face folder (config.json with model_type zaya, safetensors,
tokenizer.json; --chat uses its tokenizer_config.json chat_template or chat_template.jinja). --prompts_file is a .txt
(one prompt per line) or .jsonl ({"prompt": ...} per line). Each prompt gets --n samples; generation stops at the
eos token(s) or after --max_new_tokens. --output writes one JSON line per sample (prompt, completion, tokens
generated, ..., and the model, checkpoint step and weights fingerprint) only once every sample is done; an existing
--output is kept unless --overwrite. Bad input prints one `error:` line and exits 1, before the weights load wherever
the tokenizer and config.json suffice to find it.
"""

from __future__ import annotations

import sys

from absl import app, flags

from zaya_jax.infer import cli, cli_files

_MODEL = flags.DEFINE_string("model", None, "Run directory or Hugging Face folder.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (or its folder) if not in the model folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a run directory (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts: .txt (one per line) or .jsonl ({\"prompt\": ...}).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message in the tokenizer folder's chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens generated per sample (a stop token included).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = no limit).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = no limit).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed and flags give the same samples.")
_N = flags.DEFINE_integer("n", 1, "Samples per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows (prompt samples) per generate call; samples depend on it.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the samples here as JSON lines.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv) -> int:
  del argv
  if not _MODEL.value:
    raise cli.CLIError("--model is required (a run directory or a Hugging Face folder)")
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise cli.CLIError("pass exactly one of --prompt and --prompts_file")
  sampling = cli.sampling_config(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  if _PROMPT.value is not None:
    prompts, describe = [_PROMPT.value], lambda i: "--prompt"
  else:
    prompts = cli_files.read_prompts(_PROMPTS_FILE.value)
    describe = lambda i: f"prompt {i + 1} of --prompts_file={_PROMPTS_FILE.value}"
  cli_files.check_output_is_not_input(_OUTPUT.value, prompts_file=_PROMPTS_FILE.value)
  with cli_files.AtomicJsonl(_OUTPUT.value, overwrite=_OVERWRITE.value) as out:
    loaded = cli.load_model(_MODEL.value, tokenizer_path=_TOKENIZER.value, step=_STEP.value)
    print(f"model: {loaded.describe()}", file=sys.stderr)
    chat = cli.chat_format(loaded, _CHAT.value)
    completions = cli.generate_completions(loaded, prompts, chat=chat, max_new_tokens=_MAX_NEW.value,
                                           sampling=sampling, n=_N.value, seed=_SEED.value,
                                           batch_size=_BATCH.value, describe=describe)
    model = {"model": loaded.path, "step": loaded.step, "fingerprint": loaded.fingerprint}  # which weights wrote it
    for c in completions:
      out.write({**c.to_json(), **model})
  single = len(completions) == 1
  for c in completions:
    if not single:
      end = "stop token" if c.stopped else "budget"
      shown = prompts[c.prompt_index] if len(prompts[c.prompt_index]) <= 60 else prompts[c.prompt_index][:57] + "..."
      print(f"=== prompt {c.prompt_index + 1} {shown!r}, sample {c.sample + 1} ({c.tokens} tokens, ended at the "
            f"{end}) ===")
    print(c.completion, flush=True)
  if _OUTPUT.value:
    print(f"wrote {len(completions)} sample(s) to {_OUTPUT.value}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(cli.main_wrapper(main))
