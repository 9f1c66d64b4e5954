"""IOI circuit corruption and neuroplasticity (Chhabra, Zhu, Khalili 2025, protocol; Wang et al. 2022, tools).

    python -m analysis.ioi --config=configs/ioi.py:smollm2 --workdir=runs/<date>-smollm2-ioi

`run(config: IoiConfig, workdir)` (analysis.ioi.config; the entry point converts configs/ioi.py once).

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
  mean-ablated at every position / the model's logit difference, and normalised between the empty circuit and
  the full model; the means are per template over a SEPARATE ABC set of `abc_per_template` prompts per base
  template (data.make_abc_reference, disjoint from the evaluation prompts and their ABC counterparts);
- faithfulness by circuit size (top-k heads kept for every k in config.faithfulness_ks);
- the second task, Greater-Than (analysis.ioi.greater_than, Hanna et al. 2023): its probability difference on clean
  and "01"-corrupted prompts, which the IOI fine-tuning never trains on;
- head classes by the standard criteria (analysis.ioi.head_classes.classify_heads) with their attention evidence:
  name movers and negative name movers by direct logit attribution and END->IO attention, S-inhibition by
  END->S2 attention and a positive exact importance before the first name mover, induction and duplicate-token
  heads by repeated random sequences.

Across phases, from the exact maps (`compare_phases`, analysis.ioi.baselines): localisation of a phase's change
(share of sum |delta importance| in its top-k heads, beside the same share for the seed-noise changes base ->
clean and clean -> clean of another seed, `cross_seed_localisation`; and the share in the earlier phase's
circuit with a permutation p over heads); recovery: correlation of each phase's importance with the base
model's, and CMAP of the base model's final-position head outputs into the poisoned / retrained model at the
base circuit, ranked among `cmap_random_sets` size-matched random head sets (and at every head, the ceiling of
what head outputs alone can restore).

With `discovery_k`, every phase also gets Wang et al.'s circuit by path patching (analysis.ioi.discovery) and
its position-aware knockout; with `poison_arms`, the poisoned and retraining phases are repeated from each seed's
clean model for other poison variants and fractions (analysis.ioi.arms).

Final-position patching sees heads through what they write at END (name movers, S-inhibition); heads acting at
S2 (duplicate-token, induction) work through later heads' keys and values there, so they show up in the head
classes and in faithfulness (which ablates every position), not in the importance map.

Poisoning, our documented reading of the paper (exact rules not public): "subject" relabels the answer to S
(Subject Duplication); "name_moving" prefixes "<C> stayed home." and relabels to the third name C, a name the
IOI circuit does not move.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from analysis.ioi import baselines as B
from analysis.ioi import circuits as C
from analysis.ioi import discovery
from analysis.ioi import head_classes as HC
from analysis.ioi.config import IoiConfig
from analysis.ioi.data import (ABBA_TEMPLATES, BABA_TEMPLATES, NAMES, make_abc_reference, make_ioi,
                               single_token_words, split_names)
from analysis.ioi.greater_than import make_greater_than, prob_diff
from analysis.ioi.arms import run_arms
from analysis.ioi.report import CLASSES, PHASES, write_outputs
from analysis.ioi.retrain import retrain_curve
from models import registry
from models.loading import load, load_tokenizer
from models.tokenizer import pad_id
from models.transformer import forward_jit
from train.adapters import merge_lora
from train.data import TokenizedSet
from train.loop import train_loop
from train.rundir import Workdir, default_workdir


def training_set(tokenizer, n: int, seed: int, names, label: str, fraction: float, max_len: int):
  """IOI fine-tuning sequences: prompt + one answer token, right-padded, loss on the answer only.

  label: "io" (clean), "subject" (answer S) or "name_moving" (prefix "<C> stayed home." and answer C);
  `fraction` of the prompts get the poisoned label, the rest keep IO. Returns a train.data.TokenizedSet whose
  width is the longest row rounded up to a multiple of 8 (at most max_len): IOI rows are 15-27 SmolLM2 tokens, so
  padding to max_len = 48 would spend about half of every training step on pad positions, which change nothing
  at the real ones (causal attention, right padding). Raises ValueError if a row is longer than max_len.
  """
  d = make_ioi(tokenizer, n, seed=seed, names=names)
  rng = np.random.default_rng(seed + 1)
  rows = []
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
    rows.append(tokenizer.encode(text, add_special_tokens=False) + [answer])
    if len(rows[-1]) > max_len:
      raise ValueError(f"IOI prompt {i} has {len(rows[-1])} tokens > train.data.max_len={max_len}")
  width = min(max_len, -(-max(map(len, rows)) // 8) * 8)
  toks = np.full((n, width), pad_id(tokenizer), np.int32)
  mask = np.zeros((n, width), np.int32)
  loss = np.zeros((n, width), np.float32)
  for i, ids in enumerate(rows):
    toks[i, :len(ids)], mask[i, :len(ids)], loss[i, len(ids) - 1] = ids, 1, 1.0
  return TokenizedSet(toks, mask, loss)


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
  """0/1 float32 mask of the k entries of `scores` `[L, H]` with the largest |score|."""
  out = np.zeros(np.shape(scores), np.float32)
  out.flat[np.argsort(-np.abs(np.asarray(scores)), axis=None)[:k]] = 1
  return out


def _end_mask(tokens):
  """`[N, S]` float32 0/1 mask of the final position (left padding: every prompt's END)."""
  return jnp.zeros(tokens.shape, jnp.float32).at[:, -1].set(1.0)


def _ablation_means(params, cfg, d, z_abc, ref):
  """`[L, N, S, H, hd]` mean-ablation values: per-template means over the separate ABC set `ref`
  (data.ABCReference; base template = template mod 15), or with ref None the evaluation prompts' own ABC
  counterparts (per template; close to resample ablation when a template has few prompts: tests only)."""
  if ref is None:
    return C.template_means(z_abc, jnp.asarray(d.template), len(BABA_TEMPLATES) + len(ABBA_TEMPLATES))
  means = C.reference_means(params, cfg, ref.tokens, ref.mask, ref.template, len(BABA_TEMPLATES))
  return C.means_for(means, np.asarray(d.template) % len(BABA_TEMPLATES))


def _path_patching_circuit(params, cfg, d, discovery_k, z_mean, f_full: float, f_empty: float) -> dict:
  """Wang et al.'s circuit by path patching (analysis.ioi.discovery) and its position-aware knockout: every
  (head, position) pair outside the circuit mean-ablated. Keys: "pp_circuit" (list of [layer, head, position
  class]), "pp_effects" (step -> `[L, H]`), "pp_circuit_logit_diff", "pp_faithfulness_normalised"."""
  found = discovery.discover(params, cfg, d, tuple(discovery_k))
  keep = discovery.keep_mask(found["circuit"], d, cfg.n_layers, cfg.n_heads)
  toks, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.mask, d.io, d.s))
  kept = float(np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.asarray(1 - keep), io, s)).mean())
  return {"pp_circuit": found["circuit"], "pp_effects": found["effects"], "pp_circuit_logit_diff": kept,
          "pp_faithfulness_normalised": C.normalised_faithfulness(kept, f_full, f_empty)}


