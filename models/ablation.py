"""Directional ablation as weight orthogonalisation (Arditi et al. 2024, "Refusal in Language Models Is Mediated
by a Single Direction", its "weight orthogonalization": W_out <- W_out - r r^T W_out for every matrix writing to the
residual stream).

In gravlab's `[in, out]` layout a matrix writing to the residual maps to D columns, so W' = W (I - r r^T): the
token embeddings `[V, D]`, every layer's o_proj `wo` `[L, H*hd, D]` and its bias `bo` when present, and every
down_proj `w_down` `[L, F, D]`. Every write to the residual stream then has no component along r, so the model
equals the original with `models.interventions.ablate_direction(L, r)` (the activation intervention: r projected
out of every layer's resid_pre, resid_mid and resid_post at every position), up to float round-off.

Tied embeddings: the LM head reads the final RMSNorm's output, whose per-channel gain puts a component along r back,
so the LM head must keep the original matrix. `orthogonalize` unties them (cfg.tie_embeddings False, lm_head =
the original embeddings transposed); models.hf_io.save_hf then writes lm_head.weight and tie_word_embeddings false.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from models.config import ModelConfig
from models.lora import is_adapted


def orthogonalize(params: dict[str, Any], cfg: ModelConfig, direction) -> tuple[dict[str, Any], ModelConfig]:
  """(params', cfg') with `direction` `[D]` (normalised here) removed from every residual write (module docstring).

  params: models.params layout, plain arrays (merge a LoRA first: train.adapters.merge_lora). Returns new dicts; the
  input is not modified. Raises ValueError for a zero or wrongly shaped direction, or LoRA-adapted weights."""
  r = jnp.asarray(direction, jnp.float32).reshape(-1)
  if r.shape != (cfg.d_model,) or not float(jnp.linalg.norm(r)) > 0:
    raise ValueError(f"orthogonalize: direction must be a non-zero [{cfg.d_model}] vector, got shape {r.shape}")
  r = r / jnp.linalg.norm(r)
  layers = params["layers"]
  if is_adapted(layers):
    raise ValueError("orthogonalize: the layers hold LoRA adapters (LowRank); merge them first")

  def out(w):                                       # w [..., D] -> w (I - r r^T), in w's dtype
    w32 = w.astype(jnp.float32)
    return (w32 - (w32 @ r)[..., None] * r).astype(w.dtype)

  new_layers = {**layers, "wo": out(layers["wo"]), "w_down": out(layers["w_down"])}
  if "bo" in layers:
    new_layers["bo"] = out(layers["bo"])
  new = {**params, "layers": new_layers, "embed": out(params["embed"])}
  if cfg.tie_embeddings:
    new["lm_head"] = params["embed"].T
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
  return new, cfg
