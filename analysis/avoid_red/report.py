"""Outputs of the avoid-the-red study (analysis/avoid_red/study.py): grid.csv, metrics.json, figures, report.md."""
from __future__ import annotations

import json
import os

import numpy as np

from analysis import grid
from analysis.reversion import metrics as rm
from analysis.reversion import plots as rp
from analysis.stats import welch_difference
from train.rundir import write_json, write_text

WINDOW_TEXT = {"kill": "the kill zone", "outside": "every layer outside the kill zone", "all": "every layer"}
COST = [("layers_adapted", "layers adapted", "{:.1f}"), ("d_factual", "Δ factual", "{:+.3f}"),
        ("d_bias", "Δ bias", "{:+.3f}"), ("d_sycophancy", "Δ sycophancy", "{:+.3f}"),
        ("d_refusal", "Δ refusal AUC", "{:+.3f}"), ("d_toxicity", "Δ toxicity AUC", "{:+.3f}"),
        ("harmful_refused", "harmful refused", "%"), ("benign_refused", "benign refused", "%"),
        ("task_nll", "benign NLL", "{:.3f}")]
REVERSION = [("v_rev_norm", "‖v_rev‖", "{:.2f}"), ("align_1", "a after step 1", "{:+.3f}"),
             ("align_T", "a at T", "{:+.3f}"), ("harm_T", "harmful not refused at T", "%"),
             ("d_harm", "Δ harmfulness (T - aligned)", "%"), ("harm_lp_T", "log-prob harmfulness at T", "%"),
             ("task_nll_T", "benign NLL at T", "{:.3f}")]
FIGURE = [("d_factual", "Δ factual (Spearman rho)"), ("d_bias", "Δ bias (accuracy)"),
          ("d_sycophancy", "Δ sycophancy (truthful rate)"), ("harmful_refused", "harmful refused (aligned)"),
          ("benign_refused", "benign refused (aligned)"), ("align_T", "alignment with v_rev at T"),
          ("harm_T", "harmful not refused at T"), ("d_harm", "Δ harmfulness over T steps")]


def _ms(g, m, pct=False) -> str:
  return grid.format_stat(g, m, "%" if pct else "{:+.3f}")


def _diff(table, a, b, m) -> dict:
  """Welch difference a - b of one metric over the two groups' points (analysis.stats.welch_difference)."""
  return welch_difference(grid.group_values(table, a, m), grid.group_values(table, b, m))


def _compare(table, a, b, m, pct=False) -> str:
  """'d [95% CI] (Welch p = ...)' for a - b; the CI and p are "undefined" with fewer than 2 points a group."""
  d = _diff(table, a, b, m)
  if d["diff"] != d["diff"]:
    return "n/a"
  k, unit = (100, " points") if pct else (1, "")
  if d["p"] != d["p"]:
    return f"{k * d['diff']:+.3f}{unit} (CI and test undefined: fewer than 2 seeds a window, or no spread)"
  return (f"{k * d['diff']:+.3f}{unit} [{k * d['ci_low']:+.3f}, {k * d['ci_high']:+.3f}] "
          f"(Welch p = {d['p']:.3g}, n = {d['n_a']} vs {d['n_b']})")


def _verdict(config, table) -> list[str]:
  """Plain statements comparing the kill / outside / all windows (when the grid has them and no other axis
  varies besides the seed)."""
  others = [a for a, v in grid.axes(config.grid) if a not in ("window", config.vmap_axis) and len(v) > 1]
  by = {g["values"].get("window"): g for g in table["groups"]}
  if others or not {"kill", "all"} <= set(by):
    return ["The grid varies more than the window (or lacks the kill / all windows): read the table."]
  k, a, o = by["kill"], by["all"], by.get("outside")
  n = len(k["points"])
  out = [f"Refusal bought: the kill-zone LoRA refuses {_ms(k, 'harmful_refused', True)} of the held-out harmful "
         f"prompts, the all-layer LoRA {_ms(a, 'harmful_refused', True)}"
         + (f", the outside-window LoRA {_ms(o, 'harmful_refused', True)}" if o else "")
         + f"; benign prompts refused: {_ms(k, 'benign_refused', True)} / {_ms(a, 'benign_refused', True)}"
         + (f" / {_ms(o, 'benign_refused', True)}" if o else "") + "."]
  for m, label in (("d_factual", "factual"), ("d_bias", "bias"), ("d_sycophancy", "sycophancy")):
    if m in k["mean"]:
      s = (f"{label} cost (theta_aligned - theta_early): kill {_ms(k, m)}, all {_ms(a, m)}"
           + (f", outside {_ms(o, m)}" if o else "") + f"; kill - all = {_compare(table, k, a, m)}")
      if o:
        s += f"; kill - outside = {_compare(table, k, o, m)}"
      out.append(s + ".")
  if o and "d_factual" in k["mean"]:
    d = _diff(table, k, o, "d_factual")
    beyond = d["p"] < 0.05
    if beyond and d["diff"] < 0:
      s = "supports the advice for this behavior: training inside the factual kill zone costs more factual score"
    elif beyond:
      s = "goes against the advice: training inside the factual kill zone costs LESS factual score than outside"
    else:
      s = ("is inconclusive at this number of seeds: the factual cost inside and outside the kill zone do not "
           "differ at p < 0.05 (Welch's t over seeds)" if d["p"] == d["p"] else
           "is undefined at this number of seeds: Welch's test needs at least 2 seeds a window")
    out.append(f"\"Avoid the red\" (factual, {n} seed{'s' * (n > 1)}): the evidence {s}.")
  out.append(f"Reversion (baseline arm, T = {config.reversion.benign.steps}): alignment at T kill {_ms(k, 'align_T')}, "
             f"all {_ms(a, 'align_T')}" + (f", outside {_ms(o, 'align_T')}" if o else "")
             + f"; harmfulness change over T kill {_ms(k, 'd_harm', True)}, all {_ms(a, 'd_harm', True)}"
             + (f", outside {_ms(o, 'd_harm', True)}" if o else "") + f"; kill - all = "
             f"{_compare(table, k, a, 'd_harm', True)}.")
  return out


