"""Tokenizes text once into ArrayRecord shards of token ids, for corpora too large to tokenize at every launch.

  python launch/pretokenize.py --data=/corpus/texts --tokenizer=/ckpt/ZAYA1-8B/tokenizer.json --output=/data/ids
  python launch/train.py --config=small20m --workdir=runs/s --data='/data/ids/*.array_record'  # + their tokenizer

--data is read as launch/train.py reads it (files, folders, globs, .gz/.bz2/.xz; binary files skipped and counted)
and encoded as it would be (eos appended; --doc_separator, --special_tokens_in_text), one record per document. The
folder holds the shards, the tokenizer and manifest.json (zaya_jax/train/token_shards.py); training checks a run's
tokenizer and vocabulary against the manifest before its first step. The folder is written beside its final name
and renamed into place: complete or absent, also after an error, Ctrl-C or SIGTERM. Bad input prints one `error:`
line and exits 1.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from zaya_jax.folders import check_target
from zaya_jax.infer import cli
from zaya_jax.tokenizer import load_tokenizer
from zaya_jax.train.token_shards import MANIFEST, tokenize_corpus

_DATA = flags.DEFINE_list("data", None, "Text files, folders or globs (comma-separated).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A Hugging Face tokenizer.json (or a folder holding one).")
_OUTPUT = flags.DEFINE_string("output", None, "The folder to write.")
_SEPARATOR = flags.DEFINE_string("doc_separator", None, "Split files into documents at this string, as "
                                 "data.doc_separator does (a newline from the shell: --doc_separator=$'\\n\\n').")
_SPECIAL = flags.DEFINE_bool("special_tokens_in_text", False, "Parse special-token strings in the text as the special "
                             "tokens (chat-formatted text), as --set=data.special_tokens_in_text=True.")
_SHARD_TOKENS = flags.DEFINE_integer("shard_tokens", 2**26, "Start a new shard after this many tokens (2**26 ids "
                                     "are 256 MiB).", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv) -> int:
  del argv
  missing = [f"--{flag.name}" for flag in (_DATA, _TOKENIZER, _OUTPUT) if not flag.value]
  if missing:
    raise cli.CLIError(f"--data, --tokenizer and --output are required; missing: {', '.join(missing)} (a run "
                       "directory's tokenizer.json serves as --tokenizer)")
  try:
    check_target(_OUTPUT.value, overwrite=_OVERWRITE.value, own_files=(MANIFEST,))
  except FileExistsError as e:
    raise cli.CLIError(f"--output: {e}".replace("pass overwrite=True", "pass --overwrite")) from None
  tokenizer = load_tokenizer(_TOKENIZER.value)
  start, last = time.perf_counter(), [0.0]

  def progress(totals):
    cli.stop_if_terminated()  # SIGTERM: the half-written folder is removed on the way out
    now = time.perf_counter()
    if now - last[0] >= 10:
      last[0] = now
      print(f"{totals['documents']:,} documents, {totals['tokens']:,} tokens, {totals['shards']} shard(s) written "
            f"({totals['tokens'] / (now - start):,.0f} tokens/s)", file=sys.stderr)

  manifest = tokenize_corpus(_DATA.value, tokenizer, _OUTPUT.value, doc_separator=_SEPARATOR.value,
                             special_tokens_in_text=_SPECIAL.value, shard_tokens=_SHARD_TOKENS.value,
                             overwrite=_OVERWRITE.value, progress=progress)
  print(f"wrote {_OUTPUT.value}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
        f"{len(manifest['shards'])} shard(s) in {time.perf_counter() - start:.1f} s"
        + (f"; {manifest['dropped']} document(s) of fewer than 2 ids dropped" if manifest["dropped"] else "")
        + (f"; {len(manifest['skipped'])} file(s) skipped or read lossily, e.g. {manifest['skipped'][0]}"
           if manifest["skipped"] else ""))
  return 0


if __name__ == "__main__":
  app.run(cli.main_wrapper(main))
