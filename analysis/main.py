"""The main job: where in depth steering breaks behaviour, then whether benign fine-tuning reverts alignment.

    make run    # = python -m analysis.main --config=configs/main.py:smollm2 --workdir=runs/<date>-smollm2

Stage 1 is the layer sweep (probes/sweep.py: CAA steering at every layer x alpha with the random-direction
control, kill zones, linear probes), written to <workdir>/sweep. Stage 2 is the reversion study
(analysis/reversion.py: safety LoRA -> theta_aligned, v_rev, benign fine-tuning arms with per-step, per-layer
alignment), written to <workdir>/reversion. <workdir>/report.md links both and repeats their headline tables.
Both stages resume from their checkpoints when rerun with the same workdir.
"""
from __future__ import annotations

import os
import time

from absl import logging


def _section(path: str, start: str, stop: str = "\n## ") -> str:
  """The text of `path` from the first line starting with `start` up to the next `stop` heading ("" if absent)."""
  if not os.path.exists(path):
    return ""
  text = open(path).read()
  i = text.find(start)
  if i < 0:
    return ""
  j = text.find(stop, i + len(start))
  return text[i:j if j >= 0 else len(text)].strip()


def _relink(section: str, sub: str) -> str:
  """Rewrite a sub-report's relative figure links so they resolve from the top-level report."""
  return section.replace("](figures/", f"]({sub}/figures/")


def run(config, workdir: str | None = None) -> str:
  """Run the enabled stages and write the top-level report; returns its path."""
  from analysis import reversion
  from train.rundir import Workdir, default_workdir, write_text
  from probes import sweep

  if config.quiet_libraries:
    logging.set_verbosity(logging.WARNING)
  workdir = workdir or default_workdir("smollm2")
  wd = Workdir(workdir, config)
  t0 = time.time()
  stages = [(n, f) for n, f, on in (("sweep", lambda d: sweep.run(config.sweep, d), config.run_sweep),
                                    ("reversion", lambda d: reversion.run(config.reversion, d),
                                     config.run_reversion)) if on]
  reports, times = {}, {}
  for k, (name, fn) in enumerate(stages, 1):
    ts = time.time()
    print(f"[{k}/{len(stages)}] {name} -> {os.path.join(workdir, name)} "
          f"(elapsed {(ts - t0) / 60:.1f} min)", flush=True)
    reports[name] = fn(os.path.join(workdir, name))
    times[name] = time.time() - ts
    print(f"[{k}/{len(stages)}] {name} done in {times[name] / 60:.1f} min: {reports[name]}", flush=True)

  lines = ["# gravlab main job", "",
           f"Total {(time.time() - t0) / 60:.1f} min ("
           + ", ".join(f"{n} {t / 60:.1f} min" for n, t in times.items()) + ").", ""]
  if "sweep" in reports:
    p = os.path.join(workdir, "sweep", "report.md")
    lines += ["## 1. Where steering breaks behaviour (layer sweep)", "", "Full report: [sweep/report.md](sweep/report.md).",
              ""]
    for head in ("## Kill zones",):
      sec = _section(p, head)
      if sec:
        lines += ["#" + _relink(sec, "sweep"), ""]
  if "reversion" in reports:
    p = os.path.join(workdir, "reversion", "report.md")
    lines += ["## 2. Does benign fine-tuning revert alignment? (gravitational reversion)", "",
              "Full report: [reversion/report.md](reversion/report.md).", ""]
    for head in ("## Alignment of the drift", "## Verdict"):
      sec = _section(p, head)
      if sec:
        lines += ["#" + _relink(sec, "reversion"), ""]
  path = wd.file("report.md")
  write_text(path, "\n".join(lines))
  wd.close()
  return path


if __name__ == "__main__":
  from train.rundir import run_app
  run_app(run, "configs/main.py", "Run directory (default runs/<date>-smollm2).")
