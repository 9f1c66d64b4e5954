"""IOI circuit corruption and neuroplasticity (Chhabra, Zhu, Khalili 2025, protocol; Wang et al. 2022, tools).

    python -m analysis.ioi --config=configs/ioi.py:smollm2 --workdir=runs/<date>-smollm2-ioi

Phases per seed: base -> clean fine-tune (IOI, label = IO) -> poisoned fine-tune -> clean retrain. Each phase is
a LoRA fine-tune (train.loop.train_loop, orbax checkpoints under <workdir>/seed<k>/<phase>/, resumable) merged
into the weights before the next phase. After every phase, on held-out names (`analyze`):

- logit difference logit(IO) - logit(S) and accuracy, per template;
- head importance `[L, H]`, exact: drop in the mean logit difference when one head's output z at the final
  position is replaced by its value on the ABC prompt (clean run, corrupted donor: Wang et al.'s direction), for
  every head (circuits.patch_each_head(method="last")); restoration `[L, H]`, the reverse direction, exact too:
  rise of the ABC run's logit difference when one head's final-position z is replaced by its clean value;
- attribution patching of the same final-position patch, only as a cross-check: its correlation with the exact
  importance;
- direct logit attribution per head; circuit = the top-k heads by |importance| (negative heads included, as Wang
  et al.'s negative name movers); faithfulness = logit difference with every head outside the circuit
  mean-ablated at every position (ABC means per template) / the model's logit difference;
- faithfulness by circuit size (top-k heads kept for every k in config.faithfulness_ks);
- the second task, Greater-Than (analysis.greater_than, Hanna et al. 2023): its probability difference on clean
  and "01"-corrupted prompts, which the IOI fine-tuning never trains on;
- head classes by the standard criteria (analysis.head_classes.classify_heads) with their attention evidence:
  name movers and negative name movers by direct logit attribution and END->IO attention, S-inhibition by
  END->S2 attention and a positive exact importance before the first name mover, induction and duplicate-token
  heads by repeated random sequences.

Across phases, from the exact maps (`compare_phases`): localisation of a phase's change (share of
sum |delta importance| carried by its top-k heads); recovery: correlation of each phase's importance with the
base model's, and CMAP of the base model's final-position head outputs into the poisoned / retrained model at
the base circuit (and at every head, the ceiling of what head outputs alone can restore).

Final-position patching sees heads through what they write at END (name movers, S-inhibition); heads acting at
S2 (duplicate-token, induction) work through later heads' keys and values there, so they show up in the head
classes and in faithfulness (which ablates every position), not in the importance map.

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


def _corr(a, b) -> float:
  """Pearson correlation of two maps (nan if either is constant)."""
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
  """0/1 float32 mask of the k entries of `scores` `[L, H]` with the largest |score|."""
  out = np.zeros(np.shape(scores), np.float32)
  out.flat[np.argsort(-np.abs(np.asarray(scores)), axis=None)[:k]] = 1
  return out


def _end_mask(tokens):
  """`[N, S]` float32 0/1 mask of the final position (left padding: every prompt's END)."""
  import jax.numpy as jnp
  return jnp.zeros(tokens.shape, jnp.float32).at[:, -1].set(1.0)


def analyze(params, cfg, d, top_k: int, key, classes: dict, ks: tuple[int, ...] = (), gt=None) -> dict:
  """Circuit measurements of one model on IOIPrompts `d` (see module docstring). Returns numpy arrays.

  key: PRNG key of the repeated random sequences (induction / duplicate-token scores); classes: keyword
  arguments of head_classes.classify_heads (k, attn_min, rep_min). ks: circuit sizes for the faithfulness curve
  ("faithfulness_k<k>": top-k heads by |importance| kept, every other head mean-ablated). gt: optional
  greater_than.GreaterThanPrompts, the second task: "gt_prob_diff" / "gt_prob_diff_01" = mean Greater-Than
  probability difference on its clean / "01"-corrupted prompts (Hanna et al. 2023).
  """
  import jax.numpy as jnp

  from analysis import circuits as C
  from analysis import head_classes as HC
  from analysis.ioi_data import ABBA_TEMPLATES, BABA_TEMPLATES
  from models.transformer import forward_jit
  toks, abc, mask = jnp.asarray(d.tokens), jnp.asarray(d.abc_tokens), jnp.asarray(d.mask)
  io, s = jnp.asarray(d.io), jnp.asarray(d.s)
  logits, acts = forward_jit(params, toks, cfg, attention_mask=mask, capture=("heads",), logits="last")
  logits_abc, acts_abc = forward_jit(params, abc, cfg, attention_mask=mask, capture=("heads",), logits="last")
  z, z_abc = acts["heads"], acts_abc["heads"]
  ld, ld_abc = np.asarray(C.logit_diff(logits, io, s)), np.asarray(C.logit_diff(logits_abc, io, s))
  noised = np.asarray(C.patch_each_head(params, cfg, toks, mask, z_abc, io, s, method="last")).mean(-1)
  denoised = np.asarray(C.patch_each_head(params, cfg, abc, mask, z, io, s, method="last")).mean(-1)
  importance, restoration = ld.mean() - noised, denoised - ld_abc.mean()
  attribution = ld.mean() - np.asarray(C.attribution_patch(params, cfg, toks, mask, z_abc, io, s,
                                                           pos_mask=_end_mask(toks))).mean(-1)
  dla = np.asarray(C.direct_logit_attribution(params, cfg, toks, mask, io, s)["heads"]).mean(0)
  circuit = top_k_mask(importance, top_k)
  n_t = len(BABA_TEMPLATES) + len(ABBA_TEMPLATES)
  z_mean = C.template_means(z_abc, jnp.asarray(d.template), n_t)
  kept = np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.asarray(1 - circuit), io, s))
  by_k = {}
  for kk in ks:
    kept_k = float(np.asarray(C.knockout(params, cfg, toks, mask, z_mean,
                                         jnp.asarray(1 - top_k_mask(importance, kk)), io, s)).mean())
    by_k[f"faithfulness_k{kk}"] = kept_k / float(ld.mean()) if ld.mean() != 0 else float("nan")
  if gt is not None:
    from analysis.greater_than import prob_diff
    gt_args = [jnp.asarray(x) for x in (gt.mask, gt.yy, gt.digit_ids)]
    by_k["gt_prob_diff"] = float(np.asarray(prob_diff(params, cfg, jnp.asarray(gt.tokens), *gt_args)).mean())
    by_k["gt_prob_diff_01"] = float(np.asarray(prob_diff(params, cfg, jnp.asarray(gt.corrupt_tokens),
                                                         *gt_args)).mean())
  pos = (jnp.asarray(x) for x in (d.pos_io, d.pos_s1, d.pos_s2, d.pos_end))
  attention = {k: np.asarray(v) for k, v in HC.ioi_attention(params, cfg, toks, mask, *pos).items()}
  attention.update({k: np.asarray(v) for k, v in HC.repeated_sequence_scores(params, cfg, key).items()})
  # S-inhibition: END->S2 attention and a positive exact effect at END (which reaches the name movers' queries)
  s_inhibition = np.where((attention["end_to_s2"] >= classes["attn_min"]) & (importance > 0), importance, -np.inf)
  found = HC.classify_heads(dla, attention, attention, s_inhibition_effect=s_inhibition,
                            **classes)
  per_template = {int(t): float(ld[d.template == t].mean()) for t in np.unique(d.template)}
  return {"logit_diff": float(ld.mean()), "accuracy": float((ld > 0).mean()), "per_template": per_template,
          "abc_logit_diff": float(ld_abc.mean()), "importance": importance, "restoration": restoration,
          "attribution": attribution, "attribution_corr": _corr(attribution, importance),
          "restoration_corr": _corr(restoration, importance), "dla_heads": dla, "circuit": circuit,
          "circuit_logit_diff": float(kept.mean()),
          "faithfulness": float(kept.mean() / ld.mean()) if ld.mean() != 0 else float("nan"),
          "attention": attention, "classes": {c: [list(lh) for lh in found[c]] for c in CLASSES}, **by_k}


