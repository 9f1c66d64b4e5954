"""No test-only import on a runtime path: entry points' `:quick` presets run with torch / peft / accelerate
unimportable (tests/runtime_only.py). analysis.main, analysis.reversion, analysis.ioi, analysis.avoid_red,
analysis.survey and probes.sweep are run that way by their own study tests (test_main, test_reversion,
test_ioi_study, test_avoid_red, test_survey, test_sweep); this file covers train.plan, train.lora and
the avoid-the-red study on a configs/grid.py grid, and checks the blocker itself."""
import json
import os

import pytest

from tests.runtime_only import TEST_ONLY, run_runtime_only


def test_the_blocker_blocks_every_test_only_package():
  # `python -m timeit STMT` runs STMT under the prelude: stdlib only, so only the blocker can make it fail
  assert "loop" in run_runtime_only("timeit", "-n1", "-r1", "import json")
  for name in TEST_ONLY:
    with pytest.raises(AssertionError, match=f"ModuleNotFoundError: No module named '{name}'"):
      run_runtime_only("timeit", "-n1", "-r1", f"import {name}")


@pytest.mark.slow
def test_train_plan_quick_reads_the_embedded_gguf_without_test_only_packages():
  out = run_runtime_only("train.plan", "--config=configs/plan.py:quick")
  assert "fits: yes" in out and "frozen weights" in out


@pytest.mark.slow
def test_train_lora_quick_without_test_only_packages(tmp_path):
  wd = tmp_path / "lora"
  run_runtime_only("train.lora", "--config=configs/lora.py:quick", f"--workdir={wd}")
  summary = json.loads((wd / "summary.json").read_text())
  assert (wd / "report.md").stat().st_size > 0 and (wd / "adapter").is_dir()
  assert summary and all(k in (wd / "config.json").read_text() for k in ("train", "lora"))


@pytest.mark.slow
def test_grid_quick_one_point_without_test_only_packages(tmp_path):
  wd = tmp_path / "grid"
  run_runtime_only("analysis.avoid_red", "--config=configs/grid.py:quick", f"--workdir={wd}",
                   "--config.grid.window=('kill',)", "--config.grid.rank=(2,)")
  m = json.loads((wd / "metrics.json").read_text())
  assert m["status"]["ran"] == ["window-kill__rank-2__seed-0"]
  assert os.path.getsize(wd / "report.md") > 0
