"""The main job end to end on the real embedded model (quick config: 4 prompts, 8 tokens)."""
import json

import pytest

from tests.runtime_only import run_runtime_only

pytestmark = pytest.mark.slow


def test_survey_quick_writes_complete_workdir_without_test_only_packages(tmp_path):
  run = tmp_path / "run"
  out = run_runtime_only("analysis.survey", "--config=configs/survey.py:quick", f"--workdir={run}")
  report = str(run / "report.md")
  assert f"report: {report}" in out
  for f in ("config.json", "metrics.jsonl", "generations.jsonl", "summary.json", "report.md",
            "figures/residual_depth.png"):
    assert (run / f).exists(), f
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(31))        # SmolLM2: 30 layers -> 31 boundaries
  gens = [json.loads(l) for l in (run / "generations.jsonl").read_text().splitlines()]
  assert len(gens) == 4 and all(g["answer"].strip() for g in gens)
  assert "| 30 | 100 |" in (run / "report.md").read_text()
