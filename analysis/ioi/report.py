"""Outputs of the IOI study (analysis/ioi/study.py): metrics.json, figures and report.md, and the study's phase /
head-class names and the paper's reference figures. `config` is the study's analysis.ioi.config.IoiConfig."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from analysis.ioi import arms, baselines, discovery, retrain
from analysis.ioi import circuits as C
from analysis.stats import t_interval
from train.rundir import write_json, write_text


PHASES = ("base", "clean", "poison", "retrain")
CLASSES = ("name_mover", "negative_name_mover", "s_inhibition", "induction", "duplicate_token")
EVIDENCE = ("end_to_io", "end_to_s2", "s2_to_s1", "induction", "duplicate_token", "prev_token")
# GPT-2 small, from the literature (via secondary quotes, ../shared/research/seeds.md): a different model.
PAPER = {
    "model": "GPT-2 small (Chhabra et al. 2025; base model: Wang et al. 2022)",
    "logit_diff": {"base": "3.56", "clean": "6.32 → 26.83 (1–100 epochs)",
                   "poison": "3.55 → −11.06 (Subject Duplication, 5 epochs)", "retrain": "not quoted"},
    "accuracy": {"base": "0.993", "clean": "not quoted", "poison": "not quoted", "retrain": "not quoted"},
    "faithfulness": {"base": "87% (Wang et al.'s 26-head circuit)", "clean": "98.4–99.9%",
                     "poison": "not quoted", "retrain": "95% / 96%"},
    "classes": {"name_mover": "9.9, 10.0, 9.6", "negative_name_mover": "10.7, 11.10",
                "s_inhibition": "7.3, 7.9, 8.6, 8.10", "induction": "5.5, 5.8, 5.9, 6.9",
                "duplicate_token": "0.1, 0.10, 3.0"},
}


SCALARS = ("localisation_base_clean", "localisation_poison", "localisation_retrain", "circuit_share_base_clean",
           "circuit_share_base_clean_p", "circuit_share_poison", "circuit_share_poison_p", "circuit_share_retrain",
           "circuit_share_retrain_p", "cmap_circuit_poison_p", "cmap_circuit_retrain_p",
           "recovery_corr_clean", "recovery_corr_poison",
           "recovery_corr_retrain", "cmap_circuit_poison", "cmap_circuit_poison_gap_closed", "cmap_circuit_retrain",
           "cmap_circuit_retrain_gap_closed", "cmap_all_heads_poison", "cmap_all_heads_poison_gap_closed",
           "cmap_all_heads_retrain", "cmap_all_heads_retrain_gap_closed")
PHASE_SCALARS = ("logit_diff", "accuracy", "circuit_logit_diff", "faithfulness", "abc_logit_diff", "attribution_corr",
                 "restoration_corr", "empty_logit_diff", "faithfulness_normalised")


def write_outputs(wd, results: dict, cfg, config, wall_s: float, cross_seed: dict | None = None) -> str:
  """metrics.json, figures/ and report.md of a run (results: seed -> phases' `analyze` + `compare_phases`;
  cross_seed: study.cross_seed_localisation). Returns the report path."""
  summary = _summarise(results)
  cross_seed = cross_seed or {"pairs": [], "top_k_share": [], "circuit_share": [], "circuit_share_p": []}
  seeds = list(results)
  headline = {
      "circuit": {str(k): {p: r[p]["pp_circuit"] if "pp_circuit" in r[p] else
                           [[int(l), int(h), "END"] for l, h in np.argwhere(np.asarray(r[p]["circuit"]) > 0)]
                           for p in PHASES} for k, r in results.items()},
      "faithfulness_normalised": {p: summary[f"{p}/faithfulness_normalised"] for p in PHASES},
      "localisation": {"top_k": config.top_k, "poison": summary["localisation_poison"],
                       "null_seed": {"base_to_clean": summary["localisation_base_clean"],
                                     "clean_across_seeds": cross_seed},
                       "null_permutation_p": {str(k): results[k]["circuit_share_poison_p"] for k in seeds}},
      "retrain_curve": {str(k): r.get("retrain_curve", []) for k, r in results.items()}}
  write_json(wd.file("metrics.json"), {"summary": summary, "wall_s": wall_s, "paper": PAPER, **headline,
                                       "per_seed": {str(k): r for k, r in results.items()}})
  figs = _figures(wd, results, config)
  write_text(wd.file("report.md"), _report(config, cfg, summary, results, figs, wall_s, cross_seed))
  return wd.file("report.md")


def seed_stat(values) -> tuple[float, float, float, float]:
  """(mean, sd with ddof = 1, 95% t-interval low, high) over seeds (analysis.stats.t_interval); sd and interval
  NaN with one seed or a NaN value."""
  v = np.asarray(values, np.float64)
  if v.size < 2 or not np.all(np.isfinite(v)):
    return float(np.mean(v)), float("nan"), float("nan"), float("nan")
  t = t_interval(v)
  return t["mean"], t["sd"], t["ci_low"], t["ci_high"]


def _summarise(results: dict) -> dict:
  """seed_stat over seeds of every per-phase and cross-phase scalar."""
  first = next(iter(results.values()))
  extra = lambda p: [m for m in first[p] if m.startswith(("faithfulness_k", "gt_prob_diff", "pp_circuit_logit",
                                                           "pp_faithfulness"))]
  out = {f"{p}/{m}": seed_stat([r[p][m] for r in results.values()]) for p in PHASES
         for m in PHASE_SCALARS + tuple(extra(p))}
  out.update({m: seed_stat([r[m] for r in results.values()]) for m in SCALARS if m in first})
  return out


def _mean_map(results: dict, phase: str, key: str, sub: str | None = None) -> np.ndarray:
  return np.mean([r[phase][key] if sub is None else r[phase][key][sub] for r in results.values()], 0)


def _figures(wd, results, config) -> dict:
  # matplotlib (analysis.plots imports it at its top) loads only when figures are drawn, not whenever the study
  # or its report tables are imported
  import matplotlib.pyplot as plt  # local: matplotlib, see above

  from analysis import plots  # local: imports matplotlib
  paths = {}

  def save(fig, name):
    paths[name] = os.path.relpath(wd.save_figure(fig, name), wd.path)
    plt.close(fig)

  n = len(results)
  for key, name, what in (("importance", "head_importance", "exact patching, drop in logit diff when z_END <- ABC"),
                          ("restoration", "head_restoration",
                           "exact patching, rise of the ABC run's logit diff when z_END <- clean"),
                          ("dla_heads", "head_dla", "direct logit attribution at END")):
    maps = {p: _mean_map(results, p, key) for p in PHASES}
    save(plots.head_heatmaps(maps, f"{config.model}: {what} (mean of {n} seeds)"), name)
  fig, axes = plt.subplots(len(EVIDENCE), len(PHASES), figsize=(2.6 * len(PHASES), 2.4 * len(EVIDENCE)),
                           constrained_layout=True, squeeze=False)
  for i, ev in enumerate(EVIDENCE):
    for j, p in enumerate(PHASES):
      im = axes[i, j].imshow(_mean_map(results, p, "attention", ev), cmap="viridis", vmin=0, vmax=1,
                             aspect="auto", origin="lower")
      axes[i, j].set(title=f"{p}: {ev}", xlabel="head" if i == len(EVIDENCE) - 1 else None,
                     ylabel="layer" if j == 0 else None, xticks=range(0, im.get_array().shape[1], 2))
  fig.colorbar(im, ax=list(axes.flat), shrink=0.5, label="attention probability")
  fig.suptitle(f"{config.model}: attention evidence (IOI END/S2 attention; repeated random sequences)")
  save(fig, "attention_evidence")
  fig, axes = plt.subplots(1, len(PHASES), figsize=(3.2 * len(PHASES), 3.2), constrained_layout=True)
  for ax, p in zip(axes, PHASES):
    for k, r in results.items():
      ax.scatter(np.ravel(r[p]["importance"]), np.ravel(r[p]["attribution"]), s=6, alpha=0.6, label=f"seed {k}")
    lim = max(float(np.abs(np.concatenate([np.ravel(r[p][m]) for r in results.values()
                                           for m in ("importance", "attribution")])).max()), 1e-6)
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
    ax.set(title=p, xlabel="exact importance", ylabel="attribution estimate" if p == PHASES[0] else None)
  axes[0].legend(frameon=False, fontsize=7)
  save(fig, "attribution_vs_exact")
  fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
  for k, r in results.items():
    ax.plot(range(len(PHASES)), [r[p]["logit_diff"] for p in PHASES], "o-", alpha=0.7, label=f"seed {k}")
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xticks=range(len(PHASES)), xticklabels=PHASES, ylabel="logit diff  logit(IO) - logit(S)",
         title=f"IOI by phase ({config.poison} poisoning)")
  ax.legend(frameon=False, fontsize=8)
  save(fig, "logit_diff_by_phase")
  if "cmap_random_poison" in next(iter(results.values())):
    save(baselines.cmap_figure(plt, results, config.top_k), "cmap_random")
  if next(iter(results.values())).get("retrain_curve"):
    save(retrain.curve_figure(plt, results, {k: r["base"]["logit_diff"] for k, r in results.items()}),
         "retrain_curve")
  return paths


def _head(lh) -> str:
  return f"{lh[0]}.{lh[1]}"


def _class_tables(results: dict) -> list[str]:
  """Head classes per phase (with the number of seeds that found each head) and their evidence."""
  n = len(results)
  lines = ["| class | GPT-2 small (Wang et al.) | " + " | ".join(PHASES) + " |",
           "|---|---|" + "---|" * len(PHASES)]
  union = {}
  for c in CLASSES:
    cells = []
    for p in PHASES:
      counts = {}
      for r in results.values():
        for lh in r[p]["classes"][c]:
          counts[tuple(lh)] = counts.get(tuple(lh), 0) + 1
          union.setdefault(tuple(lh), set()).add(c)
      ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
      cells.append(", ".join(f"{_head(lh)} ({m}/{n})" for lh, m in ranked) or "none")
    lines.append(f"| {c.replace('_', ' ')} | {PAPER['classes'][c]} | " + " | ".join(cells) + " |")
  in_circuit = {}
  for p in PHASES:
    for r in results.values():
      for lh in np.argwhere(np.asarray(r[p]["circuit"]) > 0):
        in_circuit.setdefault(tuple(int(x) for x in lh), []).append(p)
  per_phase = lambda lh, key, sub=None: "/".join(f"{_mean_map(results, p, key, sub)[lh]:.2f}" for p in PHASES)
  lines += ["", "Evidence for every head above and every head of a phase's top-k circuit, mean over seeds, each "
            "cell base/clean/poison/retrain. Attention columns are attention probabilities (END->IO, END->S2 and "
            "S2->S1 on the IOI prompts; induction and duplicate-token on repeated random sequences); DLA = direct "
            "logit attribution at END; importance = exact final-position patching drop; circuit = the phases "
            "(b/c/p/r) whose top-k contains the head in some seed.", "",
            "| head | classes | circuit | END->IO | END->S2 | S2->S1 | induction | duplicate token | DLA | "
            "importance |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for lh in sorted(set(union) | set(in_circuit)):
    att = [per_phase(lh, "attention", e) for e in ("end_to_io", "end_to_s2", "s2_to_s1", "induction",
                                                   "duplicate_token")]
    circ = "".join(p[0] for p in PHASES if p in in_circuit.get(lh, ())) or "-"
    lines.append(f"| {_head(lh)} | {', '.join(sorted(c.replace('_', ' ') for c in union.get(lh, ()))) or '-'} | "
                 f"{circ} | " + " | ".join(att) + f" | {per_phase(lh, 'dla_heads')} | {per_phase(lh, 'importance')} |")
  return lines


class _Cells:
  """Formatting of summary cells: mean [95% t interval] over seeds (pm), per-seed columns (ph / sc) and their header."""

  def __init__(self, s: dict, results: dict):
    self.s, self.results, self.seeds = s, results, list(results)
    self.head = "| " + " | ".join(f"seed {x}" for x in self.seeds) + " |"

  def pm(self, key, f="{:.3f}"):
    """mean [95% t-interval over seeds], or the mean alone with one seed; "undefined" for NaN."""
    m, _, lo, hi = self.s[key]
    if m != m:
      return "undefined"
    return f"{f.format(m)}" + (f" [{f.format(lo)}, {f.format(hi)}]" if lo == lo else "")

  def per_seed(self, get):
    return " | ".join("undefined" if get(r) != get(r) else f"{get(r):.3f}" for r in self.results.values())

  def ph(self, p, m):
    return self.per_seed(lambda r: r[p][m])

  def sc(self, m):
    return self.per_seed(lambda r: r[m])


def _report(config, cfg, s, results, figs, wall_s, cross_seed) -> str:
  c = _Cells(s, results)
  lines = _intro_and_logit_diff(config, cfg, c, wall_s, figs)
  lines += _faithfulness(config, cfg, c)
  lines += _greater_than(config, c)
  lines += retrain.curve_section(results, s, c.pm, figs)
  lines += arms.report_section(config, results, seed_stat)
  lines += _localisation(config, cfg, c, figs, cross_seed)
  lines += _heads(config, c, figs)
  return "\n".join(lines)


def _intro_and_logit_diff(config, cfg, c: _Cells, wall_s, figs) -> list[str]:
  seeds, results = c.seeds, c.results
  lines = [f"# IOI corruption and neuroplasticity: {config.model}", "",
           f"{cfg.arch}, {cfg.n_layers} layers x {cfg.n_heads} heads. Seeds {seeds}; {config.n_train} training "
           f"prompts per phase (train names), {config.n_eval} evaluation prompts per seed (held-out names); poison "
           f"= {config.poison} (fraction {config.poison_fraction}); LoRA r{config.train.lora.rank}/alpha "
           f"{config.train.lora.alpha} on {config.train.lora.targets}, lr {config.train.train.lr}, micro-batch "
           f"{config.train.train.micro_batch}, steps per phase {dataclasses.asdict(config.phase_steps)}, merged after each phase. "
           f"Wall time {wall_s / 60:.1f} min. Mean over seeds [95% t interval, ddof = 1]; per-seed values in the "
           "right-hand columns.", "",
           "## Logit difference and accuracy by phase, next to the paper's GPT-2 small figures", "",
           "GPT-2 small is a different model (12 x 12 heads, the paper's own fine-tuning schedule in epochs); its "
           "figures are quoted for orientation only, not as a like-for-like comparison.", "",
           f"| phase | {config.model} logit diff | accuracy | GPT-2 small logit diff (paper) | GPT-2 small accuracy "
           "(paper) " + c.head, "|---|---|---|---|---|" + "---|" * len(c.seeds)]
  for p in PHASES:
    lines.append(f"| {p} | {c.pm(p + '/logit_diff')} | {c.pm(p + '/accuracy')} | {PAPER['logit_diff'][p]} | "
                 f"{PAPER['accuracy'][p]} | " + " | ".join(f"{r[p]['logit_diff']:.2f} / {r[p]['accuracy']:.2f}"
                                                          for r in results.values()) + " |")
  lines += ["", "Per-seed cells: logit difference / accuracy (share of prompts with logit(IO) > logit(S)). "
            "The ABC prompts' logit difference (IO vs S, names absent): "
            + ", ".join(f"{p} {c.pm(p + '/abc_logit_diff')}" for p in PHASES) + ".", "",
            f"![logit diff by phase]({figs['logit_diff_by_phase']})", ""]
  return lines


def _faithfulness(config, cfg, c: _Cells) -> list[str]:
  k, n_heads = config.top_k, cfg.n_layers * cfg.n_heads
  lines = ["## Circuit faithfulness", "",
            f"Circuit = the top-{k} heads by |exact importance| of that phase; every other head is mean-ablated at "
            f"every position (per-template means over a separate ABC set of {config.abc_per_template} prompts per "
            "base template, disjoint from the evaluation prompts and their counterparts); faithfulness = circuit-only "
            "/ full mean logit difference (a "
            "ratio: it is unstable where the full logit difference is near 0, so the circuit-only logit difference "
            "is given too). The paper's circuits are hand-built path-patching circuits (Wang et al.: 26 heads), not "
            f"a top-{k}. Normalised faithfulness = (F(C) - F(empty)) / (F(M) - F(empty)), F(empty) = every head "
            f"mean-ablated: 1 = the circuit does all the model does, 0 = no more than nothing; undefined where "
            f"|F(M) - F(empty)| < {C.FAITHFULNESS_FLOOR} (the full model does not do the task).", "",
            "| phase | circuit-only logit diff | full logit diff | empty-circuit logit diff | faithfulness | "
            "normalised faithfulness | GPT-2 small faithfulness (paper) " + c.head,
            "|---|---|---|---|---|---|---|" + "---|" * len(c.seeds)]
  for p in PHASES:
    lines.append(f"| {p} | {c.pm(p + '/circuit_logit_diff')} | {c.pm(p + '/logit_diff')} | "
                 f"{c.pm(p + '/empty_logit_diff')} | {c.pm(p + '/faithfulness')} | "
                 f"{c.pm(p + '/faithfulness_normalised')} | {PAPER['faithfulness'][p]} | "
                 f"{c.ph(p, 'faithfulness_normalised')} |")
  lines += ["", "Per-seed cells: normalised faithfulness."]
  if "base/pp_faithfulness_normalised" in c.s:
    lines += discovery.report_section(config.discovery_k, c, PHASES)
  ks = [m.removeprefix("base/faithfulness_k") for m in c.s if m.startswith("base/faithfulness_k")]
  if ks:
    lines += ["", "### Faithfulness by circuit size", "",
              f"The same ablation with the top-k heads of each phase kept, for k in {', '.join(ks)} of {n_heads} "
              "heads (mean [95% t interval] over seeds): how large a final-position circuit has to be to carry the behaviour.",
              "", "| phase | " + " | ".join(f"k = {x}" for x in ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {p} | " + " | ".join(c.pm(f"{p}/faithfulness_k{x}") for x in ks) + " |" for p in PHASES]
  return lines


def _greater_than(config, c: _Cells) -> list[str]:
  lines = []
  if "base/gt_prob_diff" in c.s:
    lines += ["", "## Greater-Than (second task) through the IOI phases", "",
              "Hanna et al. 2023's task on every phase's model (\"The war lasted from the year 1732 to the year 17\"; "
              "probability difference = mass on years above the start year minus mass below, exact over the two "
              f"digit tokens; {config.greater_than_n} prompts per seed). The IOI fine-tuning never sees it, so it "
              "measures how specific the IOI corruption and its repair are. The \"01\" start year is the "
              "corrupted baseline (every year is above it).", "",
              "| phase | prob diff (clean) | prob diff (01-corrupted) " + c.head, "|---|---|---|" + "---|" * len(c.seeds)]
    lines += [f"| {p} | {c.pm(p + '/gt_prob_diff')} | {c.pm(p + '/gt_prob_diff_01')} | {c.ph(p, 'gt_prob_diff')} |"
              for p in PHASES]
    lines += ["", "Per-seed cells: the clean probability difference."]
  return lines


def _localisation(config, cfg, c: _Cells, figs, cross_seed: dict) -> list[str]:
  k, n_heads = config.top_k, cfg.n_layers * cfg.n_heads
  share = lambda v: "undefined" if not v else f"{np.mean(v):.3f} (range {min(v):.3f}-{max(v):.3f}, {len(v)} pairs)"
  lines = ["", "## Localisation and recovery (exact importance maps)", "",
           f"Importance maps are heavy-tailed, so the top-{k} share of ANY change is large (uniform spread would "
           f"give {k / n_heads:.3f}). The poisoning change counts as localised only if its share exceeds the "
           "seed-noise references: base -> clean (a fine-tune on the clean task) and clean -> clean of another "
           "seed (two clean fine-tunes differing in seed and prompts; pairs of seeds, no interval). The circuit "
           "share is the change's share in the earlier phase's top-k circuit, with a one-sided permutation p over "
           "heads (scipy.stats.permutation_test, 9999 resamples): is |Δ| larger in the circuit than in random "
           "heads?", "",
           f"Clean -> clean of another seed: top-{k} share {share(cross_seed['top_k_share'])}; share in clean(a)'s "
           f"circuit {share(cross_seed['circuit_share'])}, permutation p "
           + (", ".join(f"{p:.3g}" for p in cross_seed["circuit_share_p"]) or "undefined (one seed)") + ".", "",
           *baselines.localisation_reading(c, cross_seed), "",
           "| quantity | mean [95% t interval] " + c.head, "|---|---|" + "---|" * len(c.seeds)]
  rows = [(f"top-{k} share of the change base -> clean (seed-noise reference)", "localisation_base_clean"),
          (f"top-{k} share of the poisoning change (clean -> poison)", "localisation_poison"),
          (f"top-{k} share of the retraining change (poison -> retrain)", "localisation_retrain"),
          ("share of base -> clean in the base circuit", "circuit_share_base_clean"),
          ("... permutation p", "circuit_share_base_clean_p"),
          ("share of clean -> poison in the clean circuit", "circuit_share_poison"),
          ("... permutation p", "circuit_share_poison_p"),
          ("share of poison -> retrain in the poisoned circuit", "circuit_share_retrain"),
          ("... permutation p", "circuit_share_retrain_p"),
          ("correlation of importance with the base model's: clean", "recovery_corr_clean"),
          ("... poisoned", "recovery_corr_poison"), ("... retrained", "recovery_corr_retrain"),
          (f"CMAP base -> poisoned at the base top-{k} circuit (END): logit diff", "cmap_circuit_poison"),
          ("... gap closed, (patched - poisoned) / (base - poisoned)", "cmap_circuit_poison_gap_closed"),
          (f"... empirical p among {config.cmap_random_sets} random {k}-head sets", "cmap_circuit_poison_p"),
          (f"CMAP base -> retrained at the base top-{k} circuit (END): logit diff", "cmap_circuit_retrain"),
          ("... gap closed", "cmap_circuit_retrain_gap_closed"),
          (f"... empirical p among {config.cmap_random_sets} random {k}-head sets", "cmap_circuit_retrain_p"),
          ("CMAP base -> poisoned at every head (END; MLPs stay poisoned): logit diff", "cmap_all_heads_poison"),
          ("... gap closed", "cmap_all_heads_poison_gap_closed"),
          ("CMAP base -> retrained at every head (END): logit diff", "cmap_all_heads_retrain"),
          ("... gap closed", "cmap_all_heads_retrain_gap_closed")]
  rows = [(label, key) for label, key in rows if key in c.s]
  # a p-value gets no t interval (it is not a mean effect): its largest value over seeds, every seed's beside it
  mean_col = lambda key: (f"max {max(r[key] for r in c.results.values()):.2g}" if key.endswith("_p") else c.pm(key))
  per_seed = lambda key: (" | ".join(f"{r[key]:.2g}" for r in c.results.values()) if key.endswith("_p")
                          else c.sc(key))
  lines += [f"| {label} | {mean_col(key)} | {per_seed(key)} |" for label, key in rows]
  lines += ["", "Reference logit differences: " + ", ".join(f"{p} {c.pm(p + '/logit_diff')}" for p in PHASES) + ".",
            ""]
  if "cmap_random" in figs:
    lines += ["CMAP at random head sets of the circuit's size (every seed's sets pooled) against CMAP at the base "
              "circuit (one line per seed): the circuit's effect is only a finding where it stands outside this "
              "distribution.", "", f"![CMAP random head sets]({figs['cmap_random']})", ""]
  lines += ["## Head-importance heatmaps [layer, head] per phase", "",
            "Exact activation patching of every head at the final position (END), clean prompts with the ABC donor "
            "(Wang et al.'s direction): drop in the mean logit difference. Heads acting at S2 (duplicate-token, "
            "induction) reach END only through later heads' keys/values at S2 and so do not appear here; see the "
            "head classes.", "", f"![head importance]({figs['head_importance']})", "",
            "Reverse direction (ABC prompts, clean donor): rise of the ABC run's logit difference.", "",
            f"![head restoration]({figs['head_restoration']})", "",
            "Direct logit attribution of each head at END.", "", f"![head DLA]({figs['head_dla']})", "",
            "### Cross-checks", "",
            "| phase | corr(attribution patching, exact) | corr(reverse direction, exact) " + c.head,
            "|---|---|---|" + "---|" * len(c.seeds)]
  return lines


def _heads(config, c: _Cells, figs) -> list[str]:
  lines = []
  for p in PHASES:
    lines.append(f"| {p} | {c.pm(p + '/attribution_corr')} | {c.pm(p + '/restoration_corr')} | "
                 f"{c.ph(p, 'attribution_corr')} |")
  lines += ["", "Per-seed cells: the attribution-patching correlation. Attribution patching (one forward + one "
            "backward, first order) estimates the same final-position patch; it is reported only as a check.", "",
            f"![attribution vs exact]({figs['attribution_vs_exact']})", "",
            "## Head classes (standard criteria) and attention evidence", "",
            f"analysis.ioi.head_classes.classify_heads, at most {config.classes.k} heads per class: name movers = "
            f"largest positive DLA with END->IO attention >= {config.classes.attn_min}; negative name movers = most "
            "negative DLA with the same attention; S-inhibition = heads before the first name mover with END->S2 "
            f"attention >= {config.classes.attn_min} and the largest positive exact importance; induction / "
            f"duplicate-token = largest scores >= {config.classes.rep_min} on repeated random token sequences. "
            "(m/n) = found in m of n seeds.", ""]
  lines += _class_tables(c.results)
  lines += ["", f"![attention evidence]({figs['attention_evidence']})", ""]
  return lines
