"""IOI circuit corruption and neuroplasticity (Chhabra, Zhu, Khalili 2025, protocol; Wang et al. 2022, tools).

    python -m analysis.ioi --config=configs/ioi.py:smollm2 --workdir=runs/<date>-smollm2-ioi

Phases per seed: base -> clean fine-tune (IOI, label = IO) -> poisoned fine-tune -> clean retrain. Each phase is
a LoRA fine-tune (train.loop.train_loop, orbax checkpoints under <workdir>/seed<k>/<phase>/, resumable) merged
into the weights before the next phase. After every phase, on held-out names:

- logit difference logit(IO) - logit(S) and accuracy, per template;
- head importance `[L, H]`: drop in logit difference when a head's output is replaced by its ABC-run value
  (attribution patching of every head; the top-k confirmed by exact patching);
- direct logit attribution per head; circuit = the top-k heads by importance; faithfulness = logit difference
  with every head outside the circuit mean-ablated (ABC means per template) / the model's logit difference;
- localisation of a phase's change: share of sum |delta importance| carried by its top-k heads;
- recovery: correlation of head importance with the base model's; CMAP of the clean-phase model's head outputs
  into the poisoned model at the circuit heads.

Poisoning, our documented reading of the paper (exact rules not public): "subject" relabels the answer to S
(Subject Duplication); "name_moving" prefixes "<C> stayed home." and relabels to the third name C, a name the
IOI circuit does not move.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging


PHASES = ("base", "clean", "poison", "retrain")
PAPER = {"model": "GPT-2 small (Chhabra et al. 2025; Wang et al. 2022)", "base_logit_diff": 3.56,
         "clean_ft_logit_diff": "6.32 -> 26.83 (1-100 epochs)", "poison_logit_diff": "3.55 -> -11.06 (subject, 5 ep.)",
         "faithfulness_clean_ft": "98.4-99.9%", "faithfulness_retrain": "95% / 96%", "base_accuracy": 0.993}


def training_set(tokenizer, n: int, seed: int, names, label: str, fraction: float, max_len: int):
  """IOI fine-tuning sequences: prompt + one answer token, right-padded, loss on the answer only.

  label: "io" (clean), "subject" (answer S) or "name_moving" (prefix "<C> stayed home." and answer C);
  `fraction` of the prompts get the poisoned label, the rest keep IO. Returns a train.data.TokenizedSet.
  """
  from analysis.ioi_data import make_ioi
  from models.tokenizer import pad_id
  from train.data import TokenizedSet
  d = make_ioi(tokenizer, n, seed=seed, names=names)
  rng = np.random.default_rng(seed + 1)
  pid = pad_id(tokenizer)
  toks = np.full((n, max_len), pid, np.int32)
  mask = np.zeros((n, max_len), np.int32)
  loss = np.zeros((n, max_len), np.float32)
  for i in range(n):
    text, answer = d.text[i], int(d.io[i])
    if label != "io" and rng.random() < fraction:
      if label == "subject":
        answer = int(d.s[i])
      elif label == "name_moving":
        used = {tokenizer.decode([int(d.io[i])]).strip(), tokenizer.decode([int(d.s[i])]).strip()}
        third = next(x for x in rng.permutation(list(names)) if x not in used)
        text = f"{third} stayed home. " + text
        answer = tokenizer.encode(" " + third, add_special_tokens=False)[0]
      else:
        raise ValueError(f"poison label must be 'subject' or 'name_moving', got {label!r}")
    ids = tokenizer.encode(text, add_special_tokens=False) + [answer]
    if len(ids) > max_len:
      raise ValueError(f"IOI prompt {i} has {len(ids)} tokens > train.data.max_len={max_len}")
    toks[i, :len(ids)], mask[i, :len(ids)], loss[i, len(ids) - 1] = ids, 1, 1.0
  return TokenizedSet(toks, mask, loss)


def analyze(params, cfg, d, top_k: int, exact_top_k: bool) -> dict:
  """Circuit measurements of one model on IOIPrompts `d` (see module docstring). Returns numpy arrays."""
  import jax.numpy as jnp

  from analysis import circuits as C
  from analysis.ioi_data import ABBA_TEMPLATES, BABA_TEMPLATES
  toks, abc, mask = jnp.asarray(d.tokens), jnp.asarray(d.abc_tokens), jnp.asarray(d.mask)
  io, s = jnp.asarray(d.io), jnp.asarray(d.s)
  dla = C.direct_logit_attribution(params, cfg, toks, mask, io, s)
  ld = np.asarray(dla["total"])
  z_abc = C.head_outputs(params, cfg, abc, mask)
  importance = ld.mean() - np.asarray(C.attribution_patch(params, cfg, toks, mask, z_abc, io, s)).mean(-1)
  order = np.argsort(-importance, axis=None)[:top_k]
  circuit = np.zeros(importance.shape, np.float32)
  circuit.flat[order] = 1
  exact = {}
  if exact_top_k:
    top_l, top_h = np.divmod(order, cfg.n_heads)
    patched = np.asarray(C.patch_each_head(params, cfg, toks, mask, z_abc, io, s,
                                           heads=(jnp.asarray(top_l), jnp.asarray(top_h))))
    exact = {f"{l}.{h}": float(ld.mean() - p.mean()) for l, h, p in zip(top_l, top_h, patched)}
  n_t = len(BABA_TEMPLATES) + len(ABBA_TEMPLATES)
  z_mean = C.template_means(z_abc, jnp.asarray(d.template), n_t)
  kept = np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.asarray(1 - circuit), io, s))
  per_template = {int(t): float(ld[d.template == t].mean()) for t in np.unique(d.template)}
  return {"logit_diff": float(ld.mean()), "accuracy": float((ld > 0).mean()), "per_template": per_template,
          "importance": importance, "dla_heads": np.asarray(dla["heads"]).mean(0), "circuit": circuit,
          "exact_top_k": exact, "faithfulness": float(kept.mean() / ld.mean()) if ld.mean() != 0 else float("nan")}


def localisation(before: np.ndarray, after: np.ndarray, k: int) -> float:
  """Share of sum |after - before| carried by the k heads with the largest |change| (1 = fully localised)."""
  delta = np.abs(np.asarray(after) - np.asarray(before)).ravel()
  total = delta.sum()
  return float(np.sort(delta)[::-1][:k].sum() / total) if total > 0 else float("nan")


def run(config, workdir: str | None = None) -> str:
  """Run every seed's phases and analyses; write metrics.json, figures and report.md. Returns the report path."""
  import jax
  import jax.numpy as jnp

  from analysis import circuits as C
  from analysis.ioi_data import make_ioi, single_token_words, split_names, NAMES
  from analysis.workdir import Workdir, default_workdir, write_json, write_text
  from models.loading import load, load_tokenizer
  from train.adapters import merge_lora
  from train.loop import train_loop

  workdir = workdir or default_workdir(config.model.split("/")[-1].removesuffix(".gguf") + "-ioi")
  wd = Workdir(workdir, config)
  base_params, cfg = load(config.model, dtype=jnp.float32)
  tok = load_tokenizer(config.model)
  names = single_token_words(tok, NAMES)
  train_names, eval_names = split_names(names, config.eval_name_fraction, seed=0)
  results = {}
  for seed in config.seeds:
    ev = make_ioi(tok, config.n_eval, seed=10_000 + seed, names=eval_names)
    params, res, models = base_params, {}, {}
    for phase in PHASES:
      t0 = time.time()
      if phase != "base":
        label = {"clean": "io", "poison": config.poison, "retrain": "io"}[phase]
        ts = training_set(tok, config.n_train, seed * 100 + PHASES.index(phase), train_names, label,
                          config.poison_fraction, config.train.data.max_len)
        tc = config.train.copy_and_resolve_references()
        with tc.unlocked():
          tc.seed = seed
          tc.train.steps = int(config.phase_steps[phase])
        result = train_loop(params, cfg, ts, tc, os.path.join(workdir, f"seed{seed}", phase))
        lora = jax.tree.map(jnp.asarray, jax.device_get(result.state["trainable"]))
        params = merge_lora(params, lora, result.spec.scale)
      models[phase] = params
      res[phase] = analyze(params, cfg, ev, config.top_k, config.exact_top_k)
      logging.info("seed %d %s: logit diff %.3f acc %.3f faithfulness %.3f (%.0fs)", seed, phase,
                   res[phase]["logit_diff"], res[phase]["accuracy"], res[phase]["faithfulness"], time.time() - t0)
      wd.log(seed * 10 + PHASES.index(phase), logit_diff=res[phase]["logit_diff"],
             accuracy=res[phase]["accuracy"], faithfulness=res[phase]["faithfulness"])
    imp = {p: res[p]["importance"] for p in PHASES}
    res["localisation_poison"] = localisation(imp["clean"], imp["poison"], config.top_k)
    res["recovery_corr_poison"] = float(np.corrcoef(imp["poison"].ravel(), imp["base"].ravel())[0, 1])
    res["recovery_corr_retrain"] = float(np.corrcoef(imp["retrain"].ravel(), imp["base"].ravel())[0, 1])
    circuit = jnp.asarray(res["clean"]["circuit"])
    cmap = C.cross_model_patch(models["poison"], models["clean"], cfg, jnp.asarray(ev.tokens), jnp.asarray(ev.mask),
                               circuit, jnp.asarray(ev.io), jnp.asarray(ev.s))
    res["cmap_clean_into_poison"] = float(np.asarray(cmap).mean())
    results[seed] = res
  summary = _summarise(results, config)
  write_json(wd.file("metrics.json"), {"summary": summary, "per_seed": {
      str(k): r for k, r in results.items()}, "paper": PAPER})
  figs = _figures(wd, results, cfg, config)
  write_text(wd.file("report.md"), _report(config, cfg, summary, figs, workdir))
  wd.close()
  return wd.file("report.md")


