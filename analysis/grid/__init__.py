"""Ablation grids: one ml_collections config expands to the cartesian product of its axes; every point runs in its
own sub-workdir, resumably, and the results are collected into one table (markdown, CSV) and a figure.

Config: `config.grid` holds `axes`, the axis names in expansion order (the last varies fastest, as in
`itertools.product`), and one tuple of values per axis (ml_collections sorts fields by name, hence `axes`):

    grid.axes = ("window", "seed"); grid.window = ("kill", "outside", "all"); grid.seed = (0, 1, 2)

A field not in `axes` must be empty (`()`): an inactive axis, declared so that a locked config (the CLI) can
switch it on: --config.grid.axes="('window','lr','seed')" --config.grid.lr="(1e-4,2e-4)" (and empty any
axis left out: --config.grid.rank="()").

Values are str (letters, digits, `_ . + -`), int, float, bool or tuples of those; the point name joins
`axis-value` parts with "__" (tuples joined by "-"), e.g. "window-kill__seed-0" or "window-0.4-1__seed-2". Names
are deterministic and must be unique (two values with the same spelling are an error).

Layout and resume: point p writes `<workdir>/points/<p.name>/`. A point is finished when its `metrics.json` exists;
the job writes it last, atomically (`write_point`). `run` skips finished points and hands the job the unfinished
ones; the job resumes them from its own checkpoints inside the point directories.

The runner knows no study: `run(points, workdir, job)` hands each group of unfinished points to `job`. The safety-LoRA
ablation (`python -m analysis.avoid_red --config=configs/grid.py:smollm2`, depth window x rank x seed) is one.

Vmapping: points that differ only in `vmap_axis` (default "seed") form a group, and `run` hands each group's
unfinished points to the job in ONE call, so the job can run them as one vmapped program. What is vmapped inside a
group, and what stays sequential, is the job's business (analysis/avoid_red/study.py documents its own).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from analysis import plots as _style  # noqa: F401  (sets matplotlib's Agg backend before any figure)
from analysis.stats import t_interval
from train.rundir import write_json

METRICS_FILE = "metrics.json"
_SAFE = re.compile(r"[A-Za-z0-9_.+-]+")


class GridError(ValueError):
  """A grid config that cannot expand (missing / empty axis, bad value, duplicate point name)."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point. `values`: ((axis, value), ...) in axis order; `name`: its directory name (module docstring);
  `index`: position in the expansion."""
  index: int
  values: tuple[tuple[str, Any], ...]
  name: str

  def __getitem__(self, axis: str) -> Any:
    return dict(self.values)[axis]

  def get(self, axis: str, default: Any = None) -> Any:
    return dict(self.values).get(axis, default)

  def key(self, without: str | None = None) -> tuple:
    """The (axis, value) pairs except axis `without` (the group key when `without` is the vmap axis)."""
    return tuple((a, v) for a, v in self.values if a != without)


def format_value(v: Any, where: str = "value") -> str:
  """The spelling of one axis value in a point name. Raises GridError for other types / unsafe strings."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return f"{float(v):g}"
  if isinstance(v, str):
    if not _SAFE.fullmatch(v):
      raise GridError(f"{where}: {v!r} may only contain letters, digits and _ . + -")
    return v
  if isinstance(v, (tuple, list)) and v:
    return "-".join(format_value(x, where) for x in v)
  raise GridError(f"{where}: {v!r} is not a str, int, float, bool or non-empty tuple of those")


def axes(grid) -> list[tuple[str, tuple]]:
  """[(axis, values)] of a grid config (ConfigDict or dict with `axes` and one tuple per axis), validated.

  Raises:
    GridError: no `axes`, an axis without a field or with no values, a non-empty field not listed in `axes`
      (an empty one, `()`, is an inactive axis: declared so the command line can fill it in), a repeated axis.
  """
  g = grid.to_dict() if hasattr(grid, "to_dict") else dict(grid)
  names = g.get("axes")
  if not names or isinstance(names, str):
    raise GridError("config.grid.axes must be a non-empty tuple of axis names, e.g. ('window', 'seed')")
  if len(set(names)) != len(names):
    raise GridError(f"config.grid.axes {tuple(names)} repeats an axis")
  extra = sorted(k for k in set(g) - set(names) - {"axes"} if g[k] not in ((), []))
  if extra:
    raise GridError(f"config.grid.{extra[0]} has values but is not listed in config.grid.axes {tuple(names)}")
  out = []
  for a in names:
    if a not in g:
      raise GridError(f"config.grid.axes names {a!r} but config.grid.{a} (its values) is missing")
    vals = g[a]
    if not isinstance(vals, (tuple, list)) or not len(vals):
      raise GridError(f"config.grid.{a} must be a non-empty tuple of values, got {vals!r}")
    out.append((a, tuple(tuple(v) if isinstance(v, list) else v for v in vals)))
  return out


