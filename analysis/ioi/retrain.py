"""Neuroplasticity measured, not assumed (issue 19): the retraining phase's curve and the study's verdict.

The clean retraining phase saves a checkpoint every `retrain_curve_every` steps; `retrain_curve` reads every one
back, merges its LoRA into the poisoned weights and measures on the held-out evaluation prompts: the logit
difference logit(IO) - logit(S) (nats) and accuracy, the exact final-position importance map's correlation with
the base model's, and the overlap (Jaccard) of its top-k circuit with the base circuit. `verdict` turns the
summary into plain sentences with the criteria stated.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from analysis.ioi import baselines as B
from analysis.ioi import circuits as C
from models.transformer import forward_jit
from train.adapters import merge_lora
from train.checkpoint import Checkpointer

BEHAVIOUR_FRACTION = 0.5   # behaviour recovered: the retrained logit diff's CI lies above this share of the base's
MECHANISM_CORR = 0.5       # mechanism recovered: the importance correlation's CI lies above this


def importance_map(params, cfg, d) -> tuple[float, float, np.ndarray]:
  """(mean logit difference, accuracy, exact importance `[L, H]`: drop of the mean logit difference when one
  head's END output is patched from the ABC run) of one model on IOIPrompts `d` (as study.analyze)."""
  toks, abc, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.abc_tokens, d.mask, d.io, d.s))
  out, _ = forward_jit(params, toks, cfg, attention_mask=mask, logits="last")
  ld = np.asarray(C.logit_diff(out, io, s))
  z_abc = C.head_outputs(params, cfg, abc, mask)
  noised = np.asarray(C.patch_each_head(params, cfg, toks, mask, z_abc, io, s, method="last")).mean(-1)
  return float(ld.mean()), float((ld > 0).mean()), float(ld.mean()) - noised


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a) > 0, np.asarray(b) > 0
  union = (a | b).sum()
  return float((a & b).sum() / union) if union else float("nan")


def retrain_curve(poisoned, cfg, d, workdir: str, scale: float, base_importance: np.ndarray, base_circuit,
                  top_k: int, top_k_mask) -> list[dict]:
  """One point per saved retraining checkpoint under `<workdir>/checkpoints` (ascending steps): {"step",
  "logit_diff", "accuracy", "importance_corr_base", "circuit_jaccard_base"}. poisoned: the merged poisoned
  weights the retraining LoRA starts from; scale: its LoRA scale (alpha / rank); top_k_mask: study.top_k_mask."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
  points = []
  try:
    for step in sorted(ckpt.manager.all_steps()):
      state, _ = ckpt.restore(step)
      lora = jax.tree.map(jnp.asarray, state["trainable"])
      ld, acc, imp = importance_map(merge_lora(poisoned, lora, scale), cfg, d)
      points.append({"step": int(step), "logit_diff": ld, "accuracy": acc,
                     "importance_corr_base": B.map_corr(imp, base_importance),
                     "circuit_jaccard_base": _jaccard(top_k_mask(imp, top_k), base_circuit)})
  finally:
    ckpt.close()
  return points


def verdict(summary: dict, fmt) -> list[str]:
  """Plain sentences: did retraining bring the behaviour back, and the mechanism? summary: report._summarise
  (mean, sd, lo, hi); fmt: the report's cell formatter (mean [CI])."""
  base, re_ld = summary["base/logit_diff"], summary["retrain/logit_diff"]
  corr, corr_clean = summary["recovery_corr_retrain"], summary["recovery_corr_clean"]
  behaviour = re_ld[2] == re_ld[2] and re_ld[2] > BEHAVIOUR_FRACTION * base[0]
  mechanism = corr[2] == corr[2] and corr[2] > MECHANISM_CORR
  return [f"- Behaviour: the retrained model's logit difference is {fmt('retrain/logit_diff')} against the base "
          f"model's {fmt('base/logit_diff')}; criterion: the interval lies above {BEHAVIOUR_FRACTION:g} x the "
          f"base's. The behaviour {'came back' if behaviour else 'did NOT come back'}.",
          f"- Mechanism: the correlation of the retrained importance map with the base model's is "
          f"{fmt('recovery_corr_retrain')} (after the clean fine-tune: {fmt('recovery_corr_clean')}); criterion: "
          f"the interval lies above {MECHANISM_CORR:g}. The base mechanism {'came back' if mechanism else 'did NOT come back'}"
          + (" by this measure." if corr_clean[0] == corr_clean[0] else ".")]


def curve_figure(plt, results: dict, base_ld: dict):
  """Logit difference and importance correlation with the base model against retraining steps, one line per
  seed (step 0 = the poisoned model); base_ld: seed -> the base model's logit difference (dotted)."""
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
  for i, (k, r) in enumerate(results.items()):
    pts = [{"step": 0, "logit_diff": r["poison"]["logit_diff"], "importance_corr_base": r["recovery_corr_poison"]}]
    pts += r["retrain_curve"]
    steps = [p["step"] for p in pts]
    axes[0].plot(steps, [p["logit_diff"] for p in pts], "o-", color=f"C{i}", label=f"seed {k}")
    axes[0].axhline(base_ld[k], color=f"C{i}", ls=":", lw=1)
    axes[1].plot(steps, [p["importance_corr_base"] for p in pts], "o-", color=f"C{i}")
  axes[0].set(xlabel="retraining step", ylabel="logit diff (dotted: base model)", title="behaviour")
  axes[1].set(xlabel="retraining step", ylabel="corr(importance, base importance)", title="mechanism", ylim=(-1, 1))
  axes[0].legend(frameon=False, fontsize=7)
  return fig


def curve_section(results: dict, summary: dict, fmt, figs: dict) -> list[str]:
  """The report's neuroplasticity section: the curve table (mean over seeds at each step), figure and verdict
  (fmt(key) formats a summary cell; results[seed]["retrain_curve"])."""
  first = next(iter(results.values()))
  if not first.get("retrain_curve"):
    return []
  steps = [p["step"] for p in first["retrain_curve"]]
  mean = lambda key, i: np.nanmean([r["retrain_curve"][i][key] for r in results.values()])
  lines = ["", "## Neuroplasticity: the retraining curve", "",
           f"Clean retraining from the poisoned model, a checkpoint every {steps[0]} steps up to the step budget "
           f"({steps[-1]}); at each, on the held-out prompts: logit difference, accuracy, the exact importance map's "
           "correlation with the base model's and the Jaccard overlap of its top-k circuit with the base circuit "
           f"(mean over {len(results)} seeds; step 0 is the poisoned model).", "",
           "| step | logit diff | accuracy | corr(importance, base) | circuit overlap with base |", "|---|---|---|---|---|"]
  for i, st in enumerate(steps):
    lines.append(f"| {st} | {mean('logit_diff', i):.3f} | {mean('accuracy', i):.3f} | "
                 f"{mean('importance_corr_base', i):.3f} | {mean('circuit_jaccard_base', i):.3f} |")
  last = [r["retrain_curve"][-1]["logit_diff"] - r["retrain_curve"][-2]["logit_diff"] for r in results.values()
          if len(r["retrain_curve"]) > 1]
  if last:
    lines += ["", f"Change of the logit difference over the last interval: mean {np.mean(last):+.3f} nats "
              f"({'still improving' if np.mean(last) > 0.05 else 'no longer improving'} at the budget; threshold "
              "0.05 nats)."]
  lines += ["", f"![retrain curve]({figs['retrain_curve']})", "", "### Verdict", ""] + verdict(summary, fmt)
  return lines