def localisation(before: np.ndarray, after: np.ndarray, k: int) -> float:
  """Share of sum |after - before| carried by the k heads with the largest |change| (1 = fully localised)."""
  delta = np.abs(np.asarray(after) - np.asarray(before)).ravel()
  total = delta.sum()
  return float(np.sort(delta)[::-1][:k].sum() / total) if total > 0 else float("nan")


def compare_phases(models: dict, res: dict, cfg, d, top_k: int) -> dict:
  """One seed's cross-phase numbers from the exact importance maps (see module docstring).

  models / res: phase -> merged params / `analyze` output. The gap closed by CMAP is
  (patched - phase) / (base - phase) of the mean logit difference (1 = back to the base model).
  """
  import jax.numpy as jnp

  from analysis import circuits as C
  imp = {p: res[p]["importance"] for p in PHASES}
  out = {"localisation_poison": localisation(imp["clean"], imp["poison"], top_k),
         "localisation_retrain": localisation(imp["poison"], imp["retrain"], top_k)}
  out.update({f"recovery_corr_{p}": _corr(imp[p], imp["base"]) for p in PHASES[1:]})
  toks, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.mask, d.io, d.s))
  base = res["base"]["logit_diff"]
  for heads, tag in ((res["base"]["circuit"], "circuit"), (np.ones_like(imp["base"]), "all_heads")):
    for p in ("poison", "retrain"):
      ld = float(np.asarray(C.cross_model_patch(models[p], models["base"], cfg, toks, mask, jnp.asarray(heads),
                                                io, s, pos_mask=_end_mask(toks))).mean())
      gap = base - res[p]["logit_diff"]
      out[f"cmap_{tag}_{p}"] = ld
      out[f"cmap_{tag}_{p}_gap_closed"] = (ld - res[p]["logit_diff"]) / gap if abs(gap) > 1e-6 else float("nan")
  return out


