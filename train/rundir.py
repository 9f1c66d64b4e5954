"""Run directories: every entry point writes config.json, metrics.jsonl, TensorBoard events, figures, report.md.

Whole files are written to a temporary sibling, fsynced and renamed (then the directory is fsynced), so a crash
never leaves a half-written output; they get the usual mode, 0o666 less the umask. A directory that already holds
checkpoints is resumed only with the config it was started with (train.resume).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import secrets
import weakref
from typing import Any, Iterator

from absl import logging

from train import typed_config
from train.resume import check_resume


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a new temporary path in path's directory; rename it to `path` only if the block succeeds.

  The temporary file is created with mode 0o666 (the kernel applies the umask, as for any new file), fsynced
  before the rename, and the directory is fsynced after it (best effort: some platforms and filesystems cannot
  fsync a directory). Raises OSError (with a note naming `path`) if the file cannot be created, synced or renamed.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = _create_temp(directory, "." + os.path.basename(path) + ".")
  try:
    yield tmp
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(directory)
  except OSError as e:
    e.add_note(f"while writing {path}")
    raise
  finally:
    if os.path.exists(tmp):
      with contextlib.suppress(OSError):   # never hide the error that got us here
        os.remove(tmp)


def _create_temp(directory: str, prefix: str) -> str:
  """A new empty file `<directory>/<prefix><random>.tmp` created with mode 0o666 & ~umask; its path.

  Not tempfile.mkstemp: that creates mode 0o600 whatever the umask, and reading the umask means setting it
  (os.umask), which races with other threads creating files."""
  for _ in range(100):
    tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      return tmp
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, "no unused temporary file name", os.path.join(directory, prefix + "*"))


def _fsync_dir(directory: str) -> None:
  """fsync a directory so a rename in it is durable; a no-op where directories cannot be opened or synced."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


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


def has_checkpoints(path: str) -> bool:
  """Whether `path` or any directory below it holds an orbax checkpoint step (`.../checkpoints/<step>`)."""
  for root, dirs, _ in os.walk(path):
    if os.path.basename(root) == "checkpoints" and any(d.isdigit() for d in dirs):
      return True
  return False


def _inside_run(path: str) -> bool:
  """Whether a directory above `path` is a run directory (holds config.json): a study's stage directory, whose
  enclosing run compared the whole config (with every stage's) when it started."""
  p = os.path.dirname(os.path.abspath(path))
  while True:
    if os.path.isfile(os.path.join(p, "config.json")):
      return True
    parent = os.path.dirname(p)
    if parent == p:
      return False
    p = parent


def default_workdir(model_name: str, root: str = "runs") -> str:
  """`runs/<YYYY-MM-DD>-<model>`, the README's convention."""
  return os.path.join(root, f"{datetime.date.today().isoformat()}-{model_name}")


class Workdir:
  """A run directory with the standard files.

  config.json (written at construction), metrics.jsonl (one JSON object a line, appended and flushed),
  TensorBoard events under tb/ (tensorboardX), figures under figures/, report.md.
  """

  _instances: weakref.WeakSet[Workdir] = weakref.WeakSet()   # for close_all on a user error (run_app)

  def __init__(self, path: str, config: Any):
    """Create (or reopen) the run directory and write config.json.

    Where the directory already holds checkpoints, the config.json there is compared with `config` first
    (train.resume.check_resume, mode = the config's `resume` field, default "check"); ResumeConfigError names
    the differing fields and nothing is written. A stage directory inside another run directory is not
    compared again (the enclosing run's config holds the stage's).
    """
    self.path = path
    new = typed_config.to_dict(config)
    old_path = os.path.join(path, "config.json")
    if os.path.isfile(old_path) and has_checkpoints(path) and not _inside_run(path):
      with open(old_path, encoding="utf-8") as f:
        old = json.load(f)
      accepted = check_resume(old, json.loads(json.dumps(new, default=_jsonable)), new.get("resume", "check"),
                              path)
      if accepted:
        logging.warning("resuming %s with changed fields that do not alter results: %s", path,
                        ", ".join(k for k, _, _ in accepted))
    os.makedirs(path, exist_ok=True)
    write_json(self.file("config.json"), new)
    self._tb = None
    Workdir._instances.add(self)

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

  def history(self) -> list[dict[str, float]]:
    """The metrics.jsonl rows, one per step (the last row written for a step wins: a resumed run replays the
    steps after its newest checkpoint), sorted by step; [] when there is none."""
    path = os.path.join(self.path, "metrics.jsonl")
    if not os.path.isfile(path):
      return []
    rows: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]

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

  @classmethod
  def close_all(cls) -> None:
    """Close every live Workdir's TensorBoard writer, ignoring errors (a failing run's last flush)."""
    for wd in list(cls._instances):
      with contextlib.suppress(Exception):
        wd.close()


