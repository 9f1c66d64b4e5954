"""Flax NNX module around the pure forward pass: the public face of a model (load, forward, capture, generate).

`CausalLM` owns the stacked parameters as `nnx.Param`s; jitted code works on the pure pytree
(`model.pure_params()` / `nnx.split` at the jit boundary), and `nnx.merge` rebuilds the module. Its methods call
the same pure functions the studies vmap (models.transformer.forward_jit, models.generate.generate), so a result
obtained through the module equals the pure function's bit for bit.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import params as model_params
from models.config import ModelConfig
from models.loading import load
from models.generate import generate
from models.interventions import Interventions
from models.lora import adapt
from models.transformer import forward, forward_jit


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
    return cls(cfg, model_params.init_params(cfg, jax.random.key(seed), dtype))

  @classmethod
  def load(cls, model: str, *, dtype=jnp.float32, sharding_fn=None) -> "CausalLM":
    """Load real weights: a registry name, a Hugging Face directory or a .gguf file (models.loading.load)."""
    params, cfg = load(model, dtype=dtype, sharding_fn=sharding_fn)
    return cls(cfg, params)

  def pure_params(self) -> dict[str, Any]:
    """The parameter pytree (plain nested dict of arrays) that the pure functions take."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, tokens: jax.Array, **kwargs):
    """`forward(self.pure_params(), tokens, self.cfg, **kwargs)`: returns (logits, acts). Traceable (use it
    inside jit over `nnx.split` state); `capture` / `generate` below are the jitted conveniences."""
    return forward(self.pure_params(), tokens, self.cfg, **kwargs)

  def capture(self, tokens: jax.Array, attention_mask: jax.Array | None = None, sites=("resid",), *,
              interventions: Interventions | None = None, lora: dict | None = None,
              lora_scale: float = 1.0) -> dict[str, jax.Array]:
    """Activations at the named sites (models.interventions: "resid" `[L+1, B, S, D]`, "resid_post" `[L, B, S,
    D]`, "heads" `[L, B, S, H, hd]`, ...) of tokens `[B, S]` (left-padded, mask `[B, S]` 0/1), optionally under
    interventions and LoRA adapters. Jitted; no logits are computed."""
    params = adapt(self.pure_params(), lora, lora_scale)
    _, acts = forward_jit(params, tokens, self.cfg, attention_mask=attention_mask, capture=tuple(sites),
                          interventions=interventions, logits="none")
    return acts

  def generate(self, tokens: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
               eos_ids: tuple[int, ...] = (), pad_id: int = 0, interventions: Interventions | None = None,
               lora: dict | None = None, lora_scale: float = 1.0, **sampling) -> jax.Array:
    """`[B, max_new_tokens]` int32 new tokens after left-padded prompts (models.generate.generate: greedy unless
    `temperature` / `top_p` / `key` are given), optionally steered or with LoRA adapters."""
    return generate(adapt(self.pure_params(), lora, lora_scale), self.cfg, tokens, attention_mask,
                    max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=int(pad_id),
                    interventions=interventions, **sampling)