def _summarise(results: dict, config) -> dict:
  out = {}
  for p in PHASES:
    for m in ("logit_diff", "accuracy", "faithfulness"):
      v = np.array([r[p][m] for r in results.values()])
      out[f"{p}/{m}"] = (float(v.mean()), float(v.std()))
  for m in ("localisation_poison", "recovery_corr_poison", "recovery_corr_retrain", "cmap_clean_into_poison"):
    v = np.array([r[m] for r in results.values()])
    out[m] = (float(v.mean()), float(v.std()))
  return out


def _figures(wd, results, cfg, config) -> dict:
  from analysis import plots
  import matplotlib.pyplot as plt
  mean_imp = {p: np.mean([r[p]["importance"] for r in results.values()], 0) for p in PHASES}
  fig = plots.head_heatmaps(mean_imp, f"{config.model}: head importance (drop in logit diff, ABC patch)")
  paths = {"importance": os.path.relpath(wd.save_figure(fig, "head_importance"), wd.path)}
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
  for k, r in results.items():
    ax.plot(range(len(PHASES)), [r[p]["logit_diff"] for p in PHASES], "o-", alpha=0.7, label=f"seed {k}")
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xticks=range(len(PHASES)), xticklabels=PHASES, ylabel="logit diff  logit(IO) - logit(S)",
         title=f"IOI by phase ({config.poison} poisoning)")
  ax.legend(frameon=False, fontsize=8)
  paths["phases"] = os.path.relpath(wd.save_figure(fig, "logit_diff_by_phase"), wd.path)
  plt.close(fig)
  return paths


