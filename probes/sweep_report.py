"""report.md of the layer sweep (probes/sweep.py): setup, baseline scores, kill zones with their controls, the
generation readout at kill-zone cells, largest drops, per-layer deltas and linear probes by depth; and the run's
metrics.json (`metrics`) and figures (`figures`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from probes import sweep_screen
from probes.sweep_config import SweepConfig

# Linear-probe task -> (behavior whose probe pairs it uses, what it separates)
PROBE_TASKS = {"truth": ("factual", "true vs false statement"),
               "harm": ("refusal", "benign vs harmful request + compliant response"),
               "sycophancy": ("sycophancy", "truthful vs sycophantic answer")}

READOUT_TEXT = {
    "logprob": "log-probability (argmax over the option letters after \"Answer:\") in the sweep; rho-eval's "
               "generation readout at baseline and at the kill-zone cells only",
    "logprob_nocheck": "log-probability (argmax over the option letters after \"Answer:\") in the sweep; rho-eval's "
                       "generation readout at baseline only",
    "generate": "rho-eval's generation readout (5 greedy tokens, letter parsed) in the whole sweep"}


@dataclasses.dataclass(frozen=True)
class SweepResults:
  """What the sweep report is written from (probes/sweep.py `run`): the config, the model config, the model name,
  behaviors `[T]`, swept layers `[L']`, alphas `[A]`, the sweep result `res` (baseline `[T]`, chunk), the kill-zone
  analysis `an` (probes.killzones.analyze), linear-probe results by boundary, vector norms `vec`, timing (s),
  figure paths, the probe tasks, the bias / sycophancy readout and the generation-readout baseline and cells."""
  config: SweepConfig
  cfg: Any
  name: str
  behaviors: Sequence[str]
  layers: Sequence[int]
  alphas: Sequence[float]
  res: dict
  an: dict
  probe_res: dict
  vec: dict
  timing: dict
  figs: dict
  task_list: Sequence[Any]
  readout: str = "logprob"
  base_logprob: Any = None
  gen_base: dict | None = None
  gen_cells: Sequence[dict] = ()
  screen: dict | None = None          # probes.sweep_screen.run_screen


def figures(wd, sr: SweepResults) -> dict[str, str]:
  """figures/{behavior_depth,alpha_depth,delta_band,probe_accuracy}.png; {name: path relative to the workdir}.

  wd: the run's train.rundir.Workdir (`save_figure`, `path`).
  """
  import matplotlib.pyplot as plt  # local: matplotlib is heavy; only a run's figures need it
  from probes import plots  # local: probes.plots imports matplotlib at its top
  an, behaviors, alphas = sr.an, sr.behaviors, sr.alphas
  title = f"{sr.name}: steering with the {sr.config.steer_source} {sr.config.vector.upper()} vector"
  figs = {"behavior_depth": plots.behavior_depth_heatmap(an, behaviors, alphas, title),
          "alpha_depth": plots.alpha_depth_heatmaps(an, behaviors, alphas, title),
          "delta_band": plots.delta_with_band(an, behaviors, alphas, title),
          "probe_accuracy": plots.probe_accuracy(sr.probe_res, sr.cfg.n_layers,
                                                 f"{sr.name}: linear probes on the residual stream")}
  paths = {k: os.path.relpath(wd.save_figure(f, k), wd.path) for k, f in figs.items()}
  for f in figs.values():
    plt.close(f)
  return paths


def metrics(sr: SweepResults) -> dict[str, Any]:
  """metrics.json: every array of the run."""
  config, an, res = sr.config, sr.an, sr.res
  return {"model": config.model, "n_layers": sr.cfg.n_layers, "d_model": sr.cfg.d_model, "behaviors": sr.behaviors,
          "layers": sr.layers, "alphas": sr.alphas, "n_random": config.n_random, "steer_source": config.steer_source,
          "vector": config.vector, "n_probes": {b: t.n_probes for b, t in zip(sr.behaviors, sr.task_list)},
          "baseline": dict(zip(sr.behaviors, res["baseline"].tolist())), "scores": res["scores"],
          "vector_norm": sr.vec["caa_norm"], "pca_explained": sr.vec["pca_explained"], "chunk": res["chunk"],
          "timing": sr.timing, "kill_zones": an["kill_zones"], "readout": sr.readout,
          "baseline_logprob": dict(zip(sr.behaviors, sr.base_logprob.tolist())),
          "baseline_generation": sr.gen_base, "generation_cells": sr.gen_cells,
          **{k: an[k] for k in ("delta", "z", "ctrl_mean", "ctrl_std", "band_lo", "band_hi", "depth_pct")},
          "probes": {k: {m: v for m, v in r.items()} for k, r in sr.probe_res.items()},
          "screen": sr.screen, "screen_directions": sr.screen["directions"] if sr.screen else 0}


def report(sr: SweepResults) -> str:
  """The report's markdown."""
  sections = (_intro, _baseline, _screen, _kill_zones, _largest_drops, _linear_probes)
  return "\n".join(line for section in sections for line in section(sr))


