"""Readouts of the residual stream: mean activation over prompts at one position, and the cosine.

Shapes: a residual stream captured as "resid" is `[L+1, N, S, D]` (boundary 0 = embeddings, boundary l = the
output of decoder layer l), prompts left-padded so the last prompt token sits at position S-1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mean_activation(resid: jax.Array, mask: jax.Array, position: str = "last") -> jax.Array:
  """Mean residual activation over prompts at one position.

  Args:
    resid: `[L+1, N, S, D]` residual stream (capture "resid") of N left-padded prompts.
    mask: `[N, S]` 0/1. position: "last" (the last prompt token; rows are left-padded so it is S-1) or
      "mean" (mean over each prompt's real tokens, then over prompts).

  Returns:
    `[L+1, D]` float32.
  """
  r = resid.astype(jnp.float32)
  if position == "last":
    return jnp.mean(r[:, :, -1], axis=1)
  if position == "mean":
    m = mask.astype(jnp.float32)
    per_prompt = jnp.einsum("lnsd,ns->lnd", r, m) / jnp.sum(m, axis=1)[None, :, None]
    return jnp.mean(per_prompt, axis=1)
  raise ValueError(f"position must be 'last' or 'mean', got {position!r}")


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Cosine along the last axis, broadcasting leading axes; 0 where either vector is ~0."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
  return jnp.where((na > eps) & (nb > eps), jnp.sum(a * b, -1) / jnp.maximum(na * nb, eps), 0.0)