def run(config, workdir: str | None = None) -> str:
  """Run every seed's phases and analyses; write metrics.json, figures and report.md. Returns the report path."""
  import jax
  import jax.numpy as jnp

  from analysis.greater_than import make_greater_than
  from analysis.ioi_data import make_ioi, single_token_words, split_names, NAMES
  from train.rundir import Workdir, default_workdir
  from models.loading import load, load_tokenizer
  from train.adapters import merge_lora
  from train.loop import train_loop

  t_start = time.time()
  workdir = workdir or default_workdir(config.model.split("/")[-1].removesuffix(".gguf") + "-ioi")
  wd = Workdir(workdir, config)
  base_params, cfg = load(config.model, dtype=jnp.float32)
  tok = load_tokenizer(config.model)
  names = single_token_words(tok, NAMES)
  train_names, eval_names = split_names(names, config.eval_name_fraction, seed=0)
  results = {}
  for seed in config.seeds:
    ev = make_ioi(tok, config.n_eval, seed=10_000 + seed, names=eval_names)
    gt = None
    if config.greater_than_n:
      try:
        gt = make_greater_than(tok, int(config.greater_than_n), seed=20_000 + seed)
      except ValueError as e:                   # a tokenizer without single-digit tokens
        logging.warning("Greater-Than skipped: %s", e)
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
      t1 = time.time()
      models[phase] = params
      res[phase] = analyze(params, cfg, ev, config.top_k, jax.random.key(seed), dict(config.classes),
                           tuple(config.faithfulness_ks), gt)
      res[phase]["train_s"], res[phase]["analysis_s"] = t1 - t0, time.time() - t1
      logging.info("seed %d %s: logit diff %.3f acc %.3f faithfulness %.3f attribution corr %.3f "
                   "(train %.0fs, analysis %.0fs)", seed, phase, res[phase]["logit_diff"], res[phase]["accuracy"],
                   res[phase]["faithfulness"], res[phase]["attribution_corr"], t1 - t0, time.time() - t1)
      wd.log(seed * 10 + PHASES.index(phase), logit_diff=res[phase]["logit_diff"],
             accuracy=res[phase]["accuracy"], faithfulness=res[phase]["faithfulness"])
    res.update(compare_phases(models, res, cfg, ev, config.top_k))
    results[seed] = res
  report = write_outputs(wd, results, cfg, config, time.time() - t_start)
  wd.close()
  return report


