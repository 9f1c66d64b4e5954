"""The typed, frozen configuration of the IOI study (configs/ioi.py converted once; train.typed_config).

`python -m analysis.ioi` converts the ConfigDict with `from_configdict(IoiConfig, ...)` at start-up; the study
(analysis.ioi.study.run) takes the IoiConfig and its helpers take plain values. Values live in configs/ioi.py
(its presets); this module holds the names, types and the checks that stop a bad value before any phase runs.
Frozen: derive a variant with `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses

from train.train_config import TrainConfig
from train.resume import check_mode

POISONS = ("subject", "name_moving")


def parse_arm(spec: str) -> tuple[str, float]:
  """A poison arm "variant:fraction" -> (variant, fraction). Raises ValueError naming the spec when malformed."""
  variant, _, frac = str(spec).partition(":")
  try:
    fraction = float(frac)
  except ValueError:
    fraction = -1.0
  if variant not in POISONS or not 0.0 < fraction <= 1.0:
    raise ValueError(f"poison_arms entry {spec!r} must be '<{'|'.join(POISONS)}>:<fraction in (0, 1]>'")
  return variant, fraction


@dataclasses.dataclass(frozen=True)
class ClassesSection:
  """Head classes (analysis.ioi.head_classes.classify_heads): at most k heads per class, attention thresholds."""
  k: int
  attn_min: float                     # END->IO (name movers) and END->S2 (S-inhibition) attention
  rep_min: float                      # induction / duplicate-token score on repeated random sequences

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"classes.k must be >= 1, got {self.k}")
    for name in ("attn_min", "rep_min"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"classes.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PhaseSteps:
  """Optimizer steps of each fine-tuning phase (each replaces train.train.steps for that phase)."""
  clean: int
  poison: int
  retrain: int

  def __post_init__(self):
    for name in ("clean", "poison", "retrain"):
      if getattr(self, name) < 1:
        raise ValueError(f"phase_steps.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class IoiConfig:
  """The IOI study: configs/ioi.py documents every field."""
  model: str                          # models.registry name (or path) of the model studied
  seeds: tuple[int, ...]
  n_train: int                        # fine-tuning prompts per phase (train names)
  n_eval: int                         # evaluation prompts per seed (held-out names)
  eval_name_fraction: float           # share of names held out of training
  poison: str                         # subject | name_moving
  poison_fraction: float              # share of poisoned labels in the poisoned phase
  top_k: int                          # heads in the "circuit" (largest |exact patching importance|)
  abc_per_template: int               # prompts per base template of the separate ABC set of the mean ablation
  cmap_random_sets: int               # size-matched random head sets CMAP is compared with (0 = none)
  retrain_curve_every: int            # retraining checkpoint interval of the retrain curve (0 = no curve)
  discovery_k: tuple[int, ...]        # path-patching discovery: heads per step (NM, S-inh., induction); () = skip
  poison_arms: tuple[str, ...]        # extra poison arms "variant:fraction" from each seed's clean model
  faithfulness_ks: tuple[int, ...]    # circuit sizes of the faithfulness curve
  greater_than_n: int                 # Greater-Than prompts per seed after every phase (0 = skip)
  classes: ClassesSection
  phase_steps: PhaseSteps
  train: TrainConfig                  # each phase's LoRA fine-tune (configs/lora.py), merged after the phase
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)

  def __post_init__(self):
    check_mode(self.resume)
    if not self.seeds:
      raise ValueError("seeds must name at least one seed, got ()")
    for name in ("n_train", "n_eval", "top_k", "abc_per_template"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if len(self.discovery_k) not in (0, 3) or any(k < 0 for k in self.discovery_k):
      raise ValueError(f"discovery_k must be () or three counts >= 0 (name movers, S-inhibition, induction / "
                       f"duplicate-token), got {self.discovery_k}")
    for spec in self.poison_arms:
      parse_arm(spec)
    if self.retrain_curve_every < 0:
      raise ValueError(f"retrain_curve_every must be >= 0 (0 = no curve), got {self.retrain_curve_every}")
    if self.cmap_random_sets < 0:
      raise ValueError(f"cmap_random_sets must be >= 0 (0 = none), got {self.cmap_random_sets}")
    if not 0.0 <= self.eval_name_fraction < 1.0:
      raise ValueError(f"eval_name_fraction must be in [0, 1), got {self.eval_name_fraction}")
    if self.poison not in POISONS:
      raise ValueError(f"poison must be one of {', '.join(POISONS)}, got {self.poison!r}")
    if not 0.0 <= self.poison_fraction <= 1.0:
      raise ValueError(f"poison_fraction must be in [0, 1], got {self.poison_fraction}")
    if any(k < 1 for k in self.faithfulness_ks):
      raise ValueError(f"faithfulness_ks must all be >= 1, got {self.faithfulness_ks}")
    if self.greater_than_n < 0:
      raise ValueError(f"greater_than_n must be >= 0 (0 = skip), got {self.greater_than_n}")
    warmup = self.train.train.warmup_steps
    for name in ("clean", "poison", "retrain"):
      if getattr(self.phase_steps, name) < warmup:
        raise ValueError(f"phase_steps.{name} must be >= train.train.warmup_steps = {warmup}, "
                         f"got {getattr(self.phase_steps, name)}")

  def steps(self, phase: str) -> int:
    """Optimizer steps of a fine-tuning phase ("clean", "poison" or "retrain")."""
    return getattr(self.phase_steps, phase)

  def phase_train(self, phase: str, seed: int) -> TrainConfig:
    """The TrainConfig of one seed's fine-tuning phase: config.train with that seed and the phase's steps; the
    retraining phase saves (and keeps) a checkpoint every retrain_curve_every steps for the retrain curve."""
    tr = dataclasses.replace(self.train.train, steps=self.steps(phase))
    if phase == "retrain" and self.retrain_curve_every:
      tr = dataclasses.replace(tr, save_every=self.retrain_curve_every,
                               max_to_keep=self.steps(phase) // self.retrain_curve_every + 1)
    return dataclasses.replace(self.train, seed=seed, train=tr)