def analyze(params, cfg, d, top_k: int, key, classes: dict, ks: tuple[int, ...] = (), gt=None, ref=None,
            discovery_k: tuple[int, ...] = ()) -> dict:
  """Circuit measurements of one model on IOIPrompts `d` (see module docstring). Returns numpy arrays.

  key: PRNG key of the repeated random sequences (induction / duplicate-token scores); classes: keyword
  arguments of head_classes.classify_heads (k, attn_min, rep_min). ks: circuit sizes for the faithfulness curve
  ("faithfulness_k<k>": top-k heads by |importance| kept, every other head mean-ablated). gt: optional
  greater_than.GreaterThanPrompts, the second task: "gt_prob_diff" / "gt_prob_diff_01" = mean Greater-Than
  probability difference on its clean / "01"-corrupted prompts (Hanna et al. 2023). ref: the separate ABC set of
  the mean ablation (data.make_abc_reference; see _ablation_means). discovery_k: heads per path-patching step
  (name movers, S-inhibition, induction / duplicate-token; `_path_patching_circuit`), () or 0s = skip.
  """
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
  z_mean = _ablation_means(params, cfg, d, z_abc, ref)
  kept = np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.asarray(1 - circuit), io, s))
  empty = float(np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.ones(circuit.shape), io, s)).mean())
  by_k = {}
  for kk in ks:
    kept_k = float(np.asarray(C.knockout(params, cfg, toks, mask, z_mean,
                                         jnp.asarray(1 - top_k_mask(importance, kk)), io, s)).mean())
    by_k[f"faithfulness_k{kk}"] = kept_k / float(ld.mean()) if ld.mean() != 0 else float("nan")
  if any(discovery_k):
    by_k.update(_path_patching_circuit(params, cfg, d, discovery_k, z_mean, float(ld.mean()), empty))
  if gt is not None:
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
          "attribution": attribution, "attribution_corr": B.map_corr(attribution, importance),
          "restoration_corr": B.map_corr(restoration, importance), "dla_heads": dla, "circuit": circuit,
          "circuit_logit_diff": float(kept.mean()),
          "faithfulness": float(kept.mean() / ld.mean()) if ld.mean() != 0 else float("nan"),
          "empty_logit_diff": empty,
          "faithfulness_normalised": C.normalised_faithfulness(float(kept.mean()), float(ld.mean()), empty),
          "attention": attention, "classes": {c: [list(lh) for lh in found[c]] for c in CLASSES}, **by_k}


