"""The typed, frozen configuration of a memory plan (configs/plan.py converted once; train.typed_config).

`python -m train.plan` converts the ConfigDict with `from_configdict(PlanConfig, ...)` at start-up and
`train.plan.make_plan` takes the PlanConfig. Values live in configs/plan.py (its presets); this module holds the
names and types. The value checks (mesh sizes, divisibility, dtypes, the memory budget) are make_plan's, which
raises train.plan.PlanError naming the field. Frozen: derive a variant with `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DimsSection:
  """models.config.ModelConfig fields overriding the model's; None keeps the model's (every one needed for
  model = "custom")."""
  arch: str | None = None
  vocab_size: int | None = None
  d_model: int | None = None
  n_layers: int | None = None
  n_heads: int | None = None
  n_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int | None = None
  tie_embeddings: bool | None = None
  qkv_bias: bool | None = None
  o_bias: bool | None = None
  qk_norm: bool | None = None


@dataclasses.dataclass(frozen=True)
class PlanLora:
  rank: int
  targets: str                        # mode full: which tensors train ("all" = every parameter)


@dataclasses.dataclass(frozen=True)
class PlanMesh:
  data: int
  fsdp: int
  tensor: int


@dataclasses.dataclass(frozen=True)
class PlanBatch:
  micro_batch: int                    # global sequences per micro-batch (split over data x fsdp)
  accum: int                          # gradient-accumulation steps (activations are per micro-batch)
  seq_len: int


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """A memory plan: configs/plan.py documents every field."""
  model: str                          # models.config.KNOWN_SHAPES name, registry name, HF dir / .gguf, or "custom"
  dims: DimsSection
  mode: str                           # lora | full
  dtype: str                          # frozen weights and activations
  param_dtype: str                    # trainables, gradients, AdamW moments
  lora: PlanLora
  mesh: PlanMesh
  batch: PlanBatch
  remat: bool
  memory_gib: float                   # device memory

  def dims_overrides(self) -> dict[str, object]:
    """The dims fields that are set, as ModelConfig keyword arguments."""
    return {f.name: getattr(self.dims, f.name) for f in dataclasses.fields(self.dims)
            if getattr(self.dims, f.name) is not None}
