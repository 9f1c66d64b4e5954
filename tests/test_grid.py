"""The ablation-grid runner (analysis/grid/__init__.py): expansion order and names, grouping for vmapping, resume that
skips finished points, fingerprints, the collected table (mean / std, CSV, markdown) and its figure."""
import csv
import io
import itertools
import json
import os

import ml_collections
import numpy as np
import pytest
import scipy.stats

from analysis import grid


def _grid(**axes):
  g = ml_collections.ConfigDict()
  g.axes = tuple(axes)
  for k, v in axes.items():
    setattr(g, k, v)
  return g


G = dict(window=("kill", "outside", (0.4, 1.0)), rank=(4, 8), seed=(0, 1, 2))


def test_expand_count_order_and_names():
  pts = grid.expand(_grid(**G))
  ref = list(itertools.product(*G.values()))                 # the last axis varies fastest
  assert len(pts) == 3 * 2 * 3 == len(ref)
  assert [tuple(v for _, v in p.values) for p in pts] == ref
  assert [p.index for p in pts] == list(range(18))
  assert pts[0].name == "window-kill__rank-4__seed-0"
  assert pts[1].name == "window-kill__rank-4__seed-1"
  assert pts[3].name == "window-kill__rank-8__seed-0"
  assert pts[-1].name == "window-0.4-1__rank-8__seed-2"
  assert pts[-1]["window"] == (0.4, 1.0) and pts[-1].get("lr", 3e-4) == 3e-4
  assert [p.name for p in grid.expand(_grid(**G))] == [p.name for p in pts]   # deterministic
  assert len({p.name for p in pts}) == 18
  # ml_collections sorts fields by name; the order comes from grid.axes alone.
  rev = grid.expand(_grid(seed=(0, 1, 2), rank=(4, 8), window=G["window"]))
  assert rev[1].name == "seed-0__rank-4__window-outside"
  assert grid.format_value(1e-4) == "0.0001" and grid.format_value(True) == "true"
  # An empty field not in axes is an inactive axis.
  assert [p.name for p in grid.expand({"axes": ("seed",), "seed": (0, 1), "lr": ()})] == ["seed-0", "seed-1"]


def test_groups_differ_only_in_the_vmap_axis():
  pts = grid.expand(_grid(**G))
  gs = grid.groups(pts, "seed")
  assert len(gs) == 6 and all(len(g) == 3 for g in gs)
  for g in gs:
    assert len({p.key("seed") for p in g}) == 1 and [p["seed"] for p in g] == [0, 1, 2]
  assert [g[0].name for g in gs[:2]] == ["window-kill__rank-4__seed-0", "window-kill__rank-8__seed-0"]
  assert len(grid.groups(pts, None)) == 18 and len(grid.groups(pts, "lr")) == 18


@pytest.mark.parametrize("g, msg", [
    (dict(window=("a",)), "config.grid.axes must be"),
    (dict(axes=("window", "seed"), window=("a",)), r"config.grid.seed \(its values\) is missing"),
    (dict(axes=("window",), window=("a",), seed=(0,)), "config.grid.seed has values but is not listed"),
    (dict(axes=("window",), window=()), "config.grid.window must be a non-empty tuple"),
    (dict(axes=("window",), window=("a/b",)), "config.grid.window: 'a/b' may only contain"),
    (dict(axes=("window",), window=("a-b", ("a", "b"))), "share the name 'window-a-b'"),
    (dict(axes=("window", "window"), window=("a",)), "repeats an axis"),
    (dict(axes=("window",), window=(None,)), "is not a str"),
])
def test_bad_grids_are_clear_errors(g, msg):
  with pytest.raises(grid.GridError, match=msg):
    grid.expand(g)


def _job(calls, fail_on=None):
  """A fake point job: scalars are fixed functions of the point's values."""
  def job(points, dirs):
    calls.append([p.name for p in points])
    for p, d in zip(points, dirs):
      if p.name == fail_on:
        raise grid.Stopped("budget")
      r, s = p["rank"], p["seed"]
      grid.write_point(d, p, {"loss": r + 0.5 * s, "acc": 1.0 / r if s != 2 else float("nan")}, extra=[r, s])
  return job