def expand(grid) -> list[Point]:
  """Every point of the grid, in `itertools.product` order over `grid.axes` (the last axis varies fastest).

  Raises GridError (see `axes`, `format_value`) or for two points with the same name.
  """
  ax = axes(grid)
  points, seen = [], {}
  for i, combo in enumerate(itertools.product(*[v for _, v in ax])):
    vals = tuple((a, v) for (a, _), v in zip(ax, combo))
    name = "__".join(f"{a}-{format_value(v, f'config.grid.{a}')}" for a, v in vals)
    if name in seen:
      raise GridError(f"config.grid: points {seen[name]} and {vals} share the name {name!r}")
    seen[name] = vals
    points.append(Point(i, vals, name))
  return points


def groups(points: Sequence[Point], vmap_axis: str | None = "seed") -> list[list[Point]]:
  """Points that differ only in `vmap_axis`, in order of first appearance (each point alone if the grid has no
  such axis or vmap_axis is None)."""
  out: dict[tuple, list[Point]] = {}
  for p in points:
    out.setdefault(p.key(vmap_axis) if vmap_axis else (p.name,), []).append(p)
  return list(out.values())


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """One launcher job: a group of points that differ only in the vmap axis (`groups`), so they still share one
  compiled program. `name`: the group's shared `axis-value` parts ("all" when only the vmap axis varies)."""
  index: int
  points: tuple[Point, ...]
  name: str

  @property
  def flags(self) -> tuple[str, ...]:
    """The command-line override that makes a study run exactly these points: `--config.grid_points=a,b`
    (bare comma form of train.cli's sequence parser; point names contain no comma)."""
    return (f"--config.grid_points={','.join(p.name for p in self.points)}",)


def work_units(points: Sequence[Point], vmap_axis: str | None = "seed") -> list[WorkUnit]:
  """The grid's jobs for any launcher (local, SLURM, XManager): one per `groups` group, in expansion order. Every
  launcher expands a grid with this one function, so points, names, workdirs and fingerprints agree."""
  out = []
  for i, grp in enumerate(groups(points, vmap_axis)):
    key = grp[0].key(vmap_axis) if vmap_axis else grp[0].values
    name = "__".join(f"{a}-{format_value(v)}" for a, v in key) or "all"
    out.append(WorkUnit(i, tuple(grp), name))
  return out


def select(points: Sequence[Point], names: Sequence[str]) -> list[Point]:
  """The points named in `names` (a work unit's config.grid_points), in expansion order; all of them when `names`
  is empty. Raises GridError naming the first unknown name."""
  if not names:
    return list(points)
  known = {p.name for p in points}
  bad = [n for n in names if n not in known]
  if bad:
    raise GridError(f"config.grid_points: {bad[0]!r} is not a point of this grid (points: {', '.join(sorted(known))})")
  return [p for p in points if p.name in set(names)]


def point_dir(workdir: str, point: Point) -> str:
  """`<workdir>/points/<point.name>`."""
  return os.path.join(workdir, "points", point.name)


def is_finished(workdir: str, point: Point) -> bool:
  """True when the point's metrics.json exists (the job writes it last)."""
  return os.path.isfile(os.path.join(point_dir(workdir, point), METRICS_FILE))


def write_point(directory: str, point: Point, scalars: dict[str, float], **extra) -> str:
  """Atomically write a finished point's metrics.json: {"point", "values", "scalars" (the table's columns,
  floats), **extra}; returns its path. Call it last: its existence marks the point finished."""
  path = os.path.join(directory, METRICS_FILE)
  write_json(path, {"point": point.name, "values": dict(point.values),
                    "scalars": {k: float(v) for k, v in scalars.items()}, **extra})
  return path


class Stopped(Exception):
  """Raised by a job that stopped on purpose (checkpointed, e.g. a step budget); `run` returns at once."""


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
      if d:
        return d
    return None
  return None if a == b else f"{path}: {a!r} -> {b!r}"


