"""The reversion study's typed, frozen configuration (configs/reversion.py converted once; train.typed_config).

configs/reversion.py holds the values and documents every field; this module holds the names, types and the
checks that stop a bad value before the model loads.
"""
from __future__ import annotations

import dataclasses
import math

from train.scan import ARMS
from train.train_config import TrainConfig
from train.resume import check_mode


@dataclasses.dataclass(frozen=True)
class ProbeSection:
  n: int                              # prompts of A the block / push / project objectives see
  position: str                       # last | mean (models.readout.mean_activation)

  def __post_init__(self):
    if self.n < 1:
      raise ValueError(f"probe.n must be >= 1, got {self.n}")
    if self.position not in ("last", "mean"):
      raise ValueError(f"probe.position must be 'last' or 'mean', got {self.position!r}")


@dataclasses.dataclass(frozen=True)
class SetsSection:
  A: int                              # harmful prompts for v_rev; the objectives use the first probe.n of them
  B: int                              # harmful prompts the alignment is measured on
  C: int                              # harmful prompts harmfulness is evaluated on
  c_benign: tuple[str, ...]           # over-refusal sets / .txt files added to C's benign prompts (not in S)
  measure_steps: tuple[int, ...]      # steps after which the alignment is measured (and the last); () = every step

  def __post_init__(self):
    for name in ("A", "B", "C"):
      if getattr(self, name) < 2:
        raise ValueError(f"sets.{name} must be >= 2, got {getattr(self, name)}")
    if any(t < 1 for t in self.measure_steps):
      raise ValueError(f"sets.measure_steps must be >= 1, got {self.measure_steps}")


@dataclasses.dataclass(frozen=True)
class BenignSection:
  sources: tuple[str, ...]            # refusal_benign | gsm8k_100 | jsonl
  jsonl: str
  max_len: int
  steps: int
  micro_batch: int
  lr: float
  warmup_steps: int
  clip_norm: float
  rank: int
  alpha: float
  targets: str
  eval_every: int                     # scan chunk length: harmfulness eval + checkpoint

  def __post_init__(self):
    if not (math.isfinite(self.lr) and 0.0 < self.lr <= 1.0):
      raise ValueError(f"benign.lr must be in (0, 1], got {self.lr}")
    for name in ("steps", "micro_batch", "rank", "eval_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"benign.{name} must be >= 1, got {getattr(self, name)}")
    if self.steps % self.eval_every:
      raise ValueError(f"benign.eval_every = {self.eval_every} must divide benign.steps = {self.steps}")
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"benign.warmup_steps must be in [0, benign.steps], got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
  generate: bool                      # greedy generation + refusal-phrase judge
  max_new_tokens: int                 # harmful prompts of C
  benign_new_tokens: int              # benign prompts of C (benign refusal)
  log_prob: bool                      # also the log-prob harmfulness and compliance margin at every evaluation
  batch: int
  judge_model: str = ""               # second refusal judge (train.judge.ModelJudge); "" = none
  judge_labels: str = ""              # hand-labelled responses (train.judge.read_labels); "" = none
  judge_arms: bool = False            # the second judge also reads every arm's final answers


@dataclasses.dataclass(frozen=True)
class NullSection:
  q: float                            # quantile of the nulls
  samples: int                        # isotropic null samples (beside its exact quantile)
  covariance_samples: int             # covariance-shaped null samples (metrics.covariance_null)

  def __post_init__(self):
    if not 0.0 < self.q < 1.0:
      raise ValueError(f"null.q must be in (0, 1), got {self.q}")


@dataclasses.dataclass(frozen=True)
class ReversionConfig:
  """configs/reversion.py documents every field."""
  model: str
  model_layers: int                   # > 0: keep only the first n decoder layers
  dtype: str
  seeds: tuple[int, ...]
  data_seed: int
  refusal_sets: tuple[str, ...]
  heldout: int
  system_prompt: str
  reference: str                      # early | refusal_reversed
  safety: TrainConfig
  safety_target_tokens: int
  safety_first_token_weight: float
  safety_harmful_weight: float
  safety_extra_benign: tuple[str, ...]
  sets: SetsSection
  probe: ProbeSection
  benign: BenignSection
  arms: tuple[str, ...]
  block_lam: float
  push_lam: float
  push_scale: float
  aux_layers: tuple[int, ...]
  eval: EvalSection
  null: NullSection
  progress: bool
  stop_after: int                     # -1 = run to the end
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)
  block_lams: tuple[float, ...] = ()  # the lambda sweep: one more block arm, "block_lam<value>", per value

  @property
  def all_arms(self) -> tuple[str, ...]:
    """`arms` plus one block arm per lambda of the sweep (`block_lam<lambda>`, e.g. "block_lam0.3")."""
    return tuple(self.arms) + tuple(f"block_lam{lam:g}" for lam in self.block_lams)

  def arm_kind(self, arm: str) -> tuple[str, float]:
    """(train.scan arm, lambda) of an arm name: the control arm runs the baseline's program; "block_lam<x>" is
    block with lambda x; block and push take block_lam / push_lam."""
    sweep = dict(zip(self.all_arms[len(self.arms):], self.block_lams))   # the configured value, not the name's
    if arm in sweep:
      return "block", sweep[arm]
    kind = "baseline" if arm == "control" else arm
    return kind, self.block_lam if kind == "block" else self.push_lam

  def __post_init__(self):
    check_mode(self.resume)
    if self.reference not in ("early", "refusal_reversed"):
      raise ValueError(f"reference must be 'early' or 'refusal_reversed', got {self.reference!r}")
    bad = [a for a in self.arms if a not in ARMS + ("control",)]
    if bad or not self.arms:
      raise ValueError(f"arms must be a non-empty subset of {ARMS + ('control',)}, got {self.arms}")
    if "control" in self.arms and ("baseline" not in self.arms or self.reference != "early"):
      raise ValueError("the control arm needs the baseline arm and reference 'early' (it is the baseline's null)")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
    if self.heldout < 1:
      raise ValueError(f"heldout must be >= 1, got {self.heldout}")
    if (any(not (math.isfinite(lam) and lam > 0) for lam in self.block_lams) or self.block_lam in self.block_lams
        or len(set(self.all_arms)) != len(self.all_arms)):
      raise ValueError(f"block_lams must be positive, finite, distinct in their arm names and differ from "
                       f"block_lam = {self.block_lam}, got {self.block_lams}")
    if self.probe.n > self.sets.A:
      raise ValueError(f"probe.n = {self.probe.n} > sets.A = {self.sets.A}: the objectives' prompts come from A")