def test_resume_skips_finished_points_and_gives_the_same_table(tmp_path):
  g = _grid(window=("kill", "all"), rank=(4, 8), seed=(0, 1, 2))
  pts, wd = grid.expand(g), str(tmp_path)
  fp = lambda p: {"lr": 1e-4, "values": dict(p.values)}                                   # noqa: E731
  calls = []
  st = grid.run(pts, wd, _job(calls), "seed", fp)
  assert len(calls) == 4 and all(len(c) == 3 for c in calls)          # one call per group: 3 seeds together
  assert st == {"ran": [p.name for p in pts], "skipped": [], "stopped": []}
  t1 = grid.collect(pts, wd, "seed")
  mtimes = {p.name: os.path.getmtime(os.path.join(grid.point_dir(wd, p), "metrics.json")) for p in pts}
  calls2 = []
  st2 = grid.run(pts, wd, _job(calls2), "seed", fp)
  assert calls2 == [] and st2["ran"] == [] and st2["skipped"] == [p.name for p in pts]
  assert grid.collect(pts, wd, "seed") == t1
  assert mtimes == {p.name: os.path.getmtime(os.path.join(grid.point_dir(wd, p), "metrics.json")) for p in pts}
  # An unfinished point: only it runs, alone in its group's call.
  os.remove(os.path.join(grid.point_dir(wd, pts[4]), "metrics.json"))
  calls3 = []
  st3 = grid.run(pts, wd, _job(calls3), "seed", fp)
  assert calls3 == [[pts[4].name]] and st3["ran"] == [pts[4].name]
  assert grid.collect(pts, wd, "seed") == t1
  # A changed config is refused for finished points, naming the field.
  with pytest.raises(grid.GridError, match=r"different config \(lr: 0.0001 -> 0.0002\)"):
    grid.run(pts, wd, _job([]), "seed", lambda p: {"lr": 2e-4, "values": dict(p.values)})


def test_stopped_job_and_unfinished_job(tmp_path):
  pts = grid.expand(_grid(rank=(4, 8), seed=(0, 1)))
  st = grid.run(pts, str(tmp_path), _job([], fail_on=pts[1].name), "seed")
  assert st["stopped"] == [pts[0].name, pts[1].name] and st["ran"] == []
  with pytest.raises(FileNotFoundError, match="is not finished"):
    grid.collect(pts, str(tmp_path), "seed")
  with pytest.raises(RuntimeError, match="without writing"):
    grid.run(pts, str(tmp_path / "b"), lambda points, dirs: None, "seed")


def test_collected_table_mean_std_csv_markdown_and_figure(tmp_path):
  g = _grid(window=("kill", "all"), rank=(4, 8), seed=(0, 1, 2))
  pts = grid.expand(g)
  grid.run(pts, str(tmp_path), _job([]), "seed")
  t = grid.collect(pts, str(tmp_path), "seed")
  assert t["metrics"] == ["loss", "acc"] and len(t["groups"]) == 4
  g0 = t["groups"][1]
  assert g0["values"] == {"window": "kill", "rank": 8} and g0["label"] == "window=kill, rank=8"
  loss = np.array([8 + 0.5 * s for s in (0, 1, 2)])
  lo, hi = scipy.stats.t.interval(0.95, 2, loc=loss.mean(), scale=scipy.stats.sem(loss))
  assert g0["mean"]["loss"] == pytest.approx(loss.mean()) and g0["sd"]["loss"] == pytest.approx(loss.std(ddof=1))
  assert g0["ci_low"]["loss"] == pytest.approx(lo) and g0["ci_high"]["loss"] == pytest.approx(hi)
  assert g0["mean"]["acc"] == pytest.approx(1 / 8) and g0["sd"]["acc"] == 0.0 and g0["n"]["acc"] == 2
  rows = list(csv.DictReader(io.StringIO(grid.csv_text(t))))
  assert len(rows) == 12 and rows[5]["point"] == pts[5].name and rows[5]["window"] == "kill"
  assert float(rows[5]["loss"]) == 8 + 0.5 * 2 and np.isnan(float(rows[5]["acc"]))
  md = grid.markdown_table(t, [("loss", "loss", "{:.2f}"), ("acc", "acc", "%")], "group")
  assert f"| window=kill, rank=8 | 3 | 8.50 [{lo:.2f}, {hi:.2f}] | 12.5% [12.5%, 12.5%] |" in md.splitlines()
  one = dict(g0, n={"loss": 1}, ci_low={"loss": float("nan")})
  assert grid.format_stat(one, "loss", "{:.2f}") == "8.50 (n = 1, no CI)"
  fig = grid.figure(t, [("loss", "loss"), ("acc", "acc")], "t")
  assert len([a for a in fig.axes if a.get_visible() and a.has_data()]) == 2
  pm = json.load(open(os.path.join(grid.point_dir(str(tmp_path), pts[5]), "metrics.json")))
  assert pm["extra"] == [8, 2] and pm["values"] == {"window": "kill", "rank": 8, "seed": 2}
