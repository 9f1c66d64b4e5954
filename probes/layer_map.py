"""The layer map: a sweep's evidence about where in depth each behavior lives, as one self-contained artifact.

    map.json   schema docs/layer_map.schema.json (documented in docs/layer_map.md), version SCHEMA_VERSION
    map.png    behavior x layer heatmap of the screen's z against covariance-shaped controls, windows outlined
    map.md     a "Layer map" section ready to paste into a model card

A window is a maximal run of consecutive decoder layers where the first-order screen (probes.sweep_screen) finds the
behavior's own vector moving its own per-probe score beyond covariance-shaped controls of the same norm, q <
q_level (Benjamini-Hochberg over every behavior x layer of the screen), with one sign of the slope throughout.
Its evidence: the peak layer's slope with its 95% bootstrap CI over probes, z, empirical p and q, the window's
largest q, and every exact large-alpha cell (probes.sweep_exact) inside it with its delta, CI and q. A layer with
no window is not evidence of no effect: the screen is first order (alpha -> 0) and has the stated n.

Layer index: decoder layer l (0-based) = the block whose output resid_post[l] the vector is added to; PEFT's
`layers_to_transform` and llama.cpp's control-vector layer (probes.export_control_vector) count the same blocks.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import numpy as np

from probes.vectors import exact_cells

SCHEMA = "gravlab.layer_map"
SCHEMA_VERSION = 1
LAYER_CONVENTION = ("layer l = decoder layer l (0-based); the steering vector is added to resid_post[l], the output "
                    "of decoder layer l; PEFT layers_to_transform and llama.cpp control-vector layers use the same "
                    "index")
SCORE_UNITS = {"factual": "nats / token (log p true - log p false)",
               "bias": "nats (log p correct option - best other option)",
               "sycophancy": "nats (log p truthful option - best other option)",
               "refusal": "nats / token (log p benign request - log p its harmful twin)",
               "toxicity": "nats / token (benign minus toxic log-prob gap)"}
LAYER_KEYS = ("slope", "slope_ci_low", "slope_ci_high", "ctrl_mean", "ctrl_sd", "z", "p", "q", "vector_norm")


def windows(slope: Sequence[float], q: Sequence[float], q_level: float) -> list[tuple[int, int]]:
  """Maximal runs [(start, end)] (inclusive) of consecutive layers with q < q_level and one sign of the slope.

  slope, q: `[L]` per-layer screen slope and BH q. NaN q never counts as significant."""
  out: list[tuple[int, int]] = []
  start = None
  for l in range(len(q) + 1):
    ok = l < len(q) and np.isfinite(q[l]) and q[l] < q_level and slope[l] != 0
    if start is not None and (not ok or np.sign(slope[l]) != np.sign(slope[start])):
      out.append((start, l - 1))
      start = None
    if ok and start is None:
      start = l
  return out


def _window(row: dict, a: int, b: int, cells: list[dict]) -> dict[str, Any]:
  """One window's evidence (module docstring)."""
  z = np.abs(np.nan_to_num(np.asarray(row["z"][a:b + 1], np.float64), nan=-1.0))
  pk = a + int(np.argmax(z))
  return {"start": a, "end": b, "sign": "+" if row["slope"][pk] > 0 else "-", "peak_layer": pk,
          "peak_slope": float(row["slope"][pk]),
          "peak_slope_ci": [float(row["slope_ci_low"][pk]), float(row["slope_ci_high"][pk])],
          "peak_z": float(row["z"][pk]), "peak_p": float(row["p"][pk]), "peak_q": float(row["q"][pk]),
          "max_q": float(np.max(row["q"][a:b + 1])),
          "exact_cells": [c for c in cells if a <= c["layer"] <= b]}