def _screen(sr: SweepResults) -> list[str]:
  return sweep_screen.report_lines(sr.screen, sr.cfg.n_layers)


def _intro(sr: SweepResults) -> list[str]:
  """Title, setup, timing and the readout."""
  (config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing, figs, task_list, readout,
   base_logprob, gen_base, gen_cells, _) = (getattr(sr, f.name) for f in dataclasses.fields(sr))
  K, L = int(config.n_random), cfg.n_layers
  readout_key = readout if readout == "generate" or config.gen_check else "logprob_nocheck"
  lines = [f"# Lobotomy layers: {name}", "",
           f"{cfg.arch}, {L} layers, d_model {cfg.d_model}. Steering vector: {config.vector.upper()} of "
           f"`{config.steer_source}` contrast pairs (last-token residual, {len(probe_res['sycophancy']['acc'])} "
           f"boundaries), added at the output of one layer at every position. Swept layers {layers[0]}..{layers[-1]} "
           f"(stride {config.layer_stride}), alphas {alphas}, control: {K} norm-matched random directions per "
           f"(layer, alpha). Depth % = layer / {L} (rho-eval's convention).", "",
           f"Timing: load {timing['load_s']:.0f}s, capture {timing['capture_s']:.0f}s "
           f"({timing['capture_tokens']} tokens), linear probes {timing['probes_s']:.0f}s, sweep "
           f"{timing['sweep_s']:.0f}s for {timing['sweep_configs']} configurations x "
           f"{timing['sweep_tokens_per_config']} tokens (method `{config.method}`, vmap chunk {res['chunk']}; "
           f"includes compilation), generation readout {timing.get('gen_baseline_s', 0):.0f}s baseline + "
           f"{timing.get('gen_cells_s', 0):.0f}s kill-zone cells; total {timing['total_s']:.0f}s before figures.",
           "",
           f"Readout of bias and sycophancy: **{READOUT_TEXT[readout_key]}**.", ""]
  return lines


def _baseline(sr: SweepResults) -> list[str]:
  """Baseline scores with both readouts."""
  (config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing, figs, task_list, readout,
   base_logprob, gen_base, gen_cells, _) = (getattr(sr, f.name) for f in dataclasses.fields(sr))
  lines = [
           "## Baseline scores (rho-eval definitions)", "",
           "| behavior | score (sweep readout) | metric | probes | log-prob readout | generation readout "
           "(unparsed) |", "|---|---|---|---|---|---|"]
  metric = {"factual": "Spearman rho of teacher-forced confidence (true vs false)", "bias": "BBQ accuracy",
            "sycophancy": "truthful rate", "refusal": "AUC benign > harmful (mean log-prob)",
            "toxicity": "AUC benign > toxic (mean log-prob)"}
  gen_base = gen_base or {}
  base_logprob = res["baseline"] if base_logprob is None else base_logprob
  for t, b in enumerate(behaviors):
    g = (f"{gen_base[b]['score']:.3f} ({gen_base[b]['invalid']}/{task_list[t].n_probes})" if b in gen_base
         else "n/a (teacher-forced)")
    lp = f"{base_logprob[t]:.3f}" if b in gen_base else "="
    lines.append(f"| {b} | {res['baseline'][t]:.3f} | {metric[b]} | {task_list[t].n_probes} | {lp} | {g} |")
  if gen_base:
    lines += ["", "Generation readout: rho-eval's (`behaviors.bias.BiasBehavior.evaluate`, "
              "`behaviors.sycophancy.SycophancyBehavior._evaluate_generation`): raw prompt, "
              f"{config.gen_tokens} greedy tokens, letter parsed from the text; an unparsed answer "
              "counts as wrong. Log-prob readout: argmax over the option letters' next-token logits "
              "(always answers)."]
  return lines