def check_fingerprint(workdir: str, point: Point, fp: Any) -> None:
  """Record `fp` (JSON-able: what determines the point's results) in `<point dir>/point.json`, or, when it is
  there already, raise GridError if it differs (naming the first differing field), so that a finished or
  half-run point is never reused under a changed config."""
  fp = json.loads(json.dumps(fp, default=str))
  path = os.path.join(point_dir(workdir, point), "point.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    d = _first_difference(old.get("fingerprint"), fp)
    if d:
      raise GridError(f"{path}: grid point {point.name} was run with a different config ({d}); use a new "
                      f"workdir or delete {os.path.dirname(path)}")
    return
  write_json(path, {"point": point.name, "values": dict(point.values), "fingerprint": fp})


def run(points: Sequence[Point], workdir: str, job: Callable[[list[Point], list[str]], None],
        vmap_axis: str | None = "seed", fingerprint: Callable[[Point], Any] | None = None) -> dict[str, list[str]]:
  """Run the unfinished points, group by group: `job(points, dirs)` gets the unfinished points of one group and
  their directories (created) and must write each one's metrics.json (`write_point`), or raise Stopped.

  fingerprint: point -> what determines its results (check_fingerprint, for every point, finished or not).
  Returns {"ran": [names], "skipped": [names] (finished before this call), "stopped": [names] (the group
  whose job raised Stopped; later groups were not started)}.
  Raises RuntimeError when the job returns without finishing one of its points; GridError (check_fingerprint).
  """
  ran, skipped = [], []
  for grp in groups(points, vmap_axis):
    if fingerprint is not None:
      for p in grp:
        check_fingerprint(workdir, p, fingerprint(p))
    todo = [p for p in grp if not is_finished(workdir, p)]
    skipped += [p.name for p in grp if p not in todo]
    if not todo:
      continue
    dirs = [point_dir(workdir, p) for p in todo]
    for d in dirs:
      os.makedirs(d, exist_ok=True)
    try:
      job(todo, dirs)
    except Stopped:
      return {"ran": ran, "skipped": skipped, "stopped": [p.name for p in todo]}
    for p, d in zip(todo, dirs):
      if not is_finished(workdir, p):
        raise RuntimeError(f"grid job returned without writing {os.path.join(d, METRICS_FILE)}")
    ran += [p.name for p in todo]
  return {"ran": ran, "skipped": skipped, "stopped": []}


def collect(points: Sequence[Point], workdir: str, vmap_axis: str | None = "seed",
            partial: bool = False) -> dict[str, Any]:
  """Read every point's metrics.json into one table.

  partial: skip unfinished points instead of raising (safe while launcher jobs still run: a point counts only
  once its metrics.json, written last and atomically, exists); groups with no finished point are left out.
  The table's "missing" lists the skipped points and "complete" says whether there were none.

  Returns {"metrics": [scalar names, first point's order, then any new ones], "points": [{"name", "values",
  "scalars"}], "groups": [{"values": {axis: value} (all axes but vmap_axis), "label" (the value when one axis
  is left, else "axis=value, ..."), "points": [names],
  "mean", "sd" (ddof = 1), "ci_low", "ci_high" (95% t interval over the group's points, analysis.stats.t_interval):
  {m: float}, "n": {m: int}}]}. They ignore NaN (a metric a point lacks counts as NaN); sd and CI are NaN
  (undefined) with fewer than 2 finite points. Raises FileNotFoundError naming the first unfinished point's file.
  """
  rows, names = [], []
  missing = [p for p in points if not is_finished(workdir, p)]
  if missing and not partial:
    raise FileNotFoundError(f"{os.path.join(point_dir(workdir, missing[0]), METRICS_FILE)}: grid point "
                            f"{missing[0].name} is not finished")
  points = [p for p in points if p not in missing]
  for p in points:
    path = os.path.join(point_dir(workdir, p), METRICS_FILE)
    with open(path) as f:
      sc = json.load(f)["scalars"]
    names += [k for k in sc if k not in names]
    rows.append({"name": p.name, "values": dict(p.values), "scalars": sc})
  by_name = {r["name"]: r for r in rows}
  out_groups = []
  for grp in groups(points, vmap_axis):
    vals = dict(grp[0].key(vmap_axis)) if vmap_axis else dict(grp[0].values)
    label = (format_value(next(iter(vals.values()))) if len(vals) == 1 else
             ", ".join(f"{a}={format_value(v)}" for a, v in vals.items()) or "all")
    cols = {"mean": {}, "sd": {}, "ci_low": {}, "ci_high": {}, "n": {}}
    for m in names:
      t = t_interval([by_name[p.name]["scalars"].get(m, np.nan) for p in grp])
      for k, d in cols.items():
        d[m] = t[k]
    out_groups.append({"values": vals, "label": label, "points": [p.name for p in grp], **cols})
  return {"metrics": names, "points": rows, "groups": out_groups, "missing": [p.name for p in missing],
          "complete": not missing}


def csv_text(table: dict[str, Any]) -> str:
  """One CSV row per point: name, one column per axis (tuples joined by "-"), one column per metric."""
  buf = io.StringIO()
  ax = list(table["points"][0]["values"]) if table["points"] else []
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["point"] + ax + table["metrics"])
  for r in table["points"]:
    w.writerow([r["name"]] + [format_value(r["values"][a]) for a in ax]
               + [repr(float(r["scalars"].get(m, float("nan")))) for m in table["metrics"]])
  return buf.getvalue()