def _require(metrics: dict, path: str) -> None:
  """Refuse a metrics.json that is not a sweep's, or predates the screen's slope CIs, naming the field."""
  for k in ("model", "n_layers", "d_model", "screen", "exact_cells", "baseline_rho_eval"):
    if k not in metrics:
      raise ValueError(f"{path}: field {k!r} missing; not a probes.sweep metrics.json")
  for b, row in metrics["screen"]["behaviors"].items():
    for k in LAYER_KEYS:
      if k not in row:
        raise ValueError(f"{path}: screen.behaviors.{b}.{k} missing (a sweep older than the layer map); rerun "
                         "probes.sweep into a fresh workdir")


def build(sweep_dir: str, q_level: float | None = None, lens: dict | None = None) -> dict[str, Any]:
  """The layer map (schema docs/layer_map.schema.json) of the sweep workdir `sweep_dir` (probes.sweep: its
  metrics.json, config.json and vectors/<behavior>.caa.json sidecars for the weight digest).

  q_level: window threshold (default: the sweep's config q_level). lens: probes.lens.refusal_lens's result, stored
  as "logit_lens" (where the model's own answer forms in depth, beside the refusal windows). Raises FileNotFoundError for a missing file
  and ValueError naming the field of a metrics.json that is not a complete sweep's."""
  mpath = os.path.join(sweep_dir, "metrics.json")
  with open(mpath) as f:
    metrics = json.load(f)
  with open(os.path.join(sweep_dir, "config.json")) as f:
    config = json.load(f)
  _require(metrics, mpath)
  q_level = float(config.get("q_level", 0.05) if q_level is None else q_level)
  weights = None
  behaviors: dict[str, Any] = {}
  for b, row in metrics["screen"]["behaviors"].items():
    side = os.path.join(sweep_dir, "vectors", f"{b}.caa.json")
    if weights is None and os.path.exists(side):
      with open(side) as f:
        weights = json.load(f).get("weights")
    cells = exact_cells(metrics["exact_cells"], b)
    behaviors[b] = {"n_probes": int(row["n_probes"]), "n_pairs": int(row["n_pairs"]),
                    "score_units": SCORE_UNITS.get(b, "per-probe continuous score (probes.margins)"),
                    "baseline_rho_eval": metrics["baseline_rho_eval"].get(b),
                    "layers": {k: [float(x) for x in row[k]] for k in LAYER_KEYS},
                    "windows": [_window(row, a, e, cells) for a, e in windows(row["slope"], row["q"], q_level)],
                    "exact_cells": cells}
  return _finite({"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "model": {"name": metrics["model"], "n_layers": int(metrics["n_layers"]),
                    "d_model": int(metrics["d_model"]), "weights": weights},
          "layer_convention": LAYER_CONVENTION,
          "test": {"screen": "d score / d alpha at alpha = 0 of the behavior's own CAA vector at resid_post[l] "
                             "(alpha in units of ||v_l||), against covariance-shaped random directions of the "
                             "same norm; empirical two-sided p; Benjamini-Hochberg q over behaviors x layers",
                   "controls": "covariance-shaped", "n_controls": int(metrics["screen"]["directions"]),
                   "q_level": q_level, "vector": metrics.get("vector", "caa"),
                   "exact": {"layers": metrics.get("exact_layers", []), "alphas": metrics.get("exact_alphas", []),
                             "controls_per_cell": metrics.get("controls_per_cell", {})}},
          "source": {"sweep_workdir": sweep_dir, "config": config},
          "behaviors": behaviors, **({"logit_lens": lens} if lens else {})})


def _finite(x):
  """NaN / inf -> None (JSON null: "undefined", e.g. z where the controls' sd is 0), recursively."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  return x


def num(v, spec: str) -> str:
  """`v` formatted with `spec`, or "undefined" for None (a NaN in the sweep)."""
  return "undefined" if v is None else format(v, spec)


def fmt_peak(w: dict) -> str:
  """A window's peak as "layer: slope [95% CI], z, p, q"."""
  lo, hi = w["peak_slope_ci"]
  return (f"{w['peak_layer']}: {w['peak_slope']:+.4f} [{num(lo, '+.4f')}, {num(hi, '+.4f')}], "
          f"z {num(w['peak_z'], '+.1f')}, p {w['peak_p']:.4f}, q {w['peak_q']:.3f}")