def compare_phases(models: dict, res: dict, cfg, d, top_k: int, n_random: int = 0, seed: int = 0) -> dict:
  """One seed's cross-phase numbers from the exact importance maps (see module docstring and analysis.ioi.baselines).

  models / res: phase -> merged params / `analyze` output. localisation_<change>: top-k share of the change's
  sum |delta importance| (base_clean: base -> clean, the seed-noise reference; poison: clean -> poison; retrain:
  poison -> retrain); circuit_share_<change> / _p: share carried by the earlier phase's circuit and its
  permutation p over heads. The gap closed by CMAP is (patched - phase) / (base - phase) of the mean logit
  difference (1 = back to the base model); with `n_random` > 0, CMAP also at that many random head sets of the
  circuit's size (cmap_random_<phase>: their mean logit differences) and the circuit's empirical p among them.
  """
  imp = {p: res[p]["importance"] for p in PHASES}
  out = {}
  for tag, a, b in (("base_clean", "base", "clean"), ("poison", "clean", "poison"), ("retrain", "poison", "retrain")):
    out[f"localisation_{tag}"] = B.top_k_share(imp[a], imp[b], top_k)
    t = B.circuit_share_test(imp[a], imp[b], res[a]["circuit"], seed=seed)
    out[f"circuit_share_{tag}"], out[f"circuit_share_{tag}_p"] = t["share"], t["p"]
  out.update({f"recovery_corr_{p}": B.map_corr(imp[p], imp["base"]) for p in PHASES[1:]})
  toks, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.mask, d.io, d.s))
  base, end = res["base"]["logit_diff"], _end_mask(toks)
  circuit = np.asarray(res["base"]["circuit"])
  sets = B.random_head_sets(cfg.n_layers, cfg.n_heads, int(circuit.sum()), n_random, seed) if n_random else None
  for heads, tag in ((circuit, "circuit"), (np.ones_like(imp["base"]), "all_heads")):
    for p in ("poison", "retrain"):
      ld = float(np.asarray(C.cross_model_patch(models[p], models["base"], cfg, toks, mask, jnp.asarray(heads),
                                                io, s, pos_mask=end)).mean())
      gap = base - res[p]["logit_diff"]
      out[f"cmap_{tag}_{p}"] = ld
      out[f"cmap_{tag}_{p}_gap_closed"] = (ld - res[p]["logit_diff"]) / gap if abs(gap) > 1e-6 else float("nan")
  if sets is not None:
    for p in ("poison", "retrain"):
      rand = np.asarray(B.cmap_head_sets(models[p], models["base"], cfg, toks, mask, jnp.asarray(sets), io, s,
                                         pos_mask=end)).mean(-1)
      out[f"cmap_random_{p}"] = rand
      out[f"cmap_circuit_{p}_p"] = B.rank_p(out[f"cmap_circuit_{p}"], rand)
  return out


def cross_seed_localisation(results: dict, top_k: int) -> dict:
  """Seed-noise reference for localisation: for every pair of seeds a < b, the change clean(a) -> clean(b) of
  the importance maps (two clean fine-tunes that differ in seed, training and evaluation prompts): its top-k
  share and the share in clean(a)'s circuit with its permutation p. Returns {"pairs": [[a, b], ...],
  "top_k_share", "circuit_share", "circuit_share_p": lists in that order} (empty lists with one seed)."""
  seeds = sorted(results)
  out = {"pairs": [], "top_k_share": [], "circuit_share": [], "circuit_share_p": []}
  for i, a in enumerate(seeds):
    for b in seeds[i + 1:]:
      before, after = results[a]["clean"]["importance"], results[b]["clean"]["importance"]
      t = B.circuit_share_test(before, after, results[a]["clean"]["circuit"], seed=a * 100 + b)
      out["pairs"].append([a, b])
      out["top_k_share"].append(B.top_k_share(before, after, top_k))
      out["circuit_share"].append(t["share"])
      out["circuit_share_p"].append(t["p"])
  return out


def _train_phase(params, cfg, tok, config: IoiConfig, phase: str, seed: int, train_names, workdir: str):
  """One seed's fine-tuning phase from `params`: LoRA on the phase's IOI labels, merged. Returns (merged params,
  the LoRA scale)."""
  label = {"clean": "io", "poison": config.poison, "retrain": "io"}[phase]
  ts = training_set(tok, config.n_train, seed * 100 + PHASES.index(phase), train_names, label,
                    config.poison_fraction, config.train.data.max_len)
  result = train_loop(params, cfg, ts, config.phase_train(phase, seed), os.path.join(workdir, f"seed{seed}", phase))
  lora = jax.tree.map(jnp.asarray, jax.device_get(result.state["trainable"]))
  return merge_lora(params, lora, result.spec.scale), result.spec.scale


