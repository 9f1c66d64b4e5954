"""Gravitational reversion measurements (Poppi & Lukas 2026, arXiv 2606.28525): v_rev, drift, alignment, the
isotropic and covariance-shaped nulls, and the seed-level statistics (t intervals, permutation tests, the partial
correlation of alignment with harmfulness). The probe-set readouts (mean activation, cosine) are in
models.readout and the block / push auxiliary objectives in train.losses.

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

from analysis.stats import t_interval  # noqa: F401  (re-exported: the studies' seed statistics)
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


def paired_difference(a, b, level: float = 0.95) -> dict:
  """Per-seed paired difference a - b (runs that share data order and initialisation): t_interval of the
  differences plus the paired t-test's two-sided p (scipy.stats.ttest_1samp against 0; NaN, undefined, with fewer
  than 2 pairs or no spread)."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  d = (a - b)[np.isfinite(a - b)]
  out = t_interval(d, level)
  out["p"] = float(scipy.stats.ttest_1samp(d, 0.0).pvalue) if d.size >= 2 and np.ptp(d) > 0 else float("nan")
  return out


def covariance_null(acts: np.ndarray, v_rev: np.ndarray, n: int, q: float = 0.99, seed: int = 0) -> dict:
  """Empirical null of the alignment for covariance-shaped random drifts.

  Per layer l, u_l = X_l^T z / sqrt(P - 1) with X_l the centred activations `acts[l]` `[P, D]` (set B under
  theta_aligned) and z ~ N(0, I_P): u_l ~ N(0, Sigma_l), the residual stream's own (sample) covariance, drawn
  independently per layer. A drift of that shape has a larger |cos| with a direction in the high-variance subspace
  than an isotropic one, which is what a CAA-like v_rev is (docs: issue 18).

  Args:
    acts: `[L, P, D]` float activations (decoder-layer outputs). v_rev: `[L, D]`. n: samples. q: quantile.
  Returns:
    {"layer_p99": `[L]` q-quantile of cos(u_l, v_rev(l)) (NaN where v_rev(l) = 0: undefined), "all_p99": of the
    cosine over the concatenation, "samples_all": `[n]` those cosines, "n": n, "q": q}.
  """
  acts = np.asarray(acts, np.float64)
  v = np.asarray(v_rev, np.float64)
  x = acts - acts.mean(axis=1, keepdims=True)
  rng = np.random.default_rng(seed)
  L, P, _ = x.shape
  vn = np.linalg.norm(v, axis=-1)
  cos_l, cos_all = [], []
  for start in range(0, n, 500):                                        # [500, L, D] at a time
    z = rng.standard_normal((min(500, n - start), L, P))
    u = np.einsum("lpd,nlp->nld", x, z) / np.sqrt(max(P - 1, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
      cos_l.append(np.einsum("nld,ld->nl", u, v) / (np.linalg.norm(u, axis=-1) * vn))
      cos_all.append(np.einsum("nld,ld->n", u, v) / (np.linalg.norm(u.reshape(len(z), -1), axis=-1)
                                                     * np.linalg.norm(v)))
  cos_l, cos_all = np.concatenate(cos_l), np.concatenate(cos_all)
  layer = np.where(vn > 0, np.quantile(np.nan_to_num(cos_l), q, axis=0), np.nan)
  return {"layer_p99": layer, "all_p99": float(np.quantile(cos_all, q)), "samples_all": cos_all, "n": int(n),
          "q": float(q)}


def seed_permutation(a, b, n_resamples: int = 9999, seed: int = 0) -> dict:
  """Two-sided permutation test of mean(a) - mean(b) over seeds (independent runs; scipy.stats.permutation_test,
  exact when the partitions are few): {"diff", "p", "n_a", "n_b"}; p NaN (undefined) when either side has fewer
  than 2 finite values or both are constant and equal."""
  a = np.asarray(a, np.float64)[np.isfinite(a)]
  b = np.asarray(b, np.float64)[np.isfinite(b)]
  out = {"diff": float(a.mean() - b.mean()) if a.size and b.size else float("nan"), "p": float("nan"),
         "n_a": int(a.size), "n_b": int(b.size)}
  if a.size >= 2 and b.size >= 2 and np.ptp(np.concatenate([a, b])) > 0:
    r = scipy.stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), n_resamples=n_resamples,
                                     alternative="two-sided", random_state=seed)
    out["p"] = float(r.pvalue)
  return out


def partial_correlation(x, y, n_perm: int = 9999, seed: int = 0) -> dict:
  """Association of x and y controlling for the cell they were measured in (arm and step): x, y `[cells, seeds]`;
  each is centred within its cell (removing every arm / step effect), and r = Pearson of the residuals over all
  (cell, seed) entries. p: permutation of y's seeds within each cell (the seed is the unit). Returns {"r", "p",
  "n_seeds", "n_cells", "reason"}; r and p NaN with the reason when a residual has no spread (degenerate)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.all(np.isfinite(x) & np.isfinite(y), axis=1)
  x, y = x[keep], y[keep]
  out = {"r": float("nan"), "p": float("nan"), "n_cells": int(x.shape[0]), "n_seeds": int(x.shape[1]),
         "reason": ""}
  rx, ry = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
  if x.shape[1] < 3 or rx.std() == 0 or ry.std() == 0:
    out["reason"] = "undefined: fewer than 3 seeds, or no seed-to-seed spread within a cell"
    return out
  r = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
  out["r"] = r(rx, ry)
  rng = np.random.default_rng(seed)
  null = np.array([r(rx, np.take_along_axis(ry, rng.permuted(np.tile(np.arange(ry.shape[1]), (ry.shape[0], 1)),
                                                               axis=1), 1)) for _ in range(n_perm)])
  out["p"] = float((1 + np.sum(np.abs(null) >= abs(out["r"]))) / (n_perm + 1))
  return out


def split_half(diffs, n_splits: int = 200, seed: int = 0) -> dict:
  """Split-half reliability of v_rev (issue 18's ceiling for the alignment): the per-prompt differences
  `diffs` `[L+1, P, D]` (act(theta_early) - act(theta_aligned) at each prompt of set A; their mean over P is v_rev)
  are split at random into two halves of P // 2 prompts, and the cosine between the two half-means is taken over
  the decoder layers 1..L concatenated and per layer; repeated `n_splits` times.

  Returns {"all": mean cosine, "all_range": [2.5%, 97.5%] over splits, "layer": `[L+1]` mean per layer (NaN where
  the differences are all 0: undefined), "splits", "prompts"}. With P < 2 everything is NaN (undefined)."""
  x = np.asarray(diffs, np.float64)
  L1, P, _ = x.shape
  out = {"all": float("nan"), "all_range": [float("nan")] * 2, "layer": np.full(L1, np.nan), "splits": int(n_splits),
         "prompts": int(P)}
  if P < 2:
    return out
  rng = np.random.default_rng(seed)
  h = P // 2
  c_all, c_l = [], []
  for _ in range(n_splits):
    perm = rng.permutation(P)
    a, b = x[:, perm[:h]].mean(1), x[:, perm[h:2 * h]].mean(1)                    # [L+1, D]
    with np.errstate(invalid="ignore", divide="ignore"):
      c_l.append(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
      c_all.append(float(np.sum(a[1:] * b[1:]) / (np.linalg.norm(a[1:]) * np.linalg.norm(b[1:]))))
  defined = np.any(x != 0, axis=(1, 2))
  out["layer"][defined] = np.array(c_l)[:, defined].mean(0)
  out.update(all=float(np.mean(c_all)), all_range=np.quantile(c_all, [0.025, 0.975]).tolist())
  return out