def _report(config, cfg, s, figs, workdir) -> str:
  pm = lambda key, f="{:.3f}": f"{f.format(s[key][0])} ± {f.format(s[key][1])}"
  lines = [f"# IOI corruption and neuroplasticity: {config.model}", "",
           f"{cfg.arch}, {cfg.n_layers} layers x {cfg.n_heads} heads. Seeds {list(config.seeds)}; {config.n_train} "
           f"training prompts per phase (train names), {config.n_eval} evaluation prompts (held-out names); poison = "
           f"{config.poison} (fraction {config.poison_fraction}); LoRA r{config.train.lora.rank}/alpha "
           f"{config.train.lora.alpha}, steps per phase {dict(config.phase_steps)}.", "",
           "| phase | logit diff | accuracy | faithfulness (top-k circuit) |", "|---|---|---|---|"]
  for p in PHASES:
    lines.append(f"| {p} | {pm(p + '/logit_diff')} | {pm(p + '/accuracy')} | {pm(p + '/faithfulness')} |")
  lines += ["", f"- localisation of the poisoning change (share carried by the top-{config.top_k} heads): "
            f"{pm('localisation_poison')}",
            f"- correlation of head importance with the base model: poisoned {pm('recovery_corr_poison')}, "
            f"retrained {pm('recovery_corr_retrain')}",
            f"- CMAP (clean-phase head outputs into the poisoned model at the clean circuit): logit diff "
            f"{pm('cmap_clean_into_poison')} (poisoned alone: {pm('poison/logit_diff')})", "",
            f"![head importance]({figs['importance']})", "", f"![logit diff by phase]({figs['phases']})", "",
            "## The paper's figures (GPT-2 small, a different model; for orientation only)", "",
            "| quantity | GPT-2 small (paper) |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in PAPER.items() if k != "model"]
  lines += ["", "Mean ± std over seeds. Importance = mean drop in logit difference when one head's output is "
            "replaced by its value on the ABC prompt (attribution patching; top-k confirmed exactly in metrics.json).",
            ""]
  return "\n".join(lines)


if __name__ == "__main__":
  from analysis.workdir import run_app
  run_app(run, "configs/ioi.py", "Run directory (default runs/<date>-<model>-ioi).")
