"""The main job: where in depth steering breaks behaviour, then whether benign fine-tuning reverts alignment.

    make run    # = python -m analysis.main --config=configs/main.py:smollm2 --workdir=runs/<date>-smollm2

Stage 1 is the layer sweep (probes/sweep.py: rho-eval baselines, each behavior's own CAA vector screened at
every layer against covariance-shaped controls, the exact kill-zone test, linear probes), written to
<workdir>/sweep. Stage 2 is the reversion study
(analysis/reversion/: safety LoRA -> theta_aligned, v_rev, benign fine-tuning arms with per-step, per-layer
alignment), written to <workdir>/reversion. <workdir>/report.md links both and repeats their headline tables,
rebuilt from each stage's metrics.json. Both stages resume from their checkpoints when rerun with the same workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging

from analysis.reversion import report as reversion_report
from analysis.reversion import study as reversion
from analysis.reversion.config import ReversionConfig
from models import registry
from probes import sweep, sweep_report
from probes.sweep_config import SweepConfig
from train.resume import check_mode
from train.rundir import Workdir, default_workdir, write_text


@dataclasses.dataclass(frozen=True)
class MainConfig:
  """configs/main.py, converted once (train.typed_config)."""
  sweep: SweepConfig
  reversion: ReversionConfig
  run_sweep: bool
  run_reversion: bool
  quiet_libraries: bool               # hide orbax / absl INFO chatter so the progress bars stay readable
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)

  def __post_init__(self):
    check_mode(self.resume)


def run(config: MainConfig, workdir: str | None = None) -> str:
  """Run the enabled stages and write the top-level report; returns its path.

  Raises TypeError unless `config` is a MainConfig (train.typed_config.from_configdict converts configs/main.py).
  """
  if not isinstance(config, MainConfig):
    raise TypeError(f"analysis.main.run takes a MainConfig, got {type(config).__name__}; convert with "
                    "train.typed_config.from_configdict(MainConfig, c)")
  if config.quiet_libraries:
    logging.set_verbosity(logging.WARNING)
  workdir = workdir or default_workdir("smollm2")
  for stage in (config.sweep, config.reversion):   # a missing model fails before the workdir is written
    registry.resolve(stage.model)
  wd = Workdir(workdir, config)
  t0 = time.time()
  stages = [(n, f) for n, f, on in (("sweep", lambda d: sweep.run(config.sweep, d), config.run_sweep),
                                    ("reversion", lambda d: reversion.run(config.reversion, d),
                                     config.run_reversion)) if on]
  times = {}
  for k, (name, fn) in enumerate(stages, 1):
    ts = time.time()
    print(f"[{k}/{len(stages)}] {name} -> {os.path.join(workdir, name)} "
          f"(elapsed {(ts - t0) / 60:.1f} min)", flush=True)
    out = fn(os.path.join(workdir, name))
    times[name] = time.time() - ts
    print(f"[{k}/{len(stages)}] {name} done in {times[name] / 60:.1f} min: {out}", flush=True)
  path = wd.file("report.md")
  write_text(path, "\n".join(_report(config, workdir, times, time.time() - t0)))
  wd.close()
  return path


def _metrics(workdir: str, stage: str) -> dict | None:
  """A stage's metrics.json, or None when the stage has not finished (stopped early, or not run)."""
  path = os.path.join(workdir, stage, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _report(config: MainConfig, workdir: str, times: dict[str, float], total_s: float) -> list[str]:
  """The top-level report: timing, then each finished stage's headline tables from its metrics.json."""
  lines = ["# gravlab main job", "",
           f"Total {total_s / 60:.1f} min (" + ", ".join(f"{n} {t / 60:.1f} min" for n, t in times.items()) + ").",
           ""]
  m = _metrics(workdir, "sweep") if "sweep" in times else None
  if m is not None:
    lines += ["## 1. Where steering breaks behaviour (layer sweep)", "",
              "Full report: [sweep/report.md](sweep/report.md).", ""]
    lines += sweep_report.headline(config.sweep, m)
  m = _metrics(workdir, "reversion") if "reversion" in times else None
  if m is not None:
    lines += ["## 2. Does benign fine-tuning revert alignment? (gravitational reversion)", "",
              "Full report: [reversion/report.md](reversion/report.md).", ""]
    lines += reversion_report.headline(config.reversion, m, "reversion", reversion.PAPER)
  return lines


if __name__ == "__main__":
  from train.cli import run_app
  run_app(run, "configs/main.py", "Run directory (default runs/<date>-smollm2).", typed=MainConfig)