def format_stat(group: dict[str, Any], metric: str, fmt: str = "{:+.3f}") -> str:
  """A group's "mean [95% CI low, high]" for one metric (format: a str.format spec such as "{:+.3f}"; "%"
  multiplies by 100 and appends %); "n/a" when unmeasured, "mean (n = 1, no CI)" with one finite point."""
  mu = group["mean"].get(metric, float("nan"))
  f = (lambda v: f"{100 * v:.1f}%") if fmt == "%" else fmt.format
  if mu != mu:
    return "n/a"
  lo, hi = group["ci_low"].get(metric, float("nan")), group["ci_high"].get(metric, float("nan"))
  if lo != lo:
    return f"{f(mu)} (n = {group['n'].get(metric, 0)}, no CI)"
  return f"{f(mu)} [{f(lo)}, {f(hi)}]"


def group_values(table: dict[str, Any], group: dict[str, Any], metric: str) -> np.ndarray:
  """The group's per-point values of one metric, float64 `[points]` (NaN where a point lacks it)."""
  by_name = {r["name"]: r["scalars"] for r in table["points"]}
  return np.array([by_name[p].get(metric, np.nan) for p in group["points"]], np.float64)


def markdown_table(table: dict[str, Any], columns: Sequence[tuple[str, str, str]], row_label: str = "group") -> str:
  """Markdown table: one row per group, one column per `(metric, header, format)` cell "mean [95% t CI]"
  (format_stat). n = points per group."""
  lines = [f"| {row_label} | n | " + " | ".join(h for _, h, _ in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for g in table["groups"]:
    cells = [format_stat(g, m, fmt) for m, _, fmt in columns]
    lines.append(f"| {g['label']} | {len(g['points'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def figure(table: dict[str, Any], columns: Sequence[tuple[str, str]], title: str, ncols: int = 4):
  """One panel per `(metric, label)`: every group's mean with its 95% t interval (error bar; none with one point) and
  its points as dots. Returns the Figure."""
  import matplotlib.pyplot as plt   # local: matplotlib is heavy; analysis.plots (imported above) chose Agg
  n = len(columns)
  nc = min(ncols, n)
  nr = -(-n // nc)
  G = table["groups"]
  fig, axes_ = plt.subplots(nr, nc, figsize=(3.0 * nc + 0.6, 2.8 * nr + 0.6), squeeze=False,
                            constrained_layout=True)
  x = np.arange(len(G))
  for k, (m, label) in enumerate(columns):
    ax = axes_[k // nc, k % nc]
    for i, g in enumerate(G):
      pts = group_values(table, g, m)
      ax.plot(np.full(len(pts), i) + np.linspace(-0.12, 0.12, len(pts)), pts, ".", color="0.55", ms=5)
      mu, lo, hi = g["mean"][m], g["ci_low"][m], g["ci_high"][m]
      yerr = [[mu - lo], [hi - mu]] if lo == lo else None
      ax.errorbar(i, mu, yerr=yerr, fmt="o", color=f"C{i % 10}", ms=6, capsize=4)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(x, [g["label"] for g in G], rotation=30 if len(G) > 3 else 0, ha="right" if len(G) > 3 else
                  "center", fontsize=8)
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
  for k in range(n, nr * nc):
    axes_[k // nc, k % nc].axis("off")
  fig.suptitle(title + "\n(mean and 95% t interval over the points of a group; dots: the points)", fontsize=10)
  return fig