def fmt_cell(c: dict) -> str:
  """One exact cell as "layer l alpha a: delta d [lo, hi], q q" (+ "(kill zone)")."""
  return (f"layer {c['layer']} alpha {c['alpha']:+g}: delta {c['delta']:+.3f} [{num(c['ci_low'], '+.3f')}, "
          f"{num(c['ci_high'], '+.3f')}], q {c['q']:.3f}{' (kill zone)' if c.get('killed') else ''}")


def markdown(m: dict[str, Any]) -> str:
  """The model-card section: per behavior, its depth windows with effect sizes and q-values, the exact cells, the
  n and the test behind every number."""
  t, L = m["test"], m["model"]["n_layers"]
  lines = [f"## Layer map ({m['model']['name']}, {L} decoder layers)", "",
           f"Where in depth steering each behavior's own CAA vector moves that behavior, from gravlab's first-order "
           f"screen against {t['n_controls']} covariance-shaped random directions of the same norm per layer "
           f"(Benjamini-Hochberg q < {t['q_level']} over behaviors x layers). Slope: d score / d alpha at alpha = 0, "
           "alpha in units of the vector's norm at that layer, with its 95% bootstrap CI over probes. Layer l is "
           "decoder layer l (0-based), the index of PEFT's layers_to_transform and llama.cpp's control vectors.", "",
           "| behavior | probes | windows (layers, sign) | peak layer: slope [95% CI], z, p, q | exact cells in the "
           "windows |", "|---|---|---|---|---|"]
  for b, r in m["behaviors"].items():
    ws = r["windows"]
    win = ", ".join(f"{w['start']}-{w['end']} ({w['sign']})" if w["end"] > w["start"] else
                    f"{w['start']} ({w['sign']})" for w in ws) or "none"
    peak = "; ".join(fmt_peak(w) for w in ws) or "-"
    cells = "; ".join(fmt_cell(c) for w in ws for c in w["exact_cells"]) or "-"
    lines.append(f"| {b} | {r['n_probes']} | {win} | {peak} | {cells} |")
  if m.get("logit_lens"):
    lines += [""] + lens_lines(m["logit_lens"], m["behaviors"].get("refusal", {}).get("windows", []))[:-1]
  lines += ["", "Scores: " + "; ".join(f"{b}: {r['score_units']}" for b, r in m["behaviors"].items()) + ".",
            "A behavior without a window has no layer where a small push along its own vector moves it more than "
            "the controls do at this n; that is not evidence that no layer matters.", ""]
  return "\n".join(lines)


def lens_lines(lens: dict[str, Any], windows: list[dict]) -> list[str]:
  """The map.md paragraph: where each prompt kind's answer becomes top-1, beside the refusal windows."""
  def at(k):
    b = lens[k]["emerges_at"]
    return "never (below one half at the last boundary)" if b is None else \
        (f"boundary {b} (resid_post of decoder layer {b - 1})" if b > 0 else "boundary 0 (the embeddings)")
  win = ", ".join(f"{w['start']}-{w['end']}" for w in windows) or "none"
  return [f"Logit lens (final norm + LM head on the residual stream at every boundary; {lens['source']}): the "
          f"model's own first response token is top-1 for at least half the prompts from {at('harmful')} on for "
          f"harmful requests (most common: {', '.join(repr(t) for t in lens['harmful']['tokens'])}) and from "
          f"{at('benign')} on for benign ones (most common: {', '.join(repr(t) for t in lens['benign']['tokens'])})"
          f"; the refusal windows are {win}.", ""]


def load(path: str) -> dict[str, Any]:
  """Read a map.json, checking its schema name and version; ValueError naming the file otherwise."""
  with open(path) as f:
    m = json.load(f)
  if m.get("schema") != SCHEMA or m.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{path}: not a {SCHEMA} v{SCHEMA_VERSION} file (schema {m.get('schema')!r}, version "
                     f"{m.get('schema_version')!r})")
  return m
