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
