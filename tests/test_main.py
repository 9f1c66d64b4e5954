"""The main job (`make run`) at its `:quick` sizes on the real embedded model: both stages run, without torch,
and the top-level report carries their headline tables and resolvable figure links."""
import os
import re

import pytest

from tests.runtime_only import run_runtime_only


@pytest.mark.slow
def test_quick_main_job_runs_without_test_only_packages(tmp_path):
  out = run_runtime_only("analysis.main", "--config=configs/main.py:quick", f"--workdir={tmp_path / 'run'}")
  path = str(tmp_path / "run" / "report.md")
  assert f"report: {path}" in out
  text = open(path).read()
  assert "## 1. Where steering breaks behaviour" in text and "## 2. Does benign fine-tuning revert" in text
  assert "### Kill zones" in text and "| baseline |" in text and "| block |" in text
  for link in re.findall(r"\]\(([^)]+\.png)\)", text):
    assert os.path.exists(tmp_path / "run" / link), link
  assert (tmp_path / "run" / "reversion" / "metrics.json").exists()
  assert (tmp_path / "run" / "sweep" / "report.md").exists()


def test_unknown_preset_is_a_clear_error():
  from configs.main import get_config
  with pytest.raises(ValueError, match="unknown main-job config"):
    get_config("smollm3")


def test_headline_tables_come_from_the_stage_metrics_and_match_the_stage_reports(monkeypatch):
  """The top-level report is rebuilt from each stage's metrics.json (docs/main_smollm2, a real `make run`): every
  table row and verdict it shows is verbatim in that stage's own report.md."""
  from analysis import main
  from configs.main import get_config
  from train.typed_config import from_configdict
  docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "main_smollm2")
  read = main._metrics

  def metrics(workdir, stage):                # that run predates metrics.json's "figures" entry
    m = read(docs, stage)
    if stage == "reversion":
      m.setdefault("figures", {k: f"figures/reversion_{k}.png" for k in ("heatmap", "curves", "layers")})
    return m
  monkeypatch.setattr(main, "_metrics", metrics)
  lines = main._report(from_configdict(main.MainConfig, get_config("smollm2")), docs, {"sweep": 1, "reversion": 1},
                       60.0)
  shown = [ln for ln in lines if ln.startswith("| ") or ln.startswith("- ")]
  stage_lines = {ln for st in ("sweep", "reversion") for ln in open(os.path.join(docs, st, "report.md")).read()
                 .split("\n")}
  assert len(shown) >= 10 and [ln for ln in shown if ln not in stage_lines] == []
  assert "### Kill zones" in lines and "### Verdict" in lines
  m = read(docs, "sweep")
  r = m["baseline_rho_eval"]["refusal"]
  assert f"| refusal | {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({r['n']}) |" in "\n".join(lines)
