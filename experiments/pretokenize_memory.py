"""Peak host memory and speed of tokenizing a text corpus: launch/pretokenize.py's streamed shards against the text
path of make_data (the whole corpus in memory), at two corpus sizes, each run in a fresh process.

The corpus is `--size_mb` MB of text files cut from the embedded default corpus (the stdlib's sources), then the same
files again under other names for the doubled size; the tokenizer is a byte-level BPE of 8192 entries trained on a
slice of it. Each child resets its peak RSS (VmHWM, as experiments/load_memory.py) after its imports and the tokenizer
load, tokenizes, and reports peak - baseline. The claim checked: the pretokenizer's peak does not grow with the corpus
(the text path's does).

  python experiments/pretokenize_memory.py               # 100 MB and 200 MB, results/pretokenize_memory.json
  python experiments/pretokenize_memory.py --quick       # 10 and 20 MB, printed (not written unless --out)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: this checkout
from experiments.common import reset_peak_rss, status_mib, write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("size_mb", 100, "Text of the smaller corpus, in MB (the larger one is twice that).")
flags.DEFINE_integer("file_kb", 500, "Size of each text file, in kB.")
flags.DEFINE_integer("shard_tokens", 2**22, "The pretokenizer's tokens per shard.")
flags.DEFINE_bool("quick", False, "10 and 20 MB; results printed only.")
flags.DEFINE_string("out", None, "Results JSON (default: results/pretokenize_memory.json unless --quick).")
flags.DEFINE_string("child", None, "Internal: 'pretokenize' or 'text' over --child_args (JSON), prints JSON.")
flags.DEFINE_string("child_args", None, "Internal.")


def _child() -> None:
  args = json.loads(FLAGS.child_args)
  from zaya_jax.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(args["tokenizer"])
  reset = reset_peak_rss()
  baseline = status_mib("VmRSS")
  start = time.perf_counter()
  if FLAGS.child == "pretokenize":
    from zaya_jax.train.token_shards import tokenize_corpus

    tokens = tokenize_corpus(args["paths"], tokenizer, args["output"], shard_tokens=args["shard_tokens"])["tokens"]
  else:
    from zaya_jax.train.data import DataConfig, make_data

    cfg = DataConfig(paths=tuple(args["paths"]), tokenizer=args["tokenizer"], seq_len=1024, batch_size=8,
                     eval_fraction=0.0, prefetch=0)
    tokens = make_data(cfg, args["output"], process_index=0, process_count=1).info.num_train_tokens
  seconds = time.perf_counter() - start
  peak = status_mib("VmHWM") if reset else None
  print(json.dumps({"tokens": tokens, "seconds": seconds, "baseline_mib": baseline,
                    "peak_above_baseline_mib": None if peak is None else peak - baseline}))


def _write_corpus(folder: str, size_bytes: int, file_bytes: int, text: str) -> None:
  os.makedirs(folder)
  for k in range(max(1, size_bytes // file_bytes)):
    start = (k * 7919 * 1000) % (len(text) - file_bytes)
    with open(os.path.join(folder, f"part{k:04d}.txt"), "w") as f:
      f.write(text[start:start + file_bytes])


def main(argv) -> None:
  del argv
  if FLAGS.child:
    _child()
    return
  from zaya_jax.tokenizer import train_bpe
  from zaya_jax.train.text_corpus import default_documents

  size = (10 if FLAGS.quick else FLAGS.size_mb) * 10**6
  text = "\n".join(t for _, t in default_documents())
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    first, second = os.path.join(scratch, "a"), os.path.join(scratch, "b")
    _write_corpus(first, size, FLAGS.file_kb * 1000, text)
    shutil.copytree(first, second)  # the doubled corpus: the same files again, under another folder's names
    tokenizer = os.path.join(scratch, "bpe", "tokenizer.json")
    train_bpe([text[:3 * 10**6]], 8192, tokenizer)
    for paths in ([first], [first, second]):
      for path in ("pretokenize", "text"):
        output = os.path.join(scratch, f"out-{path}-{len(paths)}")
        args = dict(paths=paths, tokenizer=tokenizer, output=output, shard_tokens=FLAGS.shard_tokens)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={path}",
                               f"--child_args={json.dumps(args)}"], capture_output=True, text=True, check=False)
        if proc.returncode:
          raise SystemExit(f"child {path} failed:\n{proc.stderr}")
        row = dict(json.loads(proc.stdout.strip().splitlines()[-1]), path=path, corpus_mb=len(paths) * size / 1e6)
        rows.append(row)
        print(f"{path:<12} {row['corpus_mb']:6.0f} MB of text: {row['tokens']:>11,} tokens in {row['seconds']:5.1f} s "
              f"({row['tokens'] / row['seconds']:,.0f}/s), peak {row['peak_above_baseline_mib']:7.0f} MiB above "
              f"the {row['baseline_mib']:.0f} MiB baseline")
        shutil.rmtree(output, ignore_errors=True)
  growth = {p: rows[i + 2]["peak_above_baseline_mib"] / rows[i]["peak_above_baseline_mib"]
            for i, p in enumerate(("pretokenize", "text"))}
  print(f"peak at twice the corpus / peak at once: pretokenize {growth['pretokenize']:.2f}x, text path "
        f"{growth['text']:.2f}x")
  out = FLAGS.out or (None if FLAGS.quick else os.path.join(os.path.dirname(__file__), "results",
                                                              "pretokenize_memory.json"))
  if out:
    write_json(out, {"rows": rows, "peak_growth_at_twice_the_corpus": growth, "shard_tokens": FLAGS.shard_tokens,
                     "file_kb": FLAGS.file_kb, "cpu_count": os.cpu_count()})
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
