"""Launchers for a grid (analysis/grid/launch.py, python -m analysis.grid): every launcher expands a grid to the same
work units, points and fingerprints; a two-point grid runs through submitit's local executor and collects to the
local runner's table; collection is partial (and says so) while points are missing, and idempotent."""
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from analysis import grid
from analysis.avoid_red import study as avoid_red
from analysis.avoid_red.config import AvoidRedConfig
from analysis.grid import launch
from configs.grid import get_config
from train.typed_config import from_configdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**grid_axes) -> AvoidRedConfig:
  cd = get_config("quick")
  for k, v in grid_axes.items():
    setattr(cd.grid, k, v)
  return from_configdict(AvoidRedConfig, cd)


def _names_of(flag: str) -> tuple[str, ...]:
  """The point names a unit's --config.grid_points flag carries, parsed as the study's command line does."""
  from train.cli import _SequenceParser
  key, _, value = flag.partition("=")
  assert key == "--config.grid_points"
  return _SequenceParser().parse(value)


def test_every_launcher_expands_the_grid_to_the_same_points_and_fingerprints(tmp_path):
  c = _config(window=("kill", "all", (0.4, 1.0)), rank=(2, 4), seed=(0, 1, 2))
  points = grid.expand(c.grid)
  units = grid.work_units(points, c.vmap_axis)
  assert [[p.name for p in u.points] for u in units] == [[p.name for p in g] for g in grid.groups(points)]
  assert [u.name for u in units][:2] == ["window-kill__rank-2", "window-kill__rank-4"]
  assert all(len(u.points) == 3 for u in units) and len(units) == 6
  spec = launch.LaunchSpec("analysis.avoid_red", "configs/grid.py:quick", ("--config.grid.rank=(2,4)",),
                           str(tmp_path))
  jobs = launch.xmanager_jobs(spec, units, accelerator="A100", count=2)
  kill, _ = avoid_red.kill_window(c.kill_zone)
  for u, job in zip(units, jobs):
    cmd = launch.unit_command(spec, u)
    assert cmd[1:3] == ["-m", "analysis.avoid_red"] and cmd[3:] == job["args"] == launch.unit_args(spec, u)
    assert job["requirements"] == {"A100": 2} and job["points"] == [p.name for p in u.points]
    # the unit's command makes the study select exactly its points, with the full grid's fingerprints
    unit_config = dataclasses.replace(c, grid_points=_names_of(cmd[-1]))
    chosen = grid.select(grid.expand(unit_config.grid), unit_config.grid_points)
    assert chosen == list(u.points)
    for p in chosen:
      assert avoid_red.fingerprint(unit_config, avoid_red.point_config(unit_config, p, kill)) == \
          avoid_red.fingerprint(c, avoid_red.point_config(c, p, kill))
  assert launch.xmanager_jobs(spec, units[:1], executor="local")[0]["requirements"] == {}
  with pytest.raises(ValueError, match="TPU_V5P.*Vertex AI executor takes"):
    launch.xmanager_jobs(spec, units, accelerator="TPU_V5P")
  with pytest.raises(grid.GridError, match="'window-x__seed-0' is not a point of this grid"):
    grid.select(points, ["window-x__seed-0"])
  # pending: a unit whose points are all finished is not submitted again
  for p in units[0].points:
    grid.write_point(grid.point_dir(str(tmp_path), p), p, {"x": 1.0})
  assert launch.pending(units, str(tmp_path)) == units[1:]


