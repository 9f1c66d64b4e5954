"""Flax NNX module around the pure forward pass.

`CausalLM` owns the stacked parameters as `nnx.Param`s; jitted code works on the pure pytree
(`model.pure_params()` / `nnx.split`), and `nnx.merge` / `CausalLM.from_params` rebuild the module.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import params as P
from models.config import ModelConfig
from models.loading import load
from models.transformer import forward


class StackedLayers(nnx.Module):
  """All decoder layers' weights, each an `nnx.Param` with a leading `[L]` layer axis (models.params layout)."""

  def __init__(self, layer_params: dict[str, jax.Array]):
    for name, value in layer_params.items():
      setattr(self, name, nnx.Param(value))


class CausalLM(nnx.Module):
  """Llama / Qwen2 / Qwen3 causal LM with depth as an array axis.

  Attributes:
    cfg: ModelConfig (static).
    embed `[V, D]`, final_norm `[D]`, lm_head `[D, V]` (untied only), layers: StackedLayers.
  """

  def __init__(self, cfg: ModelConfig, params: dict[str, Any]):
    self.cfg = cfg
    self.embed = nnx.Param(params["embed"])
    self.final_norm = nnx.Param(params["final_norm"])
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(params["lm_head"])
    self.layers = StackedLayers(params["layers"])

  @classmethod
  def random(cls, cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> "CausalLM":
    """A randomly initialised model (models.params.init_params)."""
    return cls(cfg, P.init_params(cfg, jax.random.key(seed), dtype))

  @classmethod
  def load(cls, model: str, *, dtype=jnp.float32, sharding_fn=None) -> "CausalLM":
    """Load real weights: a registry name, a Hugging Face directory or a .gguf file (models.loading.load)."""
    params, cfg = load(model, dtype=dtype, sharding_fn=sharding_fn)
    return cls(cfg, params)

  def pure_params(self) -> dict[str, Any]:
    """The parameter pytree (plain nested dict of arrays) that the pure functions take."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, tokens: jax.Array, **kwargs):
    """`forward(self.pure_params(), tokens, self.cfg, **kwargs)`: returns (logits, acts)."""
    return forward(self.pure_params(), tokens, self.cfg, **kwargs)
