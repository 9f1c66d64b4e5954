"""Rank statistics and calibration in JAX (jit- and vmap-safe), the definitions rho-eval uses.

- `rankdata`: average ranks with ties (scipy.stats.rankdata(method="average")).
- `spearman`: Spearman rho = Pearson correlation of average ranks (scipy.stats.spearmanr; rho-eval
  `behaviors.factual.FactualBehavior.evaluate` calls `spearmanr(true_confs, false_confs)`).
- `mann_whitney_auc`: P(pos > neg) + 0.5 P(pos == neg) over all pairs (rho-eval `behaviors.metrics.mann_whitney_auc`;
  equals U / (n_pos n_neg) of scipy.stats.mannwhitneyu).
- `ece`: expected calibration error with equal-width bins (rho-eval `behaviors.metrics.compute_ece`, Guo et al.
  2017).

Every function takes an optional `valid` mask so padded items can ride along in fixed-shape batches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rankdata(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Average ranks (1-based) of `[n]` float values among the valid ones; ties share their mean rank.

  O(n^2) pairwise comparison (n is a probe count, at most a few hundred). Invalid entries get rank 0.
  Matches scipy.stats.rankdata(x[valid], method="average").
  """
  valid = jnp.ones(x.shape, bool) if valid is None else valid.astype(bool)
  vv = valid[None, :]
  less = jnp.sum((x[None, :] < x[:, None]) & vv, axis=1)
  equal = jnp.sum((x[None, :] == x[:, None]) & vv, axis=1)
  return jnp.where(valid, less + (equal + 1) / 2.0, 0.0)


def pearson(x: jax.Array, y: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Pearson correlation of `[n]` x and y over valid entries; 0.0 when either is constant (undefined)."""
  valid = jnp.ones(x.shape, bool) if valid is None else valid.astype(bool)
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  xc = (x - jnp.sum(w * x) / n) * w
  yc = (y - jnp.sum(w * y) / n) * w
  den = jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc))
  return jnp.where(den > 0, jnp.sum(xc * yc) / jnp.where(den > 0, den, 1.0), 0.0)


def spearman(x: jax.Array, y: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Spearman rank correlation of paired `[n]` samples (float32 scalar in [-1, 1]).

  Equals scipy.stats.spearmanr(x, y).statistic; where scipy returns NaN (a constant input) this returns 0.0,
  rho-eval's fallback value for an undefined rho.
  """
  return pearson(rankdata(x, valid), rankdata(y, valid), valid)


def mann_whitney_auc(scores: jax.Array, positive: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """ROC AUC of `[n]` scores for the binary labels `positive` `[n]` (bool), via the Mann-Whitney U statistic.

  AUC = (#{(p, q): s_p > s_q} + 0.5 #{(p, q): s_p == s_q}) / (n_pos n_neg) over positive p and negative q;
  0.5 when a class is empty (rho-eval's convention). Matches rho-eval `mann_whitney_auc(positives, negatives)`
  and U / (n_pos n_neg) of scipy.stats.mannwhitneyu(pos, neg).
  """
  valid = jnp.ones(scores.shape, bool) if valid is None else valid.astype(bool)
  pos = positive.astype(bool) & valid
  neg = ~positive.astype(bool) & valid
  gt = (scores[:, None] > scores[None, :]).astype(jnp.float32)
  eq = (scores[:, None] == scores[None, :]).astype(jnp.float32)
  pair = (pos[:, None] & neg[None, :]).astype(jnp.float32)
  total = pair.sum()
  return jnp.where(total > 0, jnp.sum(pair * (gt + 0.5 * eq)) / jnp.maximum(total, 1.0), 0.5)


def ece(confidence: jax.Array, correct: jax.Array, n_bins: int = 10, valid: jax.Array | None = None) -> jax.Array:
  """Expected calibration error: sum_b (n_b / n) |acc_b - conf_b| over `n_bins` equal-width bins of [0, 1].

  confidence `[n]` in [0, 1] (for a binary classifier, the probability of the predicted class), correct `[n]`
  0/1. Bins are [lo, hi) except the last, [lo, 1], as rho-eval `compute_ece`.
  """
  valid = jnp.ones(confidence.shape, bool) if valid is None else valid.astype(bool)
  w = valid.astype(jnp.float32)
  b = jnp.clip(jnp.floor(confidence * n_bins).astype(jnp.int32), 0, n_bins - 1)
  onehot = jax.nn.one_hot(b, n_bins) * w[:, None]                          # [n, bins]
  conf_sum = onehot.T @ confidence
  acc_sum = onehot.T @ correct.astype(jnp.float32)
  return jnp.sum(jnp.abs(acc_sum - conf_sum)) / jnp.maximum(w.sum(), 1.0)