def _kill_zones(sr: SweepResults) -> list[str]:
  """One row per kill zone (or a behavior's largest drop), and the generation readout at its cells."""
  return kill_zone_lines(sr.config, sr.behaviors, sr.layers, sr.alphas, sr.an, sr.gen_cells)


def headline(config: SweepConfig, metrics: dict) -> list[str]:
  """The kill-zone table (and the generation readout at its cells), one heading level down, for the main job's
  report, from the sweep's metrics.json contents alone (`metrics`; the section links no figure)."""
  an = {k: np.asarray(metrics[k]) for k in ("delta", "z", "ctrl_mean", "ctrl_std", "band_lo", "band_hi",
                                            "depth_pct")}
  an["kill_zones"] = metrics["kill_zones"]
  lines = kill_zone_lines(config, metrics["behaviors"], metrics["layers"], metrics["alphas"], an,
                          metrics["generation_cells"])
  scr = metrics.get("screen")
  if scr:
    scr = {"directions": scr["directions"],
           "behaviors": {b: {k: np.asarray(v) if isinstance(v, list) else v for k, v in r.items()}
                         for b, r in scr["behaviors"].items()}}
    lines += [""] + sweep_screen.report_lines(scr, metrics["n_layers"])
  return ["#" + ln if ln.startswith("##") else ln for ln in lines]


