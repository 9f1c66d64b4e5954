"""Poison arms (issue 19): the poisoned and retraining phases repeated from each seed's clean model for other poison
variants and fractions (`poison_arms`, e.g. "subject:0.25", "name_moving:1.0"), so that "poisoning corrupts the
circuit and retraining restores it" is read across the poison dose and both variants, not at task inversion
(fraction 1.0 of the subject variant) alone.

Each arm trains a LoRA on the arm's labels from the seed's merged clean model (study._train_phase, checkpoints
under `<workdir>/arms/<arm>/seed<k>/`), then a clean retraining LoRA from it, and measures on the seed's held-out
prompts (retrain.importance_map): logit difference (nats) and accuracy after each phase; the top-k share of the
poisoning change; the correlation of the retrained importance map with the base model's. The full per-phase
analysis runs only on the primary arm (config.poison / poison_fraction).
"""
from __future__ import annotations

import dataclasses
import os

from analysis.ioi import baselines as B
from analysis.ioi.config import parse_arm
from analysis.ioi.retrain import importance_map

ARM_KEYS = ("poison_logit_diff", "poison_accuracy", "retrain_logit_diff", "retrain_accuracy", "localisation_poison",
            "recovery_corr_retrain")


def run_arms(clean, cfg, tok, config, seed: int, train_names, ev, base_res: dict, clean_res: dict, workdir: str,
             train_phase) -> dict:
  """Every arm of config.poison_arms for one seed. clean: the seed's merged clean params; base_res / clean_res:
  the seed's `analyze` of base and clean (importance maps); train_phase: study._train_phase. Returns
  {arm spec: {ARM_KEYS...}}."""
  out = {}
  for spec in config.poison_arms:
    variant, fraction = parse_arm(spec)
    arm = dataclasses.replace(config, poison=variant, poison_fraction=fraction)
    wd = os.path.join(workdir, "arms", f"{variant}_{fraction:g}")
    poisoned, _ = train_phase(clean, cfg, tok, arm, "poison", seed, train_names, wd)
    ld_p, acc_p, imp_p = importance_map(poisoned, cfg, ev)
    retrained, _ = train_phase(poisoned, cfg, tok, arm, "retrain", seed, train_names, wd)
    ld_r, acc_r, imp_r = importance_map(retrained, cfg, ev)
    out[spec] = {"poison_logit_diff": ld_p, "poison_accuracy": acc_p, "retrain_logit_diff": ld_r,
                 "retrain_accuracy": acc_r,
                 "localisation_poison": B.top_k_share(clean_res["importance"], imp_p, config.top_k),
                 "recovery_corr_retrain": B.map_corr(imp_r, base_res["importance"])}
  return out


def report_section(config, results: dict, stat) -> list[str]:
  """The report's table: per arm (the primary first), mean [95% t interval] over seeds of ARM_KEYS (stat:
  report.seed_stat)."""
  first = next(iter(results.values()))
  if not first.get("arms"):
    return []
  prim = f"{config.poison}:{config.poison_fraction:g}"
  rows = {prim + " (primary)": [{"poison_logit_diff": r["poison"]["logit_diff"], "poison_accuracy":
                                 r["poison"]["accuracy"], "retrain_logit_diff": r["retrain"]["logit_diff"],
                                 "retrain_accuracy": r["retrain"]["accuracy"],
                                 "localisation_poison": r["localisation_poison"],
                                 "recovery_corr_retrain": r["recovery_corr_retrain"]} for r in results.values()]}
  rows.update({spec: [r["arms"][spec] for r in results.values()] for spec in first["arms"]})

  def cell(vals):
    m, _, lo, hi = stat(vals)
    return "undefined" if m != m else f"{m:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo == lo else "")
  lines = ["", "## Poison variant and fraction", "",
           f"The poisoned and retraining phases repeated from every seed's clean model per arm (variant:fraction; "
           f"{len(results)} seeds, mean [95% t interval]). The top-{config.top_k} share and the retrained "
           "importance correlation with the base model are read as in the localisation section.", "",
           "| arm | poisoned logit diff | poisoned accuracy | retrained logit diff | retrained accuracy | "
           f"top-{config.top_k} share of the poisoning change | corr(retrained importance, base) |",
           "|---|---|---|---|---|---|---|"]
  for spec, per_seed in rows.items():
    lines.append(f"| {spec} | " + " | ".join(cell([x[k] for x in per_seed]) for k in ARM_KEYS) + " |")
  return lines
