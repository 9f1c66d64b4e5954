"""The avoid-the-red study's typed, frozen configuration (configs/avoid_red.py or configs/grid.py, converted once;
train.typed_config). Those files hold the values and document the fields."""
from __future__ import annotations

import dataclasses
from typing import Any

from analysis.reversion.config import ReversionConfig
from probes.sweep_config import SweepConfig
from train.resume import check_mode


@dataclasses.dataclass(frozen=True)
class KillZoneSection:
  window: tuple[float, float]         # explicit depth window when sweep_metrics is ""
  sweep_metrics: str                  # a probes.sweep metrics.json to take the kill zone from
  behavior: str
  alpha: float


@dataclasses.dataclass(frozen=True)
class AvoidRedConfig:
  reversion: ReversionConfig          # the base every point runs (its safety phase and baseline arm)
  sweep: SweepConfig                  # the scored probes of the behavior cost
  kill_zone: KillZoneSection
  grid: dict[str, Any]                # axes (names, expansion order) and one tuple of values per axis (analysis.grid)
  vmap_axis: str                      # points differing only here run benign fine-tuning as one program
  stop_after: int                     # -1 = run to the end
  grid_points: tuple[str, ...] = ()   # a launcher's work unit: run these points only, no top-level outputs
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)

  def __post_init__(self):
    check_mode(self.resume)