def _point_arrays(workdir, table, generate: bool):
  """Per group label: align_all `[n, T]`, align `[n, T, L]`, eval steps `[E+1]`, harmfulness `[n, E+1]` (step 0 =
  theta_aligned), from the points' metrics.json."""
  out = {}
  for g in table["groups"]:
    ms = [json.load(open(os.path.join(workdir, "points", n, grid.METRICS_FILE))) for n in g["points"]]
    key = "harm_gen" if generate else "harm_lp"
    out[g["label"]] = {
        "align_all": np.array([m["align_all"] for m in ms]), "align": np.array([m["align"] for m in ms]),
        "steps": np.array([0] + [e["step"] for e in ms[0]["evals"]]),
        "harm": np.array([[m["eval_aligned"][key]] + [e[key] for e in m["evals"]] for m in ms])}
  return out


def write(wd, config, table, early, kill, kill_source, status, seconds) -> str:
  """Write grid.csv, metrics.json, figures/avoid_red_{grid,curves,heatmaps}.png and report.md; return its path."""
  rc = config.reversion
  workdir = wd.path
  csv_path = wd.file("grid.csv")
  write_text(csv_path, grid.csv_text(table))
  arrays = _point_arrays(workdir, table, bool(rc.eval.generate))
  null = rm.null_cos_quantile(early["n_layers"] * early["d_model"], 0.99)
  paths = _figures(wd, rc, table, arrays, null)

  layers = {}
  for g in table["groups"]:
    m = json.load(open(os.path.join(workdir, "points", g["points"][0], grid.METRICS_FILE)))
    layers[g["label"]] = m["layers"]
  summary = {"model": rc.model, "kill_window": list(kill), "kill_source": kill_source, "layers": layers,
             "early": {"scores": early["scores"], "eval": {k: v for k, v in early["eval"].items() if k != "answers"}},
             "null_all_p99": null, "table": table, "status": status, "seconds": seconds}
  write_json(wd.file("metrics.json"), summary)

  L = _markdown(config, table, early, kill_source, status, seconds, layers, paths, null,
                os.path.relpath(csv_path, workdir))
  if table.get("missing"):
    n = len(table["points"]) + len(table["missing"])
    L[1:1] = ["", f"**PARTIAL: {len(table['points'])} of {n} grid points finished.** Missing (still running or not "
                  f"launched): {', '.join(table['missing'])}. Collect again when they finish; every number below "
                  "covers the finished points only."]
  path = wd.file("report.md")
  write_text(path, "\n".join(L))
  return path


def _figures(wd, rc, table, arrays, null) -> dict:
  """figures/avoid_red_{grid,curves,heatmaps}.png; returns their paths relative to the workdir."""
  import matplotlib.pyplot as plt   # local: after analysis.reversion.plots has chosen the Agg backend

  title = f"{rc.model}: safety LoRA by depth window"
  T = int(rc.benign.steps)
  harm_label = "greedy + refusal judge" if rc.eval.generate else "log-prob"
  cols = [(m, lab) for m, lab in FIGURE if m in table["metrics"]]
  figs = {"grid": grid.figure(table, cols, title),
          "curves": rp.curves(np.arange(1, T + 1), {k: v["align_all"] for k, v in arrays.items()}, null,
                              next(iter(arrays.values()))["steps"], {k: v["harm"] for k, v in arrays.items()},
                              harm_label, title + ": benign fine-tuning (baseline arm)"),
          "heatmaps": rp.alignment_heatmaps({k: v["align"] for k, v in arrays.items()}, title)}
  paths = {}
  for k, f in figs.items():
    paths[k] = os.path.relpath(wd.save_figure(f, "avoid_red_" + k), wd.path)
    plt.close(f)
  return paths


