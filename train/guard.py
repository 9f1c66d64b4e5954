"""Divergence beyond NaN: a guard that stops a run whose loss explodes or collapses to the uniform level.

The NaN guard (train.step's finite flag) catches a run that overflows. A run can also diverge with finite
numbers: a learning rate too large sends the loss far above where it started (gradient ascent with a negative
rate looks the same), or drives the logits to a flat distribution, where the cross-entropy sits at ln(vocab)
and the gradient vanishes. `DivergenceGuard` watches (loss, grad_norm) per step and raises
`TrainingDivergedError` when either pattern persists for `patience` consecutive steps:

  explode:   loss > loss_factor * reference, where reference = the loss of the run's first step
             (kept in the checkpoint metadata, so a resumed run keeps its reference);
  collapse:  grad_norm < grad_floor and loss >= uniform_frac * ln(vocab)   (SFT only: a cross-entropy).

While a streak is running the caller skips checkpoint saves (`suspect`); when the guard fires, the caller
discards the checkpoints from `streak_start` on (the state at that step is the first whose loss was out of
bounds), so the newest checkpoint left is the last good state, as with the NaN guard.
"""
from __future__ import annotations

import dataclasses
import math


class TrainingDivergedError(FloatingPointError):
  """Training produced a non-finite loss / gradient / update, or the divergence guard fired; the message names
  the step and the last good checkpoint."""


@dataclasses.dataclass
class DivergenceGuard:
  """State and thresholds of the guard (module docstring). loss_factor <= 0 disables the explode test;
  vocab = 0 (a non-cross-entropy objective such as LoRRA) disables the collapse test.

  Defaults: 4x the first loss (an SFT run that quadruples its loss for 10 steps in a row is not learning) and a
  gradient norm under 1e-6 at 90% of ln(vocab). Units: loss in nats / token, grad_norm the global L2 norm.
  """
  loss_factor: float = 4.0
  patience: int = 10
  grad_floor: float = 1e-6
  uniform_frac: float = 0.9
  vocab: int = 0
  reference: float | None = None
  streak: int = 0
  streak_start: int = -1

  def __post_init__(self):
    if self.patience < 1:
      raise ValueError(f"DivergenceGuard.patience must be >= 1, got {self.patience}")

  @property
  def suspect(self) -> bool:
    """True while a divergence streak is running (do not checkpoint this state)."""
    return self.streak > 0

  def update(self, step: int, loss: float, grad_norm: float) -> None:
    """Record one step's (loss, grad_norm). Raises TrainingDivergedError (without the checkpoint part of the
    message, which the caller adds) once a pattern has held for `patience` steps."""
    if self.reference is None:
      self.reference = float(loss)
    kind = ""
    if self.loss_factor > 0 and loss > self.loss_factor * max(self.reference, 1e-6):
      kind = (f"loss {loss:.4g} above {self.loss_factor:g} x the first step's {self.reference:.4g} "
              f"(config.train.diverge_factor)")
    elif self.vocab > 1 and grad_norm < self.grad_floor and loss >= self.uniform_frac * math.log(self.vocab):
      kind = (f"gradient norm {grad_norm:.2g} below {self.grad_floor:g} with the loss {loss:.4g} at the uniform "
              f"level ln({self.vocab}) = {math.log(self.vocab):.4g}")
    self.streak = self.streak + 1 if kind else 0
    if self.streak == 1:
      self.streak_start = step
    if self.streak >= self.patience:
      raise TrainingDivergedError(f"step {step}: {kind} for {self.streak} steps in a row (divergence guard, "
                                  f"config.train.diverge_patience); stopped")
