"""The typed, frozen configuration of a fine-tuning run (configs/lora.py converted once; train.typed_config).

`train.loop.train_loop`, `trainables` and `train_mesh` take a `TrainConfig`; the studies that fine-tune
(reversion's safety phase, IOI's phases, avoid-the-red) nest one. Values live in configs/lora.py (its presets);
this module holds the names, types and the checks that stop a bad value before any step runs.
"""
from __future__ import annotations

import dataclasses
import math
from train.resume import check_mode


@dataclasses.dataclass(frozen=True)
class LoraSection:
  """Which weights are adapted (train.adapters.LoraSpec.create)."""
  rank: int
  alpha: float
  rslora: bool
  targets: str                        # short names, our names, "all", or regexes (comma-separated)
  layers: tuple[int, ...]             # (lo, hi) inclusive decoder-layer range; () = all layers
  depth: tuple[float, ...]            # (f_lo, f_hi) depth window as fractions; exclusive with layers
  complement: bool                    # adapt the layers OUTSIDE the window instead

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    if len(self.layers) not in (0, 2) or len(self.depth) not in (0, 2):
      raise ValueError(f"lora.layers / lora.depth must be () or (lo, hi), got {self.layers} / {self.depth}")


@dataclasses.dataclass(frozen=True)
class DataSection:
  """The SFT data (train.data)."""
  source: str                         # refusal | jsonl
  path: str
  refusal_sets: tuple[str, ...]
  heldout: int
  refusal_text: str
  include_benign: bool
  benign_repeat: int
  max_len: int
  system_prompt: str                  # "" = the chat template's default system prompt

  def __post_init__(self):
    if self.source not in ("refusal", "jsonl"):
      raise ValueError(f"data.source must be 'refusal' or 'jsonl', got {self.source!r}")
    if self.max_len < 2:
      raise ValueError(f"data.max_len must be >= 2, got {self.max_len}")


@dataclasses.dataclass(frozen=True)
class LorraSection:
  """LoRRA's representation objective (Zou et al. 2023), used when objective = "lorra"."""
  layers: tuple[int, ...]
  alpha: float
  reading_vector: str                 # mean_diff | path.npy [L, D]
  retain_weight: float
  positions: str                      # all | response


@dataclasses.dataclass(frozen=True)
class OptimSection:
  """Optimizer, schedule, checkpointing, mesh and multi-host settings (the config's `train` section)."""
  steps: int
  micro_batch: int
  accum: int
  lr: float
  warmup_steps: int
  end_lr_frac: float
  weight_decay: float
  clip_norm: float
  save_every: int
  max_to_keep: int
  stop_after: int                     # -1 = run to the end
  log_every: int
  fsdp: int
  tensor: int
  distributed: bool
  coordinator_address: str
  num_processes: int
  process_id: int
  remat: bool
  checkpoint_dir: str
  progress: bool
  diverge_factor: float = 4.0         # divergence guard (train.guard): loss above this x the first step's ...
  diverge_patience: int = 10          # ... (or a vanished gradient at ln(vocab)) for this many steps stops the run

  def __post_init__(self):
    if not (math.isfinite(self.lr) and 0.0 < self.lr <= 1.0):
      raise ValueError(f"train.lr must be in (0, 1], got {self.lr}")
    for name in ("steps", "micro_batch", "accum", "fsdp", "tensor", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"train.warmup_steps must be in [0, train.steps = {self.steps}], got {self.warmup_steps}")
    if not 0.0 <= self.end_lr_frac <= 1.0:
      raise ValueError(f"train.end_lr_frac must be in [0, 1], got {self.end_lr_frac}")
    if self.diverge_patience < 1 or not math.isfinite(self.diverge_factor):
      raise ValueError(f"train.diverge_patience must be >= 1 and train.diverge_factor finite (<= 0 disables), got "
                       f"{self.diverge_patience} / {self.diverge_factor}")


@dataclasses.dataclass(frozen=True)
class ExportSection:
  peft: bool                          # workdir/adapter: adapter_config.json + adapter_model.safetensors
  merged: bool                        # workdir/merged: HF safetensors with the LoRA folded in


@dataclasses.dataclass(frozen=True)
class EvalSection:
  refusal: bool                       # greedy refusal rate on held-out prompts, before and after
  max_new_tokens: int
  batch: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A fine-tuning run: configs/lora.py documents every field."""
  model: str
  seed: int
  dtype: str                          # float32 | bfloat16: activations and frozen weights
  param_dtype: str                    # dtype of the trainable master weights
  mode: str                           # lora | full
  objective: str                      # sft | lorra
  lora: LoraSection
  data: DataSection
  lorra: LorraSection
  train: OptimSection
  export: ExportSection
  eval: EvalSection
  resume: str = "check"               # check | force: resuming needs the saved config (train.resume)

  def __post_init__(self):
    check_mode(self.resume)
    if self.mode not in ("lora", "full"):
      raise ValueError(f"mode must be 'lora' or 'full', got {self.mode!r}")
    if self.objective not in ("sft", "lorra"):
      raise ValueError(f"objective must be 'sft' or 'lorra', got {self.objective!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
