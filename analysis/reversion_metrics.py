"""Gravitational reversion measurements (Poppi & Lukas 2026, arXiv 2606.28525): v_rev, drift, alignment,
the isotropic null, and the block / push auxiliary objectives.

Notation (per layer boundary l, activations at one token position of a fixed probe-prompt set):
  v_rev(l)  = mean act(theta_early) - mean act(theta_aligned)           the reversion direction
  d_t(l)    = mean act(theta_t)     - mean act(theta_aligned)           the drift after t benign steps
  a_t(l)    = cos(d_t(l), v_rev(l))                                     the alignment
Under an isotropic null (d_t a uniformly random direction in R^D), cos with any fixed vector has the density
of 2 B - 1 with B ~ Beta((D-1)/2, (D-1)/2), so its p99 is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


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


def alignment(mean_t: jax.Array, mean_aligned: jax.Array, v_rev: jax.Array) -> jax.Array:
  """a_t(l) = cos(mean_t - mean_aligned, v_rev). mean_* `[..., L+1, D]`, v_rev `[L+1, D]` -> `[..., L+1]`."""
  return cosine(mean_t - mean_aligned, v_rev)


def null_cos_quantile(d: int, q: float = 0.99) -> float:
  """Exact q-quantile of cos(u, v) for u uniform on the sphere S^{d-1} and v fixed: 2 * Beta_q((d-1)/2) - 1."""
  a = (d - 1) / 2.0
  return float(2.0 * scipy.stats.beta.ppf(q, a, a) - 1.0)


def null_cos_samples(d: int, n: int, seed: int = 0) -> np.ndarray:
  """n samples of cos(u, e_1) with u uniform on S^{d-1} (normalised Gaussians), float64 `[n]`."""
  g = np.random.default_rng(seed).standard_normal((n, d))
  return g[:, 0] / np.linalg.norm(g, axis=1)


def spearman(x, y) -> tuple[float, float]:
  """Spearman rank correlation and its two-sided p-value (scipy.stats.spearmanr)."""
  r = scipy.stats.spearmanr(np.asarray(x).ravel(), np.asarray(y).ravel())
  return float(r.statistic), float(r.pvalue)


def projection_on_vrev(mean_t: jax.Array, mean_aligned: jax.Array, v_rev: jax.Array,
                       layer_weights: jax.Array | None = None) -> jax.Array:
  """sum_l w_l <d_t(l), v_rev(l) / ||v_rev(l)||>: signed motion along the reversion direction (scalar).

  mean_t / mean_aligned: `[L+1, D]` (mean_t differentiable w.r.t. the trained parameters); layer_weights
  `[L+1]` (default uniform mean).
  """
  u = v_rev / jnp.maximum(jnp.linalg.norm(v_rev, axis=-1, keepdims=True), 1e-12)
  proj = jnp.sum((mean_t - mean_aligned).astype(jnp.float32) * u, axis=-1)                 # [L+1]
  w = jnp.full(proj.shape, 1.0 / proj.shape[0]) if layer_weights is None else layer_weights
  return jnp.sum(w * proj)


def block_loss(mean_t, mean_aligned, v_rev, lam: float, layer_weights=None) -> jax.Array:
  """lam * relu(projection)^2: opposes positive motion along v_rev only (zero when lam = 0)."""
  p = projection_on_vrev(mean_t, mean_aligned, v_rev, layer_weights)
  return lam * jnp.square(jax.nn.relu(p))


def push_loss(mean_t, mean_aligned, v_rev, lam: float, scale: float = 1.0, layer_weights=None) -> jax.Array:
  """-lam * scale * tanh(projection / scale): rewards motion along v_rev, bounded (stabilised) by tanh."""
  p = projection_on_vrev(mean_t, mean_aligned, v_rev, layer_weights)
  return -lam * scale * jnp.tanh(p / scale)