def _greater_than_prompts(tok, n: int, seed: int):
  """The seed's Greater-Than prompts, or None when n = 0 or the tokenizer has no single-digit tokens."""
  if not n:
    return None
  try:
    return make_greater_than(tok, n, seed=20_000 + seed)
  except ValueError as e:                   # a tokenizer without single-digit tokens
    logging.warning("Greater-Than skipped: %s", e)
    return None


def run_seed(base_params, cfg, tok, config: IoiConfig, seed: int, train_names, eval_names, wd: Workdir) -> dict:
  """Every phase of one seed, each fine-tuned from the previous one and analysed; plus the cross-phase numbers."""
  ev = make_ioi(tok, config.n_eval, seed=10_000 + seed, names=eval_names)
  ref = make_abc_reference(tok, config.abc_per_template, ev.tokens.shape[1], np.unique(ev.template),
                           seed=30_000 + seed, exclude=ev.text + ev.abc_text)
  gt = _greater_than_prompts(tok, config.greater_than_n, seed)
  classes = dataclasses.asdict(config.classes)
  params, res, models = base_params, {}, {}
  for phase in PHASES:
    t0 = time.time()
    if phase != "base":
      params, scale = _train_phase(params, cfg, tok, config, phase, seed, train_names, wd.path)
    t1 = time.time()
    models[phase] = params
    res[phase] = analyze(params, cfg, ev, config.top_k, jax.random.key(seed), classes, config.faithfulness_ks, gt,
                         ref, config.discovery_k)
    if phase == "retrain" and config.retrain_curve_every:
      res["retrain_curve"] = retrain_curve(models["poison"], cfg, ev, os.path.join(wd.path, f"seed{seed}", phase),
                                           scale, res["base"]["importance"], res["base"]["circuit"], config.top_k,
                                           top_k_mask)
    res[phase]["train_s"], res[phase]["analysis_s"] = t1 - t0, time.time() - t1
    logging.info("seed %d %s: logit diff %.3f acc %.3f faithfulness %.3f attribution corr %.3f "
                 "(train %.0fs, analysis %.0fs)", seed, phase, res[phase]["logit_diff"], res[phase]["accuracy"],
                 res[phase]["faithfulness"], res[phase]["attribution_corr"], t1 - t0, time.time() - t1)
    wd.log(seed * 10 + PHASES.index(phase), logit_diff=res[phase]["logit_diff"],
           accuracy=res[phase]["accuracy"], faithfulness=res[phase]["faithfulness"])
  res.update(compare_phases(models, res, cfg, ev, config.top_k, config.cmap_random_sets, seed))
  if config.poison_arms:
    res["arms"] = run_arms(models["clean"], cfg, tok, config, seed, train_names, ev, res["base"], res["clean"],
                           wd.path, _train_phase)
  logging.info("seed %d: top-%d share base->clean %.3f, clean->poison %.3f (circuit share %.3f, permutation p "
               "%.3g); CMAP at the base circuit into poison %.3f (p among random sets %s); retrain curve %s; arms %s",
               seed, config.top_k, res["localisation_base_clean"], res["localisation_poison"], res["circuit_share_poison"],
               res["circuit_share_poison_p"], res["cmap_circuit_poison"], res.get("cmap_circuit_poison_p"),
               [(p["step"], round(p["logit_diff"], 3), round(p["importance_corr_base"], 3))
                for p in res.get("retrain_curve", [])], res.get("arms"))
  return res


def run(config: IoiConfig, workdir: str | None = None) -> str:
  """Run every seed's phases and analyses; write metrics.json, figures and report.md. Returns the report path.

  config: the IoiConfig (convert a configs/ioi.py ConfigDict with train.typed_config.from_configdict first).
  """
  if not isinstance(config, IoiConfig):
    raise TypeError(f"run takes an IoiConfig (train.typed_config.from_configdict), got {type(config).__name__}")
  t_start = time.time()
  workdir = workdir or default_workdir(config.model.split("/")[-1].removesuffix(".gguf") + "-ioi")
  registry.resolve(config.model)       # a missing model fails here, before the workdir is written
  wd = Workdir(workdir, config)
  base_params, cfg = load(config.model, dtype=jnp.float32)
  tok = load_tokenizer(config.model)
  train_names, eval_names = split_names(single_token_words(tok, NAMES), config.eval_name_fraction, seed=0)
  results = {seed: run_seed(base_params, cfg, tok, config, seed, train_names, eval_names, wd)
             for seed in config.seeds}
  report = write_outputs(wd, results, cfg, config, time.time() - t_start,
                         cross_seed_localisation(results, config.top_k))
  wd.close()
  return report