def test_the_cli_dry_run_lists_every_unit_with_its_command(tmp_path):
  out = subprocess.run([sys.executable, "-m", "analysis.grid", "launch", "--launcher=xmanager", "--dry_run",
                        "--config=configs/grid.py:quick", "--config.grid.rank=(2,)", f"--workdir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  rec = json.loads(out.stdout)
  assert [u["name"] for u in rec["units"]] == ["window-kill__rank-2", "window-all__rank-2"]
  assert rec["jobs"][0]["args"][-1] == "--config.grid_points=window-kill__rank-2__seed-0"
  assert "--config.grid.rank=(2,)" in rec["units"][1]["command"]
  bad = subprocess.run([sys.executable, "-m", "analysis.grid", "launch", "--dry_run", f"--workdir={tmp_path}",
                        "--config.grid_points=a"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert bad.returncode != 0 and "set by the launcher" in bad.stderr


def _table(wd):
  with open(os.path.join(wd, "grid.csv")) as f:
    return {r["point"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_two_point_grid_through_submitit_local_executor_collects_like_the_local_runner(tmp_path):
  pytest.importorskip("submitit")
  c = _config(window=("kill", "all"), rank=(2,), seed=(0,))
  local = str(tmp_path / "local")
  avoid_red.run(c, local)
  spec = launch.LaunchSpec("analysis.avoid_red", os.path.join(ROOT, "configs", "grid.py") + ":quick",
                           ("--config.grid.window=kill,all", "--config.grid.rank=(2,)", "--config.grid.seed=(0,)"),
                           str(tmp_path / "slurm"))
  units = grid.work_units(grid.expand(c.grid), c.vmap_axis)
  with pytest.raises(FileNotFoundError, match="no finished grid point yet"):
    avoid_red.collect(c, spec.workdir)
  jobs = launch.launch_slurm(spec, units, str(tmp_path / "slurm" / "submitit"), cluster="local",
                             params={"timeout_min": 30})
  for j in jobs:
    j.result()
  assert not os.path.exists(os.path.join(spec.workdir, "report.md"))   # units write their points only
  report = avoid_red.collect(c, spec.workdir)
  a, b = _table(local), _table(spec.workdir)
  assert set(a) == set(b) == {"window-kill__rank-2__seed-0", "window-all__rank-2__seed-0"}
  for name in a:
    for k in a[name]:
      if k != "point" and k not in ("window", "rank", "seed"):
        np.testing.assert_allclose(float(b[name][k]), float(a[name][k]), rtol=1e-4, atol=1e-6, err_msg=k)
  for p in units[0].points:
    assert json.load(open(os.path.join(grid.point_dir(spec.workdir, p), "point.json")))["fingerprint"] == \
        json.load(open(os.path.join(grid.point_dir(local, p), "point.json")))["fingerprint"]
  # partial while a point is missing, then whole again: collection is safe to repeat
  moved = os.path.join(grid.point_dir(spec.workdir, units[1].points[0]), grid.METRICS_FILE)
  shutil.move(moved, moved + ".away")
  avoid_red.collect(c, spec.workdir)
  m = json.load(open(os.path.join(spec.workdir, "metrics.json")))
  assert m["table"]["missing"] == [units[1].points[0].name] and not m["table"]["complete"]
  assert "**PARTIAL: 1 of 2 grid points finished.**" in open(report).read()
  shutil.move(moved + ".away", moved)
  avoid_red.collect(c, spec.workdir)
  assert _table(spec.workdir) == b and "PARTIAL" not in open(report).read()


@pytest.mark.slow
def test_xmanager_local_executor_runs_the_units(tmp_path):
  """XManager's local executor (no container) runs one unit per work unit; skipped without the cloud extra."""
  pytest.importorskip("xmanager")
  c = _config(window=("kill",), rank=(2,), seed=(0,))
  args = (os.path.join(ROOT, "configs", "grid.py") + ":quick",
          ("--config.grid.window=kill", "--config.grid.rank=(2,)", "--config.grid.seed=(0,)"), str(tmp_path / "xm"))
  script = "\n".join([
      "from absl import app", "from analysis import grid", "from analysis.grid import launch",
      "from tests.test_grid_launch import _config",
      "c = _config(window=('kill',), rank=(2,), seed=(0,))",
      f"spec = launch.LaunchSpec('analysis.avoid_red', *{args!r})",
      "jobs = launch.xmanager_jobs(spec, grid.work_units(grid.expand(c.grid)), executor='local')",
      "app.run(lambda _: print('experiment', launch.launch_xmanager(jobs, 'test')))"])
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path)}, timeout=1800)
  assert out.returncode == 0, out.stderr[-4000:]
  assert grid.is_finished(str(tmp_path / "xm"), grid.expand(c.grid)[0])
