"""The ablation studies' driver (experiments/ablate.py): one command, results on disk, resumable, report from JSON."""

import dataclasses
import json
import os

import pytest

from experiments import ablate, ablate_report
from experiments.common import append_jsonl, read_jsonl
from zaya_jax.figures import model_figures


def test_every_study_variant_builds_to_the_parameter_count_of_the_first():
  mode = ablate.MODES["quick"]
  for study, variants in ablate.STUDIES.items():
    configs = [ablate.variant_config(mode, o, 0, None, None) for o in variants.values()]
    target = model_figures(configs[0].model).total_params
    for name, overrides in variants.items():
      cfg = ablate.variant_config(mode, overrides, 0, None, target)
      one_column = 3 * cfg.model.hidden_size * cfg.model.moe.num_experts * cfg.model.num_layers
      assert abs(model_figures(cfg.model).total_params - target) <= one_column / 2, (study, name)
      assert cfg.loop.steps == mode.steps and cfg.data.batch_size == configs[0].data.batch_size


def test_a_study_runs_resumes_and_reports_from_json(tmp_path):
  """The quick pipeline with fewer steps and a smaller corpus (the real quick mode takes minutes per study)."""
  mode = dataclasses.replace(ablate.MODES["quick"], steps=8, corpus_bytes=2**18, eval_batches=1)
  out = str(tmp_path / "router")
  logs = []
  rows = ablate.run_study("router", mode, out, seeds=1, log=logs.append)
  assert [(r["variant"], r["seed"], r["steps"]) for r in rows] == [("mlp_eda", 0, 8), ("linear", 0, 8)]
  for row in rows:
    assert row["eval_loss"] > 0 and row["tokens_per_s"] > 0 and len(row["curve"]) == 8
    assert row["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # tiny: 2 layers, k and v of 2 heads x 16, fp32
  assert rows[1]["config"]["model"]["moe"]["router"] == "linear"

  # The table's numbers are the JSON's; the report is rebuilt from runs.jsonl alone.
  table = open(os.path.join(out, "table.md")).read()
  assert f"{rows[0]['eval_loss']:.4f}" in table and f"{rows[1]['eval_loss']:.4f}" in table
  os.remove(os.path.join(out, "table.md"))
  os.remove(os.path.join(out, "router.png"))
  assert ablate_report.write_report(out) == table and os.path.getsize(os.path.join(out, "router.png")) > 10_000

  # A rerun trains nothing; other settings in the same folder are refused, naming what differs.
  logs.clear()
  assert ablate.run_study("router", mode, out, seeds=1, log=logs.append) == rows
  done = [line for line in logs if ": done already, in " in line and "--out=<another folder> runs it afresh" in line]
  assert [line.split(":")[0] for line in done] == ["mlp_eda-s0", "linear-s0"], logs
  with pytest.raises(ValueError, match=r"other settings \(loop.steps"):
    ablate.run_study("router", dataclasses.replace(mode, steps=9), out, seeds=1, log=logs.append)
  assert read_jsonl(os.path.join(out, "runs.jsonl")) == rows

  # Lines written before a config field existed still count as done (fields only one side has are ignored); a line
  # cut by a kill is dropped before the next append instead of swallowing it.
  path = os.path.join(out, "runs.jsonl")
  old = [dict(r, config={**r["config"], "loop": {k: v for k, v in r["config"]["loop"].items() if k != "sample_prompt"}})
         for r in rows]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in old)
    f.write('{"study": "router", "variant": "lin')
  logs.clear()
  assert ablate.run_study("router", mode, out, seeds=1, log=logs.append) == old
  assert any(line.startswith("linear-s0: done already") for line in logs), logs
  append_jsonl(path, {"variant": "x"})
  assert read_jsonl(path) == [*old, {"variant": "x"}]


def test_report_gives_mean_and_sample_std_over_seeds():
  base = {"study": "balancing", "params": 10, "params_non_embedding": 5, "kv_cache_bytes_per_token": 64,
          "steps": 4, "tokens": 64, "cache_dtype": "float32", "commit": "abc", "tokens_per_s": 100.0,
          "skip_rate": 0.1, "curve": [[1, 5.0], [2, 4.0]]}
  rows = [dict(base, variant="pid", seed=0, eval_loss=3.0, load_max_over_min=2.0),
          dict(base, variant="pid", seed=1, eval_loss=4.0, load_max_over_min=4.0),
          dict(base, variant="none", seed=0, eval_loss=5.0, load_max_over_min=9.0)]
  text = ablate_report.table(rows)
  assert "| pid | 0,1 |" in text and "3.5000 ± 0.7071" in text and "3.00 ± 1.41" in text
  assert "| none | 0 |" in text and "5.0000 | +2.0000 |" in text  # paired with pid's seed 0 only


def test_pid_gain_sweep_refuses_an_existing_result_file(tmp_path):
  """Its default --out is the committed sweep: a rerun must not replace it unasked (nothing is run first)."""
  import subprocess
  import sys

  out = tmp_path / "sweep.json"
  out.write_text("{}")
  proc = subprocess.run([sys.executable, "-m", "experiments.pid_gain_sweep", f"--out={out}", "--steps=1"],
                        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode != 0 and f"{out} exists" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
  assert out.read_text() == "{}"
