"""Kill zones as a calibrated test on per-probe scores: the exact steered scores of the behavior vector and K
control directions per cell (layer x alpha), a per-cell p-value from the controls, Benjamini-Hochberg across the
grid, and zones that need significance, size and a dose-response.

Per cell (behavior t, layer l, alpha a), with N probes, base scores b `[N]`, the behavior vector's steered scores
s `[N]` and K controls' c `[K, N]` (same norm, probes.controls):

- delta = mean_i (s_i - b_i), with a paired bootstrap 95% CI over probes (scipy.stats.bootstrap, BCa);
- the controls' deltas d_k = mean_i (c_ki - b_i); under the null the behavior vector is one more direction of
  the controls' kind, so delta is a new draw from their distribution: p = the two-sided prediction-interval
  p-value, t = (delta - mean d) / (sd d * sqrt(1 + 1/K)) with K - 1 degrees of freedom (undefined, NaN, for K < 2
  or sd = 0: nothing can then be called significant), and the rank p-value 2 min(#{d <= delta} + 1,
  #{d >= delta} + 1) / (K + 1), exact under exchangeability;
- q = Benjamini-Hochberg over every cell with a defined p (scipy.stats.false_discovery_control);
- a cell is killed when q < q_level, delta <= -threshold (a practical size, in score units) and the drop holds at
  the next smaller |alpha| of the same sign (dose-response; at the smallest |alpha| of the grid, the first-order
  screen's slope at alpha = 0 stands for it when given, else the cell cannot pass);
- a kill zone is a maximal run of consecutive swept layers killed at one (behavior, alpha).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats


def cell_p_values(delta: np.ndarray, ctrl: np.ndarray) -> dict[str, np.ndarray]:
  """Prediction-interval and rank p-values of deltas `[...]` against control deltas `[..., K]` (module
  docstring); float64 arrays `[...]`: "ctrl_mean", "ctrl_sd" (ddof = 1), "t", "p" (NaN where undefined),
  "p_rank"."""
  delta, ctrl = np.asarray(delta, np.float64), np.asarray(ctrl, np.float64)
  K = ctrl.shape[-1]
  mu = ctrl.mean(-1)
  sd = ctrl.std(-1, ddof=1) if K > 1 else np.zeros_like(mu)
  with np.errstate(divide="ignore", invalid="ignore"):
    t = np.where(sd > 0, (delta - mu) / (sd * np.sqrt(1.0 + 1.0 / max(K, 1))), np.nan)
  p = np.where(np.isfinite(t), 2.0 * stats.t.sf(np.abs(t), max(K - 1, 1)), np.nan)
  lo = (ctrl <= delta[..., None]).sum(-1) + 1
  hi = (ctrl >= delta[..., None]).sum(-1) + 1
  return {"ctrl_mean": mu, "ctrl_sd": sd, "t": t, "p": p,
          "p_rank": np.minimum(1.0, 2.0 * np.minimum(lo, hi) / (K + 1.0))}


def paired_ci(diff: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
  """Bootstrap CI of mean(diff) over probes (scipy.stats.bootstrap, BCa; diff `[N]` per-probe steered - base).
  A constant diff gives (value, value); n_boot = 0 gives (NaN, NaN)."""
  diff = np.asarray(diff, np.float64)
  if n_boot <= 0:
    return float("nan"), float("nan")
  if np.ptp(diff) == 0:
    return float(diff[0]), float(diff[0])
  r = stats.bootstrap((diff,), np.mean, n_resamples=n_boot, confidence_level=confidence, method="BCa",
                      random_state=np.random.default_rng(seed))
  return float(r.confidence_interval.low), float(r.confidence_interval.high)


def _dose_ok(delta: np.ndarray, alphas: Sequence[float], slope0: np.ndarray | None = None) -> np.ndarray:
  """`[..., A]` bool: delta < 0 at the next smaller |alpha| of the same sign. Where the grid has none, the
  first-order slope d score / d alpha at alpha = 0 (`slope0` `[...]`, probes.screen) stands for it: alpha *
  slope0 < 0; without slope0 such a cell fails."""
  a = np.asarray(alphas, np.float64)
  ok = np.zeros(delta.shape, bool)
  for j, aj in enumerate(a):
    smaller = [k for k in range(len(a)) if np.sign(a[k]) == np.sign(aj) and abs(a[k]) < abs(aj)]
    if smaller:
      k = max(smaller, key=lambda k: abs(a[k]))
      ok[..., j] = delta[..., k] < 0
    elif slope0 is not None:
      ok[..., j] = aj * np.asarray(slope0) < 0
  return ok


def kill_zone_test(base: Sequence[np.ndarray], steered: Sequence[np.ndarray], ctrl: Sequence[np.ndarray],
              behaviors: Sequence[str], layers: Sequence[int], alphas: Sequence[float], *, threshold: float,
              q_level: float = 0.05, n_boot: int = 2000, seed: int = 0,
              slope0: Sequence[np.ndarray] | None = None) -> dict:
  """The calibrated kill-zone test over a grid (module docstring).

  Args:
    base: per behavior `[N_t]` unsteered per-probe scores. steered: per behavior `[L', A, N_t]` under the
      behavior vector. ctrl: per behavior `[L', A, K, N_t]` under K controls of the same norm.
    behaviors, layers, alphas: the grid's names, swept layer indices and coefficients.
    threshold: the practical size a drop must reach (score units). n_boot: bootstrap resamples of each cell's
      CI (0: no CIs, e.g. in calibration simulations).
    slope0: optional per behavior `[L']` first-order slopes at alpha = 0 (probes.screen), the dose-response
      reference of the smallest |alpha| of each sign (`_dose_ok`).
  Returns:
    dict of float64 `[T, L', A]` arrays "delta", "ci_low", "ci_high", "ctrl_mean", "ctrl_sd", "t", "p",
    "p_rank", "q" (NaN where p is undefined), bool "significant", "dose_response", "killed"; "n_probes" `[T]`,
    "n_controls" K; "kill_zones": list of {behavior, alpha, layers, min_delta, max_q}.
  Raises ValueError when the arrays' shapes disagree.
  """
  T, Lp, A = len(behaviors), len(layers), len(alphas)
  out = {k: np.full((T, Lp, A), np.nan) for k in ("delta", "ci_low", "ci_high", "ctrl_mean", "ctrl_sd", "t", "p",
                                                  "p_rank")}
  K = None
  for t in range(T):
    b, s, c = (np.asarray(x, np.float64) for x in (base[t], steered[t], ctrl[t]))
    if s.shape != (Lp, A) + b.shape or c.shape[:2] != (Lp, A) or c.shape[3:] != b.shape:
      raise ValueError(f"behavior {behaviors[t]!r}: base {b.shape}, steered {s.shape}, ctrl {c.shape} disagree")
    K = c.shape[2]
    out["delta"][t] = (s - b).mean(-1)
    pv = cell_p_values(out["delta"][t], (c - b).mean(-1))
    for k, v in pv.items():
      out[k][t] = v
    for i in range(Lp):
      for j in range(A):
        out["ci_low"][t, i, j], out["ci_high"][t, i, j] = paired_ci(s[i, j] - b, n_boot, seed + 7919 * (t * Lp + i)
                                                                    + j)
  q = np.full(out["p"].shape, np.nan)
  defined = np.isfinite(out["p"])
  if defined.any():
    q[defined] = stats.false_discovery_control(out["p"][defined], method="bh")
  significant = np.where(defined, q, 1.0) < q_level
  dose = _dose_ok(out["delta"], alphas, None if slope0 is None else
                  np.stack([np.asarray(x, np.float64) for x in slope0]))
  killed = significant & (out["delta"] <= -threshold) & dose
  return {**out, "q": q, "significant": significant, "dose_response": dose, "killed": killed,
          "n_probes": np.asarray([len(np.asarray(x)) for x in base]), "n_controls": K,
          "kill_zones": _zones(killed, out["delta"], q, behaviors, layers, alphas)}


def _zones(killed, delta, q, behaviors, layers, alphas) -> list[dict]:
  """Maximal runs of consecutive swept layers killed at one (behavior, alpha): {behavior, alpha, layers, min_delta,
  worst_layer (its layer), max_q} (analysis.avoid_red reads them)."""
  zones = []
  for t, name in enumerate(behaviors):
    for j, alpha in enumerate(alphas):
      run: list[int] = []
      for i in range(len(layers) + 1):
        if i < len(layers) and killed[t, i, j] and (not run or layers[i] == layers[run[-1]] + 1):
          run.append(i)
          continue
        if run:
          worst = run[int(np.argmin(delta[t, run, j]))]
          zones.append({"behavior": name, "alpha": float(alpha), "layers": [int(layers[k]) for k in run],
                        "min_delta": float(delta[t, run, j].min()), "worst_layer": int(layers[worst]),
                        "max_q": float(q[t, run, j].max())})
        run = [i] if i < len(layers) and killed[t, i, j] else []
  return zones
