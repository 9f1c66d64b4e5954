"""Hand a grid's work units to a launcher: one after another here, a SLURM job array (submitit) or an XManager
experiment (one work unit per group on Vertex AI, or XManager's local executor).

Every launcher gets its jobs from `analysis.grid.work_units` (one per group of points that differ only in the vmap
axis, so a seed group still shares one compiled program) and runs the same command for each:

    python -m <study> --config=<config> <the user's --config.x=v overrides> --workdir=<workdir>
        --config.grid_points=<the unit's points>

The study expands the whole grid from the same config (same point names, directories and point.json
fingerprints as a local run), runs only the unit's points and writes no top-level outputs; finished points are
skipped and unfinished ones resume from their orbax checkpoints, so relaunching a grid is safe.
`python -m analysis.grid collect` then writes the study's table and report from whatever has finished.

submitit and xmanager are imported only here, inside the launchers (the `cloud` extra, not the runtime).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any, Sequence

from analysis import grid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERTEX_IMAGE = "python:3.11-slim"        # base image of the Vertex AI container; the repo is copied on top
ACCELERATORS = ("H100", "A100", "A100_80GIB", "L4", "T4", "V100", "TPU_V2", "TPU_V3")   # xm.ResourceType names
                                                                                        # XManager's Vertex backend takes


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """What every work unit's command shares: the study's entry module (e.g. "analysis.avoid_red"), the --config
  value ("configs/grid.py:smollm2"), the user's `--config.x=v` overrides (in order) and the grid's workdir (on a
  cluster: a path every node sees; on Vertex AI a Cloud Storage FUSE path, /gcs/<bucket>/...)."""
  module: str
  config: str
  overrides: tuple[str, ...]
  workdir: str


def unit_args(spec: LaunchSpec, unit: grid.WorkUnit) -> list[str]:
  """The flags after `python -m <module>` for one work unit (module docstring)."""
  return [f"--config={spec.config}", *spec.overrides, f"--workdir={spec.workdir}", *unit.flags]


def unit_command(spec: LaunchSpec, unit: grid.WorkUnit, python: str = sys.executable) -> list[str]:
  """The whole argv of one work unit."""
  return [python, "-m", spec.module, *unit_args(spec, unit)]


def pending(units: Sequence[grid.WorkUnit], workdir: str) -> list[grid.WorkUnit]:
  """The units with at least one unfinished point (a relaunch submits only these)."""
  return [u for u in units if not all(grid.is_finished(workdir, p) for p in u.points)]


def launch_local(spec: LaunchSpec, units: Sequence[grid.WorkUnit]) -> list[int]:
  """Run the units one after another as subprocesses of this machine (cwd: the repository root); returns their
  exit statuses. Raises RuntimeError naming the first unit that failed."""
  codes = []
  for u in units:
    r = subprocess.run(unit_command(spec, u), cwd=ROOT)
    codes.append(r.returncode)
    if r.returncode:
      raise RuntimeError(f"work unit {u.name} exited with status {r.returncode}: {' '.join(unit_command(spec, u))}")
  return codes


def launch_slurm(spec: LaunchSpec, units: Sequence[grid.WorkUnit], folder: str, *, cluster: str | None = None,
                 params: dict[str, Any] | None = None) -> list[Any]:
  """Submit the units as one submitit job array (one task per unit); returns the submitit Jobs.

  folder: submitit's log / job folder (`<workdir>/slurm` by default in the CLI). cluster: None = auto (SLURM when
  `sbatch` is on the PATH), "slurm", or "local" (submitit's LocalExecutor: subprocesses of this machine; tests).
  params: AutoExecutor.update_parameters keywords, e.g. timeout_min, gpus_per_node, cpus_per_task, mem_gb,
  slurm_partition, slurm_array_parallelism. Each task runs `unit_command` through submitit's CommandFunction in
  the repository root."""
  import submitit   # the cloud extra
  ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
  ex.update_parameters(name=f"gravlab-{spec.module.rsplit('.', 1)[-1]}", **(params or {}))
  fn = submitit.helpers.CommandFunction([sys.executable, "-m", spec.module], cwd=ROOT,
                                        env={**os.environ, "PYTHONPATH": ROOT})
  with ex.batch():
    jobs = [ex.submit(fn, *unit_args(spec, u)) for u in units]
  return jobs


def xmanager_jobs(spec: LaunchSpec, units: Sequence[grid.WorkUnit], *, executor: str = "vertex",
                  accelerator: str = "H100", count: int = 1, image: str = VERTEX_IMAGE) -> list[dict[str, Any]]:
  """The job specs `launch_xmanager` submits, one per work unit, as plain data: {"name", "points", "module",
  "args", "executor" ("vertex" | "local"), "requirements" ({accelerator: count} on Vertex AI, {} locally),
  "image"}. Raises ValueError for an unknown executor or an accelerator XManager's Vertex backend cannot place
  (it maps only TPU v2 / v3 and the GPUs in ACCELERATORS; TPU v5p needs GKE or a TPU VM, not Vertex)."""
  if executor not in ("vertex", "local"):
    raise ValueError(f"--executor must be 'vertex' or 'local', got {executor!r}")
  if executor == "vertex" and accelerator not in ACCELERATORS:
    raise ValueError(f"--accelerator {accelerator!r}: XManager's Vertex AI executor takes {', '.join(ACCELERATORS)}")
  req = {accelerator: count} if executor == "vertex" else {}
  return [{"name": u.name, "points": [p.name for p in u.points], "module": spec.module, "args": unit_args(spec, u),
           "executor": executor, "requirements": req, "image": image if executor == "vertex" else None}
          for u in units]


def launch_xmanager(jobs: Sequence[dict[str, Any]], title: str) -> int:
  """Create an XManager experiment with one work unit per job spec (xmanager_jobs) and wait for the local ones;
  returns the experiment id. Raises ValueError for no jobs. Must run inside an absl app (XManager reads its flags). Local: `xm.binary` of this
  Python running `-m <module>` in the repository root (no container). Vertex AI: `xm.python_container` of the
  repository on the job's image, `xm_local.Vertex` with the job's requirements (needs gcloud credentials and
  the GOOGLE_CLOUD_* settings XManager documents)."""
  if not jobs:
    raise ValueError("launch_xmanager: no job to launch (every work unit is finished)")
  from xmanager import xm, xm_local   # the cloud extra
  with xm_local.create_experiment(experiment_title=title) as experiment:
    local = jobs[0]["executor"] == "local"
    if local:
      pkg = xm.binary(executor_spec=xm_local.Local.Spec(), path=sys.executable, args=["-m", jobs[0]["module"]],
                      env_vars={"PYTHONPATH": ROOT})
    else:
      pkg = xm.python_container(executor_spec=xm_local.Vertex.Spec(), path=ROOT, base_image=jobs[0]["image"],
                                entrypoint=xm.ModuleName(jobs[0]["module"]))
    [executable] = experiment.package([pkg])
    for j in jobs:
      executor = (xm_local.Local(experimental_stream_output=False) if local else
                  xm_local.Vertex(requirements=xm.JobRequirements(**j["requirements"])))
      experiment.add(xm.Job(executable, executor=executor, args=list(j["args"])))
    return experiment.experiment_id
