"""Kill zones of a steering sweep: deltas against the baseline, the norm-matched random-direction control band,
z-scores, and maximal runs of consecutive layers whose score the behavior vector drops below the band.

Input: the `[L', A, 1+K, T]` scores of probes.steering.steering_sweep (direction 0 = the behavior vector,
1..K = random directions rescaled to its norm).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def control_band(delta: np.ndarray, ctrl: np.ndarray, *, band_z: float = 2.0,
                 std_floor: float = 0.02) -> dict[str, np.ndarray]:
  """The random-direction control of steering deltas.

  Args:
    delta: `[...]` behavior-vector deltas (steered - baseline). ctrl: `[..., K]` the same cells' deltas under K
      norm-matched random directions.
    band_z, std_floor: see `analyze`.
  Returns:
    dict of float64 arrays `[...]`: "ctrl_mean", "ctrl_std" (ddof=1, floored at std_floor; the floor alone for
    K < 2), "band_lo" / "band_hi" = ctrl_mean -/+ band_z * ctrl_std widened to contain every control delta,
    "z" = (delta - ctrl_mean) / ctrl_std, "outside" (bool: delta outside the band).
  """
  delta = np.asarray(delta, np.float64)
  ctrl = np.asarray(ctrl, np.float64)
  K = ctrl.shape[-1]
  ctrl_mean = ctrl.mean(-1) if K else np.zeros_like(delta)
  ctrl_std = np.maximum(ctrl.std(-1, ddof=1) if K > 1 else np.zeros_like(delta), std_floor)
  band_lo = np.minimum(ctrl_mean - band_z * ctrl_std, ctrl.min(-1) if K else 0.0)
  band_hi = np.maximum(ctrl_mean + band_z * ctrl_std, ctrl.max(-1) if K else 0.0)
  z = (delta - ctrl_mean) / ctrl_std
  return {"ctrl_mean": ctrl_mean, "ctrl_std": ctrl_std, "band_lo": band_lo, "band_hi": band_hi, "z": z,
          "outside": (delta < band_lo) | (delta > band_hi)}


def analyze(baseline: np.ndarray, scores: np.ndarray, behaviors: Sequence[str], layers: Sequence[int],
            n_layers: int, alphas: Sequence[float], *, threshold: float = 0.1, band_z: float = 2.0,
            std_floor: float = 0.02) -> dict[str, Any]:
  """Deltas against baseline, the random-direction control band, z-scores and kill zones.

  Args:
    baseline: `[T]` unsteered scores. scores: `[L', A, 1+K, T]` from `steering_sweep` (direction 0 = behavior
      vector, 1..K = norm-matched random directions).
    behaviors: T names. layers: L' swept layer indices. n_layers: model depth. alphas: A coefficients.
    threshold: a kill-zone layer drops the score by at least this much (score units).
    band_z: the control band is ctrl_mean +/- band_z * ctrl_std, widened to contain every control delta.
    std_floor: lower bound of ctrl_std (random-direction deltas of rate scores are often exactly 0 for small K).
  Returns:
    dict of numpy arrays, all `[T, L', A]` unless noted: "delta" (steered - baseline), "ctrl_delta"
    `[T, L', A, K]`, "ctrl_mean", "ctrl_std" (ddof=1, floored), "band_lo", "band_hi", "z" = (delta - ctrl_mean) /
    ctrl_std, "outside" (delta outside the band), "killed" (delta <= -threshold and below the band), "depth_pct"
    `[L']` = 100 * layer / n_layers (rho-eval's depth convention: layer index / number of layers); and
    "kill_zones": list of dicts for maximal runs of consecutive swept layers that are all killed, at one alpha:
    {behavior, alpha, layers, depth_start, depth_end, min_delta, min_z, band_lo (lowest band edge in the run),
    and the run's worst cell (lowest delta): worst_layer, worst_depth, worst_z, worst_ctrl_mean, worst_ctrl_std,
    worst_band_lo, worst_band_hi}.
  """
  scores = np.asarray(scores, np.float64)
  base = np.asarray(baseline, np.float64)
  delta = np.transpose(scores[:, :, 0] - base, (2, 0, 1))                       # [T, L', A]
  ctrl = np.transpose(scores[:, :, 1:] - base, (3, 0, 1, 2))                    # [T, L', A, K]
  cb = control_band(delta, ctrl, band_z=band_z, std_floor=std_floor)
  killed = (delta <= -threshold) & (delta < cb["band_lo"])
  depth = 100.0 * np.asarray(layers, np.float64) / n_layers
  zones = []
  for t, b in enumerate(behaviors):
    for a, alpha in enumerate(alphas):
      run = []
      for i in range(len(layers) + 1):
        if i < len(layers) and killed[t, i, a]:
          run.append(i)
          continue
        if run:
          w = run[int(np.argmin(delta[t, run, a]))]
          zones.append({"behavior": b, "alpha": float(alpha), "layers": [int(layers[j]) for j in run],
                        "depth_start": float(depth[run[0]]), "depth_end": float(depth[run[-1]]),
                        "min_delta": float(delta[t, run, a].min()), "min_z": float(cb["z"][t, run, a].min()),
                        "band_lo": float(cb["band_lo"][t, run, a].min()),
                        "worst_layer": int(layers[w]), "worst_depth": float(depth[w]),
                        "worst_z": float(cb["z"][t, w, a]), "worst_ctrl_mean": float(cb["ctrl_mean"][t, w, a]),
                        "worst_ctrl_std": float(cb["ctrl_std"][t, w, a]),
                        "worst_band_lo": float(cb["band_lo"][t, w, a]),
                        "worst_band_hi": float(cb["band_hi"][t, w, a])})
          run = []
  return {"delta": delta, "ctrl_delta": ctrl, **cb, "killed": killed, "depth_pct": depth, "kill_zones": zones}