SCALARS = ("localisation_poison", "localisation_retrain", "recovery_corr_clean", "recovery_corr_poison",
           "recovery_corr_retrain", "cmap_circuit_poison", "cmap_circuit_poison_gap_closed", "cmap_circuit_retrain",
           "cmap_circuit_retrain_gap_closed", "cmap_all_heads_poison", "cmap_all_heads_poison_gap_closed",
           "cmap_all_heads_retrain", "cmap_all_heads_retrain_gap_closed")
PHASE_SCALARS = ("logit_diff", "accuracy", "circuit_logit_diff", "faithfulness", "abc_logit_diff", "attribution_corr",
                 "restoration_corr")


def write_outputs(wd, results: dict, cfg, config, wall_s: float) -> str:
  """metrics.json, figures/ and report.md of a run (results: seed -> phases' `analyze` + `compare_phases`).
  Returns the report path."""
  from train.rundir import write_json, write_text
  summary = _summarise(results)
  write_json(wd.file("metrics.json"), {"summary": summary, "wall_s": wall_s, "paper": PAPER,
                                       "per_seed": {str(k): r for k, r in results.items()}})
  figs = _figures(wd, results, config)
  write_text(wd.file("report.md"), _report(config, cfg, summary, results, figs, wall_s))
  return wd.file("report.md")


def _summarise(results: dict) -> dict:
  """(mean, std) over seeds of every per-phase and cross-phase scalar."""
  stat = lambda v: (float(np.mean(v)), float(np.std(v)))
  first = next(iter(results.values()))
  extra = lambda p: [m for m in first[p] if m.startswith(("faithfulness_k", "gt_prob_diff"))]
  out = {f"{p}/{m}": stat([r[p][m] for r in results.values()]) for p in PHASES
         for m in PHASE_SCALARS + tuple(extra(p))}
  out.update({m: stat([r[m] for r in results.values()]) for m in SCALARS})
  return out


def _mean_map(results: dict, phase: str, key: str, sub: str | None = None) -> np.ndarray:
  return np.mean([r[phase][key] if sub is None else r[phase][key][sub] for r in results.values()], 0)


def _figures(wd, results, config) -> dict:
  import matplotlib.pyplot as plt

  from analysis import plots
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


