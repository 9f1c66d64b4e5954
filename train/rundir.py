"""Run directories: every entry point writes config.json, metrics.jsonl, TensorBoard events, figures, report.md.

Whole files are written to a temporary sibling and renamed, so a crash never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from typing import Any, Iterator

from absl import app, flags
from ml_collections import config_flags

from train import typed_config


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a temporary path in path's directory; rename it to `path` only if the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Atomically write a text file."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  """Atomically write JSON (indent 2, numpy scalars converted)."""
  write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if hasattr(x, "to_dict"):
    return x.to_dict()
  return str(x)


def default_workdir(model_name: str, root: str = "runs") -> str:
  """`runs/<YYYY-MM-DD>-<model>`, the README's convention."""
  return os.path.join(root, f"{datetime.date.today().isoformat()}-{model_name}")


class Workdir:
  """A run directory with the standard files.

  config.json (written at construction), metrics.jsonl (one JSON object a line, appended and flushed),
  TensorBoard events under tb/ (tensorboardX), figures under figures/, report.md.
  """

  def __init__(self, path: str, config: Any):
    self.path = path
    os.makedirs(path, exist_ok=True)
    write_json(self.file("config.json"), typed_config.to_dict(config))   # a ConfigDict via _jsonable
    self._tb = None

  def file(self, *parts: str) -> str:
    p = os.path.join(self.path, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

  def log(self, step: int, **scalars: float) -> None:
    """Append one metrics.jsonl row and the same scalars to TensorBoard."""
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.file("metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    tb = self.tensorboard()
    for k, v in scalars.items():
      tb.add_scalar(k, float(v), int(step))

  def tensorboard(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter   # local: only runs that log scalars need it
      self._tb = SummaryWriter(self.file("tb", ".keep")[:-len(".keep")])
    return self._tb

  def save_figure(self, fig, name: str) -> str:
    """Atomically save a matplotlib figure as figures/<name>.png (dpi 150); returns its path."""
    path = self.file("figures", name + ".png")
    with atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    return path

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def run_app(run, config_file: str, workdir_help: str, typed: type | None = None) -> None:
  """The shared absl entry point: `--config=<config_file>:<preset>` (ml_collections, `--config.x=v` overrides)
  and `--workdir`, then `run(config, workdir)` and print where its report is.

  typed: the study's frozen config dataclass; the ConfigDict is converted once (train.typed_config), and a bad
  field stops the program with one line naming it before anything runs. Flags are defined here, at program
  start, never at import time, so entry-point modules can import each other.
  """
  flags.DEFINE_string("workdir", None, workdir_help)
  config_flags.DEFINE_config_file("config", config_file, "Config file (path:preset).", lock_config=True)

  def main(argv):
    del argv
    config = flags.FLAGS.config
    if typed is not None:
      try:
        config = typed_config.from_configdict(typed, config)
      except typed_config.ConfigError as e:
        raise app.UsageError(str(e)) from None
    print(f"report: {run(config, flags.FLAGS.workdir)}")

  app.run(main)