def kill_zone_lines(config: SweepConfig, behaviors: Sequence[str], layers: Sequence[int], alphas: Sequence[float],
                    an: dict, gen_cells: Sequence[dict]) -> list[str]:
  """The "## Kill zones" section. an: probes.killzones.analyze's dict (delta / z / ctrl_mean / ctrl_std /
  band_lo / band_hi `[behaviors, layers, alphas]`, depth_pct `[layers]`, kill_zones); gen_cells: the
  generation-readout cells (probes.sweep.generation_cells)."""
  K = int(config.n_random)
  lines = []
  lines += ["", "## Kill zones", "",
            f"A kill zone is a maximal run of consecutive swept layers where the score drops by at least "
            f"{config.kill_threshold} AND lies below the random-direction control band (mean - {config.band_z} sd "
            f"of the {K} norm-matched random directions' deltas at the same cell, sd floored at {config.std_floor}, "
            "widened to contain every control). One row per kill zone; a behavior without one gets a row with its "
            "largest drop instead. Delta, z, control and band are at the window's worst layer (lowest delta).", "",
            "| behavior | alpha | window: layers | depth % | delta (at layer) | z vs control | "
            "control mean +/- sd | control band |", "|---|---|---|---|---|---|---|---|"]
  for t, b in enumerate(behaviors):
    zones = sorted((z for z in an["kill_zones"] if z["behavior"] == b), key=lambda z: z["min_delta"])
    for z in zones:
      lines.append(f"| {b} | {z['alpha']:+g} | {z['layers'][0]}-{z['layers'][-1]} ({len(z['layers'])} swept) | "
                   f"{z['depth_start']:.1f}-{z['depth_end']:.1f} | {z['min_delta']:+.3f} (L{z['worst_layer']}) | "
                   f"{z['worst_z']:+.1f} | {z['worst_ctrl_mean']:+.3f} +/- {z['worst_ctrl_std']:.3f} | "
                   f"[{z['worst_band_lo']:+.3f}, {z['worst_band_hi']:+.3f}] |")
    if not zones:
      i, a = np.unravel_index(np.argmin(an["delta"][t]), an["delta"][t].shape)
      lines.append(f"| {b} | {alphas[a]:+g} | none (largest drop: layer {layers[i]}) | {an['depth_pct'][i]:.1f} | "
                   f"{an['delta'][t, i, a]:+.3f} (L{layers[i]}) | {an['z'][t, i, a]:+.1f} | "
                   f"{an['ctrl_mean'][t, i, a]:+.3f} +/- {an['ctrl_std'][t, i, a]:.3f} | "
                   f"[{an['band_lo'][t, i, a]:+.3f}, {an['band_hi'][t, i, a]:+.3f}] |")
  if not an["kill_zones"]:
    lines += ["", "No kill zone: no swept layer drops a behavior past the threshold and below the control band."]
  if gen_cells:
    lines += ["", "### Generation readout at the kill-zone cells", "",
              "The sweep above scores bias and sycophancy by log-probability; these cells (the worst layer of each "
              "of their kill zones, then their largest drop; at most "
              f"{config.gen_max_cells} per behavior) are re-scored by rho-eval's generation readout, with "
              f"the same behavior vector and the same {K} random directions as control. The rest of the grid is "
              "not generation-scored (`readout=\"generate\"` does that). \"Killed\" applies the kill-zone rule "
              "to the generation delta.", "",
              "| behavior | cell | layer | depth % | alpha | log-prob delta (z) | generation baseline -> steered | "
              "generation delta | z vs control | control band | killed | unparsed (steered) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in gen_cells:
      lines.append(f"| {c['behavior']} | {c['why']} | {c['layer']} | {c['depth_pct']:.1f} | {c['alpha']:+g} | "
                   f"{c['logprob_delta']:+.3f} ({c['logprob_z']:+.1f}) | {c['baseline']:.3f} -> {c['score']:.3f} | "
                   f"{c['delta']:+.3f} | {c['z']:+.1f} | [{c['band_lo']:+.3f}, {c['band_hi']:+.3f}] | "
                   f"{'yes' if c['killed'] else 'no'} | {c['invalid']}/{len(c['texts'])} |")
  return lines


def _largest_drops(sr: SweepResults) -> list[str]:
  """The largest drop per behavior with its control, the figures and the per-layer delta tables."""
  (config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing, figs, task_list, readout,
   base_logprob, gen_base, gen_cells, _) = (getattr(sr, f.name) for f in dataclasses.fields(sr))
  lines = []
  # largest drops regardless of control
  lines += ["", "Largest drop per behavior (any layer / alpha), with the control at the same cell:", "",
            "| behavior | layer | depth % | alpha | delta | control mean +/- sd | z | outside band |",
            "|---|---|---|---|---|---|---|---|"]
  for t, b in enumerate(behaviors):
    i, a = np.unravel_index(np.argmin(an["delta"][t]), an["delta"][t].shape)
    lines.append(f"| {b} | {layers[i]} | {an['depth_pct'][i]:.1f} | {alphas[a]:+g} | {an['delta'][t, i, a]:+.3f} | "
                 f"{an['ctrl_mean'][t, i, a]:+.3f} +/- {an['ctrl_std'][t, i, a]:.3f} | {an['z'][t, i, a]:+.1f} | "
                 f"{'yes' if an['outside'][t, i, a] else 'no'} |")
  lines += ["", f"![behavior x depth]({figs['behavior_depth']})", "", f"![delta with control band]({figs['delta_band']})",
            "", f"![alpha x depth]({figs['alpha_depth']})", ""]
  for a, alpha in enumerate(alphas):
    lines += [f"### Delta by layer, alpha = {alpha:+g} (z vs control in brackets)", "",
              "| layer | depth % | ||v|| | " + " | ".join(behaviors) + " |",
              "|---|---|---|" + "---|" * len(behaviors)]
    for i, l in enumerate(layers):
      cells = [f"{an['delta'][t, i, a]:+.3f} ({an['z'][t, i, a]:+.1f})" for t in range(len(behaviors))]
      lines.append(f"| {l} | {an['depth_pct'][i]:.1f} | {vec['caa_norm'][l + 1]:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def _linear_probes(sr: SweepResults) -> list[str]:
  """Linear probes by depth."""
  (config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing, figs, task_list, readout,
   base_logprob, gen_base, gen_cells, _) = (getattr(sr, f.name) for f in dataclasses.fields(sr))
  L = cfg.n_layers
  lines = []
  lines += ["## Linear probes by depth", "",
            f"Logistic regression on last-token residuals, L2 in {list(config.probe_l2)} chosen on validation, "
            f"pair-grouped {list(config.probe_fractions)} train/val/test splits, seeds {list(config.probe_seeds)}; "
            "held-out test accuracy / AUC / ECE (mean over seeds).", "",
            f"![probe accuracy]({figs['probe_accuracy']})", "",
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
