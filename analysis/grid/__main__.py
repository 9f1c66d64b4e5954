"""Launch a grid through a launcher, or collect what its points have written.

    python -m analysis.grid launch --launcher=local|slurm|xmanager --config=configs/grid.py:smollm2 \\
        [--config.x=v ...] --workdir=DIR [launcher flags]
    python -m analysis.grid collect --config=configs/grid.py:smollm2 [--config.x=v ...] --workdir=DIR

The grid is the config's own (`config.grid`, expanded by analysis.grid.expand with the overrides applied), cut
into work units by analysis.grid.work_units; analysis/grid/launch.py documents the command each unit runs.
`launch` writes <workdir>/launch.json (launcher, units, their commands) and submits only the units with
unfinished points; `collect` writes the study's grid.csv, metrics.json, figures and report.md from the finished
points (PARTIAL while some are missing) and can run at any time, as often as wanted.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from analysis import grid
from analysis.grid import launch as launch_lib
from train import typed_config
from train.cli import register_sequence_flags
from train.rundir import write_json

# Studies with a grid: entry module -> (module with `run` / `collect`, its typed config class).
STUDIES = {"analysis.avoid_red": ("analysis.avoid_red.study", "analysis.avoid_red.config", "AvoidRedConfig")}

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/grid.py:smollm2"


def _define_flags() -> None:
  register_sequence_flags()
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The study's grid config (path:preset).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The grid's workdir (every unit writes its points under it).", required=True)
  flags.DEFINE_string("study", "analysis.avoid_red", f"The study's entry module: {', '.join(STUDIES)}.")
  flags.DEFINE_enum("launcher", "local", ["local", "slurm", "xmanager"], "Who runs the work units.")
  flags.DEFINE_bool("dry_run", False, "Print the units' commands / job specs and submit nothing.")
  flags.DEFINE_bool("wait", True, "slurm: wait for the jobs and collect when they finish.")
  flags.DEFINE_enum("slurm_cluster", "auto", ["auto", "slurm", "local"], "submitit cluster (local: this machine).")
  flags.DEFINE_string("slurm_partition", None, "SLURM partition.")
  flags.DEFINE_integer("timeout_min", 240, "Per-task time limit (minutes).")
  flags.DEFINE_integer("gpus_per_node", 0, "GPUs per task.")
  flags.DEFINE_integer("cpus_per_task", 8, "CPUs per task.")
  flags.DEFINE_integer("array_parallelism", 16, "At most this many array tasks at once.")
  flags.DEFINE_enum("executor", "vertex", ["vertex", "local"], "xmanager: Vertex AI or XManager's local executor.")
  flags.DEFINE_string("accelerator", "H100", f"xmanager / Vertex AI accelerator: {', '.join(launch_lib.ACCELERATORS)}.")
  flags.DEFINE_integer("accelerator_count", 1, "Accelerators per work unit.")
  flags.DEFINE_string("image", launch_lib.VERTEX_IMAGE, "Vertex AI base image.")


def overrides(argv: list[str]) -> tuple[str, ...]:
  """The `--config.x=v` flags of the command line, verbatim and in order (passed on to every unit). Raises
  app.UsageError for the space-separated form, which cannot be passed on unambiguously."""
  out = []
  for a in argv:
    if a.startswith("--config."):
      if "=" not in a:
        raise app.UsageError(f"{a}: write config overrides as --config.x=v")
      out.append(a)
  return tuple(out)


def _study(name: str):
  if name not in STUDIES:
    raise app.UsageError(f"--study={name}: choose from {', '.join(STUDIES)}")
  mod, cmod, cls = STUDIES[name]
  return importlib.import_module(mod), getattr(importlib.import_module(cmod), cls)


def _spec(argv: list[str]) -> launch_lib.LaunchSpec:
  return launch_lib.LaunchSpec(FLAGS.study, _config_arg(argv), overrides(argv), os.path.abspath(FLAGS.workdir))


def _config_arg(argv: list[str]) -> str:
  """The --config value as given (default: the flag's default), its file made absolute for the units."""
  val = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), DEFAULT_CONFIG)
  path, sep, preset = val.partition(":")
  return os.path.abspath(path) + sep + preset


def _launch(argv, config, vmap_axis) -> None:
  spec = _spec(argv)
  units = grid.work_units(grid.expand(config.grid), vmap_axis)
  todo = launch_lib.pending(units, spec.workdir)
  record = {"launcher": FLAGS.launcher, "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "units": [{"name": u.name, "points": [p.name for p in u.points],
                       "command": launch_lib.unit_command(spec, u)} for u in units],
            "submitted": [u.name for u in todo]}
  if FLAGS.launcher == "xmanager":
    record["jobs"] = launch_lib.xmanager_jobs(spec, todo, executor=FLAGS.executor, accelerator=FLAGS.accelerator,
                                              count=FLAGS.accelerator_count, image=FLAGS.image)
  if FLAGS.dry_run:
    print(json.dumps(record, indent=2))
    return
  write_json(os.path.join(spec.workdir, "launch.json"), record)
  print(f"{len(units)} work units, {len(todo)} with unfinished points")
  if FLAGS.launcher == "local":
    launch_lib.launch_local(spec, todo)
  elif FLAGS.launcher == "slurm":
    params = {"timeout_min": FLAGS.timeout_min, "gpus_per_node": FLAGS.gpus_per_node,
              "cpus_per_task": FLAGS.cpus_per_task, "slurm_array_parallelism": FLAGS.array_parallelism}
    if FLAGS.slurm_partition:
      params["slurm_partition"] = FLAGS.slurm_partition
    jobs = launch_lib.launch_slurm(spec, todo, os.path.join(spec.workdir, "slurm"),
                                   cluster=None if FLAGS.slurm_cluster == "auto" else FLAGS.slurm_cluster,
                                   params=params)
    print("submitted " + ", ".join(str(j.job_id) for j in jobs))
    if not FLAGS.wait:
      return
    for j in jobs:
      j.result()
  elif todo:
    print(f"XManager experiment {launch_lib.launch_xmanager(record['jobs'], f'gravlab {FLAGS.study}')}")


def main(argv) -> None:
  if len(argv) != 2 or argv[1] not in ("launch", "collect"):
    raise app.UsageError("usage: python -m analysis.grid launch|collect --config=... --workdir=...")
  module, cls = _study(FLAGS.study)
  config = typed_config.from_configdict(cls, FLAGS.config)
  if config.grid_points:
    raise app.UsageError("--config.grid_points is set by the launcher for each work unit")
  if argv[1] == "launch":
    _launch(sys.argv, config, config.vmap_axis)
    if FLAGS.dry_run or (FLAGS.launcher == "slurm" and not FLAGS.wait) or \
        (FLAGS.launcher == "xmanager" and FLAGS.executor != "local"):
      return
  try:
    print(f"report: {module.collect(config, os.path.abspath(FLAGS.workdir))}")
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
