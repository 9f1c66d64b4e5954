"""Gravitational reversion measurements (Poppi & Lukas 2026, arXiv 2606.28525): v_rev, drift, alignment,
and the isotropic null. The probe-set readouts (mean activation, cosine) are in models.readout and the block /
push auxiliary objectives in train.losses.

Notation (per layer boundary l, activations at one token position of a fixed probe-prompt set):
  v_rev(l)  = mean act(theta_early) - mean act(theta_aligned)           the reversion direction
  d_t(l)    = mean act(theta_t)     - mean act(theta_aligned)           the drift after t benign steps
  a_t(l)    = cos(d_t(l), v_rev(l))                                     the alignment
Under an isotropic null (d_t a uniformly random direction in R^D), cos with any fixed vector has the density
of 2 B - 1 with B ~ Beta((D-1)/2, (D-1)/2), so its p99 is exact.
"""
from __future__ import annotations

import jax
import numpy as np
import scipy.stats

from models.readout import cosine


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