def _report(config, cfg, s, results, figs, wall_s) -> str:
  pm = lambda key, f="{:.3f}": f"{f.format(s[key][0])} ± {f.format(s[key][1])}"
  seeds = list(results)
  per_seed = lambda get: " | ".join(f"{get(r):.3f}" for r in results.values())
  k, n_heads = config.top_k, cfg.n_layers * cfg.n_heads
  ph = lambda p, m: per_seed(lambda r: r[p][m])
  sc = lambda m: per_seed(lambda r: r[m])
  head = "| " + " | ".join(f"seed {x}" for x in seeds) + " |"
  lines = [f"# IOI corruption and neuroplasticity: {config.model}", "",
           f"{cfg.arch}, {cfg.n_layers} layers x {cfg.n_heads} heads. Seeds {seeds}; {config.n_train} training "
           f"prompts per phase (train names), {config.n_eval} evaluation prompts per seed (held-out names); poison "
           f"= {config.poison} (fraction {config.poison_fraction}); LoRA r{config.train.lora.rank}/alpha "
           f"{config.train.lora.alpha} on {config.train.lora.targets}, lr {config.train.train.lr}, micro-batch "
           f"{config.train.train.micro_batch}, steps per phase {dict(config.phase_steps)}, merged after each phase. "
           f"Wall time {wall_s / 60:.1f} min. Mean ± std over seeds; per-seed values in the right-hand columns.", "",
           "## Logit difference and accuracy by phase, next to the paper's GPT-2 small figures", "",
           "GPT-2 small is a different model (12 x 12 heads, the paper's own fine-tuning schedule in epochs); its "
           "figures are quoted for orientation only, not as a like-for-like comparison.", "",
           f"| phase | {config.model} logit diff | accuracy | GPT-2 small logit diff (paper) | GPT-2 small accuracy "
           "(paper) " + head, "|---|---|---|---|---|" + "---|" * len(seeds)]
  for p in PHASES:
    lines.append(f"| {p} | {pm(p + '/logit_diff')} | {pm(p + '/accuracy')} | {PAPER['logit_diff'][p]} | "
                 f"{PAPER['accuracy'][p]} | " + " | ".join(f"{r[p]['logit_diff']:.2f} / {r[p]['accuracy']:.2f}"
                                                          for r in results.values()) + " |")
  lines += ["", "Per-seed cells: logit difference / accuracy (share of prompts with logit(IO) > logit(S)). "
            "The ABC prompts' logit difference (IO vs S, names absent): "
            + ", ".join(f"{p} {pm(p + '/abc_logit_diff')}" for p in PHASES) + ".", "",
            f"![logit diff by phase]({figs['logit_diff_by_phase']})", "",
            "## Circuit faithfulness", "",
            f"Circuit = the top-{k} heads by |exact importance| of that phase; every other head is mean-ablated at "
            "every position (ABC means per template); faithfulness = circuit-only / full mean logit difference (a "
            "ratio: it is unstable where the full logit difference is near 0, so the circuit-only logit difference "
            "is given too). The paper's circuits are hand-built path-patching circuits (Wang et al.: 26 heads), not "
            f"a top-{k}.", "",
            "| phase | circuit-only logit diff | full logit diff | faithfulness | GPT-2 small faithfulness (paper) "
            + head, "|---|---|---|---|---|" + "---|" * len(seeds)]
  for p in PHASES:
    lines.append(f"| {p} | {pm(p + '/circuit_logit_diff')} | {pm(p + '/logit_diff')} | {pm(p + '/faithfulness')} | "
                 f"{PAPER['faithfulness'][p]} | {ph(p, 'faithfulness')} |")
  lines += ["", "Per-seed cells: faithfulness."]
  ks = [m.removeprefix("base/faithfulness_k") for m in s if m.startswith("base/faithfulness_k")]
  if ks:
    lines += ["", "### Faithfulness by circuit size", "",
              f"The same ablation with the top-k heads of each phase kept, for k in {', '.join(ks)} of {n_heads} "
              "heads (mean ± std over seeds): how large a final-position circuit has to be to carry the behaviour.",
              "", "| phase | " + " | ".join(f"k = {x}" for x in ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {p} | " + " | ".join(pm(f"{p}/faithfulness_k{x}") for x in ks) + " |" for p in PHASES]
  if "base/gt_prob_diff" in s:
    lines += ["", "## Greater-Than (second task) through the IOI phases", "",
              "Hanna et al. 2023's task on every phase's model (\"The war lasted from the year 1732 to the year 17\"; "
              "probability difference = mass on years above the start year minus mass below, exact over the two "
              f"digit tokens; {config.greater_than_n} prompts per seed). The IOI fine-tuning never sees it, so it "
              "measures how specific the IOI corruption and its repair are. The \"01\" start year is the "
              "corrupted baseline (every year is above it).", "",
              "| phase | prob diff (clean) | prob diff (01-corrupted) " + head, "|---|---|---|" + "---|" * len(seeds)]
    lines += [f"| {p} | {pm(p + '/gt_prob_diff')} | {pm(p + '/gt_prob_diff_01')} | {ph(p, 'gt_prob_diff')} |"
              for p in PHASES]
    lines += ["", "Per-seed cells: the clean probability difference."]
  lines += ["", "## Localisation and recovery (exact importance maps)", "",
            "| quantity | mean ± std " + head, "|---|---|" + "---|" * len(seeds)]
  rows = [(f"localisation of the poisoning change (share of sum abs Δ importance, clean -> poison, in its "
           f"top-{k} heads; uniform spread would give {k / n_heads:.3f})", "localisation_poison"),
          (f"localisation of the retraining change (poison -> retrain, top-{k})", "localisation_retrain"),
          ("correlation of importance with the base model's: clean", "recovery_corr_clean"),
          ("... poisoned", "recovery_corr_poison"), ("... retrained", "recovery_corr_retrain"),
          (f"CMAP base -> poisoned at the base top-{k} circuit (END): logit diff", "cmap_circuit_poison"),
          ("... gap closed, (patched - poisoned) / (base - poisoned)", "cmap_circuit_poison_gap_closed"),
          (f"CMAP base -> retrained at the base top-{k} circuit (END): logit diff", "cmap_circuit_retrain"),
          ("... gap closed", "cmap_circuit_retrain_gap_closed"),
          ("CMAP base -> poisoned at every head (END; MLPs stay poisoned): logit diff", "cmap_all_heads_poison"),
          ("... gap closed", "cmap_all_heads_poison_gap_closed"),
          ("CMAP base -> retrained at every head (END): logit diff", "cmap_all_heads_retrain"),
          ("... gap closed", "cmap_all_heads_retrain_gap_closed")]
  lines += [f"| {label} | {pm(key)} | {sc(key)} |" for label, key in rows]
  lines += ["", "Reference logit differences: " + ", ".join(f"{p} {pm(p + '/logit_diff')}" for p in PHASES) + ".",
            "", "## Head-importance heatmaps [layer, head] per phase", "",
            "Exact activation patching of every head at the final position (END), clean prompts with the ABC donor "
            "(Wang et al.'s direction): drop in the mean logit difference. Heads acting at S2 (duplicate-token, "
            "induction) reach END only through later heads' keys/values at S2 and so do not appear here; see the "
            "head classes.", "", f"![head importance]({figs['head_importance']})", "",
            "Reverse direction (ABC prompts, clean donor): rise of the ABC run's logit difference.", "",
            f"![head restoration]({figs['head_restoration']})", "",
            "Direct logit attribution of each head at END.", "", f"![head DLA]({figs['head_dla']})", "",
            "### Cross-checks", "",
            "| phase | corr(attribution patching, exact) | corr(reverse direction, exact) " + head,
            "|---|---|---|" + "---|" * len(seeds)]
  for p in PHASES:
    lines.append(f"| {p} | {pm(p + '/attribution_corr')} | {pm(p + '/restoration_corr')} | "
                 f"{ph(p, 'attribution_corr')} |")
  lines += ["", "Per-seed cells: the attribution-patching correlation. Attribution patching (one forward + one "
            "backward, first order) estimates the same final-position patch; it is reported only as a check.", "",
            f"![attribution vs exact]({figs['attribution_vs_exact']})", "",
            "## Head classes (standard criteria) and attention evidence", "",
            f"analysis.head_classes.classify_heads, at most {config.classes.k} heads per class: name movers = "
            f"largest positive DLA with END->IO attention >= {config.classes.attn_min}; negative name movers = most "
            "negative DLA with the same attention; S-inhibition = heads before the first name mover with END->S2 "
            f"attention >= {config.classes.attn_min} and the largest positive exact importance; induction / "
            f"duplicate-token = largest scores >= {config.classes.rep_min} on repeated random token sequences. "
            "(m/n) = found in m of n seeds.", ""]
  lines += _class_tables(results)
  lines += ["", f"![attention evidence]({figs['attention_evidence']})", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  from train.rundir import run_app
  run_app(run, "configs/ioi.py", "Run directory (default runs/<date>-<model>-ioi).")