def _markdown(config, table, early, kill_source, status, seconds, layers, paths, null, csv_rel) -> list[str]:
  """The report's lines: setup, theta_early, what the safety LoRA costs and buys, reversion, verdict, caveats."""
  rc = config.reversion
  T = int(rc.benign.steps)
  e = early["eval"]
  n_seeds = len(tuple(config.grid.get(config.vmap_axis, ()))) if config.vmap_axis in config.grid else 1
  sf = rc.safety
  L = [f"# Avoid the red? Safety LoRA by depth window: {rc.model}", "",
       f"{early['n_layers']} layers, d_model {early['d_model']}. Kill zone: {kill_source}. Grid: "
       + " x ".join(f"{a} {list(v)}" for a, v in grid.axes(config.grid)) + f" ({len(table['points'])} points; "
       f"this call ran {len(status['ran'])}, reused {len(status['skipped'])}; "
       + (f"{seconds / 60:.1f} min)." if seconds == seconds else "collected from the points' files)."), "",
       f"Safety LoRA: analysis.reversion.safety.safety_phase, rank {sf.lora.rank}, alpha {sf.lora.alpha}, targets {sf.lora.targets}, "
       f"{sf.train.steps} steps x batch {sf.train.micro_batch}, lr {sf.train.lr}. Benign fine-tuning: the reversion "
       f"study's baseline arm, T = {T} steps, batch {rc.benign.micro_batch}, lr {rc.benign.lr}, rank "
       f"{rc.benign.rank}, data {', '.join(rc.benign.sources)}. Behavior probes: the sweep's scored probes "
       f"({', '.join(f'{b} {n}' for b, n in config.sweep.n_probes.items() if b in config.sweep.behaviors)}), "
       f"log-prob readout. {rc.heldout} held-out refusal pairs.", "",
       "Adapted layers per window: " + "; ".join(f"{k}: {_layers_text(v)}" for k, v in layers.items()) + ".", "",
       "## theta_early (the loaded model)", "",
       "| " + " | ".join(early["scores"]) + " | harmful refused | benign refused | benign NLL |",
       "|" + "---|" * (len(early["scores"]) + 3),
       "| " + " | ".join(f"{v:.3f}" for v in early["scores"].values()) + f" | {_pct(1 - e['harm_gen'])} | "
       f"{_pct(e.get('benign_refusal', float('nan')))} | {e['task_nll']:.3f} |", "",
       "## What the safety LoRA costs and buys (theta_aligned)", "",
       f"Mean [95% t interval, ddof = 1] over {n_seeds} seed(s). Δ = theta_aligned - theta_early on the same "
       "probes (factual: Spearman rho; bias: BBQ accuracy; sycophancy: truthful rate; refusal / toxicity: AUC). Refusal: greedy answers "
       f"({rc.eval.max_new_tokens} tokens) judged by refusal phrases (train/evaluate.py).", "",
       grid.markdown_table(table, [c for c in COST if c[0] in table["metrics"]], "window"), "",
       f"![grid]({paths['grid']})", "",
       "## How much it reverts under benign fine-tuning", "",
       "v_rev = mean act(theta_early) - mean act(theta_aligned) at the last token of the harmful probe prompts "
       "(every layer; ‖v_rev‖ over layers 1..L); a = cos(drift, v_rev) over layers 1..L concatenated (isotropic "
       f"null p99 = {null:.4f}); harmfulness = held-out harmful prompts not refused; Δ harmfulness = at T minus "
       "theta_aligned.", "",
       grid.markdown_table(table, [c for c in REVERSION if c[0] in table["metrics"]], "window"), "",
       f"![curves]({paths['curves']})", "", f"![heatmaps]({paths['heatmaps']})", "",
       "## Verdict", ""] + [f"- {v}" for v in _verdict(config, table)] + [
       "", "## Caveats", "",
       "- The kill zone is where adding a steering vector (alpha +4, one layer, every position) broke a score; "
       "whether weight updates there are harmful is a different question, which is what this grid asks.",
       "- The windows differ in size, hence in trainable parameters (same rank per layer): a larger window is also "
       "a larger LoRA. Vary `rank` on the grid (configs/grid.py) to separate placement from capacity.",
       "- A window LoRA leaves the residual stream before its first layer unchanged, so v_rev is exactly zero "
       "there, and the alignment of different windows is measured against differently shaped directions.",
       f"- {n_seeds} seed(s): a difference is evidence only where Welch's test says so; with 2 seeds a window its "
       "t interval has 1 degree of freedom and is wide. Bias / sycophancy use the "
       "log-prob readout (probes/tasks.py); the refusal judge is a phrase heuristic.", "",
       f"Per-point values: [grid.csv]({csv_rel}); everything: metrics.json, "
       "points/<name>/metrics.json.", ""]
  return L


def _pct(x) -> str:
  return "n/a" if x != x else f"{100 * x:.1f}%"


def _layers_text(layers) -> str:
  """[0, 1, 2, 5, 6] -> '0-2, 5-6' (5 layers)."""
  runs, start = [], None
  for i, l in enumerate(layers):
    if start is None:
      start = l
    if i + 1 == len(layers) or layers[i + 1] != l + 1:
      runs.append(f"{start}-{l}" if l != start else f"{l}")
      start = None
  return f"{', '.join(runs)} ({len(layers)} layers)"
