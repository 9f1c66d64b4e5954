"""Seed-level statistics shared by the studies and the grid: t intervals (ddof = 1) and Welch's difference.

Every figure here is over independent runs (seeds, grid points), never over probes of one run; the probe-level
statistics (bootstrap, BH) live with the sweep in probes/.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.stats


def t_interval(x, level: float = 0.95) -> dict:
  """Mean over seeds with its t-based CI: {"mean", "sd" (ddof = 1), "n", "ci_low", "ci_high", "values"}.

  x: any array-like of floats. NaN entries (unmeasured) are dropped; with n < 2 the sd and CI are NaN (undefined:
  one seed has no spread). Interval: mean +/- t_{(1+level)/2, n-1} sd / sqrt(n) (scipy.stats.t).
  """
  v = np.asarray(x, np.float64).ravel()
  v = v[np.isfinite(v)]
  out = {"n": int(v.size), "values": v.tolist(), "mean": float(v.mean()) if v.size else float("nan"),
         "sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
  if v.size >= 2:
    sd = float(v.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.5 + level / 2, v.size - 1)) * sd / np.sqrt(v.size)
    out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
  return out


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
  """Difference of means a - b of two independent groups of runs, Welch's unequal-variance t-test.

  Returns {"diff", "ci_low", "ci_high", "p", "n_a", "n_b"}: scipy.stats.ttest_ind(equal_var=False) and its
  confidence_interval(level). NaN entries are dropped; the CI and p are NaN (undefined) when a group has fewer than
  2 runs or neither group has spread.
  """
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  a, b = a[np.isfinite(a)], b[np.isfinite(b)]
  diff = float(a.mean() - b.mean()) if a.size and b.size else float("nan")
  out = {"diff": diff, "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n_a": int(a.size),
         "n_b": int(b.size)}
  if a.size >= 2 and b.size >= 2 and (np.ptp(a) > 0 or np.ptp(b) > 0):
    r = scipy.stats.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(level)
    out.update(ci_low=float(ci.low), ci_high=float(ci.high), p=float(r.pvalue))
  return out


def bh_q(p: Sequence[float]) -> np.ndarray:
  """Benjamini-Hochberg q-values (scipy.stats.false_discovery_control, method "bh") of a family of p-values,
  float64 `[n]`; NaN p-values (undefined tests) stay NaN and are left out of the family."""
  p = np.asarray(p, np.float64).ravel()
  q = np.full(p.shape, np.nan)
  ok = np.isfinite(p)
  if ok.any():
    q[ok] = scipy.stats.false_discovery_control(p[ok], method="bh")
  return q
