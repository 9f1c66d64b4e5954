"""Avoid the red? The safety LoRA restricted to the kill-zone layers, to the layers outside them, or to all layers.

    python -m analysis.avoid_red --config=configs/avoid_red.py:smollm2 --workdir=runs/<date>-avoid-red

The lobotomy-layer news advice was "avoid these layer ranges during LoRA and RepE training"; its source never
tested it (../shared/research/seeds.md part 1). This study does, for the reversion study's safety LoRA
(analysis/reversion/; Poppi & Lukas 2026 for the reversion measurement). Per grid point (analysis/grid/__init__.py;
axes window x seed by default, any of AXES too):

  1. theta_aligned = theta_early (the loaded, helpful-only model) + the safety LoRA SFT restricted to the point's
     window, merged: `analysis.reversion.safety.safety_phase` with `safety.lora.depth` / `safety.lora.complement` set and
     `safety.seed` = the point's seed (LoRA initialisation and data order). Windows: "kill" = the kill zone
     (config.kill_zone: an explicit (f_lo, f_hi) or a sweep's metrics.json), "outside" = every layer not in it,
     "all" = every layer, or an explicit (f_lo, f_hi).
  2. What it costs: the behavior scores of probes.tasks (the sweep's scored probes and log-prob readout:
     probes.sweep.split_probes, probes.steering.baseline_pass) of theta_aligned minus theta_early.
  3. What it buys: refusal of held-out harmful and benign prompts (`reversion.Evaluator`: greedy answers and the
     refusal-phrase judge; the log-prob variant against theta_early's own greedy answers; benign NLL).
  4. How much it reverts: v_rev(l) = mean act(theta_early) - mean act(theta_aligned) at the last token of the
     harmful probe prompts, every layer; the reversion study's baseline arm (benign LoRA SFT, T steps, train/scan.py's
     step) from theta_aligned, with the drift's alignment a_t = cos(d_t, v_rev) (layers 1..L concatenated) after
     every step and harmfulness every `benign.eval_every` steps.

Vmapped vs sequential. Points that differ only in the seed (config.vmap_axis) form a group. Per group: the safety
phases run one after another (train.loop.train_loop inside analysis.reversion.safety.safety_phase: one seed per call, its own
orbax checkpoints), as do the evaluations; the benign fine-tuning of ALL the group's points is ONE compiled
program (`group_program`: `lax.scan` over steps of `train.scan.make_step`, vmapped over points, each with its own
theta_aligned, v_rev and data order), compiled once and reused by every group of the same size. Groups
(windows, ranks, ...) run one after another.

Resume: a point with metrics.json is skipped; otherwise the safety phase restarts from its newest checkpoint
(`safety.train.save_every`) and the benign phase from the newest chunk checkpoint common to the group's points
(<point>/benign/checkpoints). `config.stop_after` stops (checkpointed) after that many benign steps.

Writes: config.json, early.json (theta_early's scores and answers), points/<name>/ (point.json, safety/,
benign/checkpoints, aligned.json, metrics.json), grid.csv, metrics.json, figures/*.png, report.md.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from analysis import grid
from analysis.avoid_red import report as avoid_red_report
from analysis.avoid_red.config import AvoidRedConfig
from analysis.reversion import benign, evaluate, safety
from analysis.reversion import study as reversion
from analysis.reversion.config import ReversionConfig
from models import registry
from probes import steering, sweep
from probes import tasks as tasks_lib
from train import adapters, scan, typed_config
from train.loop import fit_chunks
from train.losses import max_targets
from train.rundir import Workdir, default_workdir, write_json

# Grid axes other than window / seed -> the field of the point's reversion config they set.
AXES = {"rank": "safety.lora.rank", "alpha": "safety.lora.alpha", "targets": "safety.lora.targets",
        "steps": "safety.train.steps", "lr": "safety.train.lr"}
# Config fields that do not change a point's results (left out of its fingerprint).
_NOT_RESULTS = ("progress", "stop_after", "save_every", "max_to_keep", "log_every")


def kill_window(kz) -> tuple[tuple[float, float], str]:
  """The kill zone as a depth window ((f_lo, f_hi), description) from config.kill_zone.

  kz.sweep_metrics = "": kz.window. Otherwise a probes.sweep metrics.json: among its "kill_zones" of kz.behavior
  at kz.alpha, the one with the lowest min_delta; window = (first swept layer / L, last swept layer / L), L = the
  file's "n_layers" (inclusive, so layers between swept ones count).

  Raises:
    ValueError: a window that is not 0 <= f_lo <= f_hi <= 1 (names config.kill_zone.window), or no such kill zone
      in the file (lists the zones it has). FileNotFoundError: the file is missing (names the field).
  """
  path = str(kz.sweep_metrics)
  if not path:
    w = tuple(float(x) for x in kz.window)
    if len(w) != 2 or not 0.0 <= w[0] <= w[1] <= 1.0:
      raise ValueError(f"config.kill_zone.window must be (f_lo, f_hi) with 0 <= f_lo <= f_hi <= 1, got {w}")
    return w, f"explicit window {w[0]:g}-{w[1]:g} (config.kill_zone.window)"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.kill_zone.sweep_metrics: {path} not found")
  with open(path) as f:
    m = json.load(f)
  if "kill_zones" not in m or "n_layers" not in m:
    raise ValueError(f"{path}: not a probes.sweep metrics.json (no 'kill_zones' / 'n_layers')")
  zones = [z for z in m["kill_zones"] if z["behavior"] == kz.behavior and float(z["alpha"]) == float(kz.alpha)]
  if not zones:
    have = sorted({(z["behavior"], z["alpha"]) for z in m["kill_zones"]})
    raise ValueError(f"{path}: no kill zone of {kz.behavior!r} at alpha {kz.alpha:+g} "
                     f"(config.kill_zone.behavior / .alpha); it has {have or 'none'}")
  z = min(zones, key=lambda z: z["min_delta"])
  L = int(m["n_layers"])
  w = (z["layers"][0] / L, z["layers"][-1] / L)
  return w, (f"{kz.behavior} kill zone at alpha {kz.alpha:+g} of {path}: swept layers {z['layers']} of {L} "
             f"(delta {z['min_delta']:+.3f} at layer {z['worst_layer']})")


def window_lora(value: Any, kill: tuple[float, float]) -> tuple[tuple, bool]:
  """(safety.lora.depth, safety.lora.complement) for a window axis value: "kill" -> (kill, False), "outside" ->
  (kill, True), "all" -> ((), False), (f_lo, f_hi) -> ((f_lo, f_hi), False). Raises ValueError otherwise."""
  if value == "kill":
    return tuple(kill), False
  if value == "outside":
    return tuple(kill), True
  if value == "all":
    return (), False
  if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value):
    return tuple(float(x) for x in value), False
  raise ValueError(f"config.grid.window: {value!r} is not 'kill', 'outside', 'all' or (f_lo, f_hi)")


def point_config(config: AvoidRedConfig, point: grid.Point, kill: tuple[float, float]) -> ReversionConfig:
  """The reversion config one grid point runs: config.reversion with the point's axes set (window ->
  safety.lora.depth / complement, seed -> safety.seed and seeds = (seed,), AXES -> their fields), re-checked
  (train.typed_config.replace). Raises ValueError for an unknown axis (names it and the known ones) or a value of
  the wrong type for its field."""
  changes = {}
  for axis, v in point.values:
    if axis == "window":
      depth, complement = window_lora(v, kill)
      changes.update({"safety.lora.layers": (), "safety.lora.depth": depth, "safety.lora.complement": complement})
    elif axis == "seed":
      changes.update({"safety.seed": int(v), "seeds": (int(v),)})
    elif axis in AXES:
      changes[AXES[axis]] = v
    else:
      raise ValueError(f"config.grid.axes: unknown axis {axis!r}; known: window, seed, {', '.join(AXES)}")
  return typed_config.replace(config.reversion, **changes)


def fingerprint(config, pc) -> dict:
  """What determines a point's results (its reversion config and the scored probes), minus run-control fields;
  analysis.grid.run refuses to resume or reuse a point whose fingerprint changed."""
  def strip(d):
    return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _NOT_RESULTS}
  sw = typed_config.to_dict(config.sweep)
  return {"reversion": strip(typed_config.to_dict(pc)),
          "sweep_probes": {k: sw[k] for k in ("probe_seed", "behaviors", "n_probes", "max_tokens")}}


class _Study:
  """What every group shares: the reversion study's Setup (model, data, probes, evaluator), the sweep's scored
  probes, theta_early's scores, the benign fine-tuning optimizer and program (built once, on the first group that
  has work)."""
  def __init__(self, config, workdir: str):

    rc = self.rc = config.reversion
    self.config, self.workdir = config, workdir
    self.st = st = reversion.setup(rc)
    probes = sweep.split_probes(config.sweep)
    self.behaviors = list(config.sweep.behaviors)
    self.tasks = [tasks_lib.build_task(b, st.tok, probes[b][0], int(config.sweep.max_tokens[b]))
                  for b in self.behaviors]
    self.mean_early = st.mean_fn(st.params, st.probe)

    # theta_early, cached in early.json (recomputed when the probes or the evaluation changed).
    key = {"model": rc.model, "model_layers": rc.model_layers, "eval": typed_config.to_dict(rc.eval), "heldout": rc.heldout,
           "data_seed": rc.data_seed, "refusal_sets": list(rc.refusal_sets), "system": rc.system_prompt,
           "sweep_probes": fingerprint(config, rc)["sweep_probes"]}
    key = json.loads(json.dumps(key))
    path = os.path.join(workdir, "early.json")
    early = json.load(open(path)) if os.path.exists(path) else None
    if early is None or early.get("key") != key:
      early = {"key": key, "scores": self.scores(st.params), "eval": evaluate.evaluate_early(st.evaluator,
                                                                                              st.params, rc),
               "n_layers": st.cfg.n_layers, "d_model": st.cfg.d_model}
      write_json(path, early)
    elif rc.eval.generate:
      st.evaluator.use_compliant(early["eval"]["answers"], "theta_early's greedy answers")
    self.early = early

    # Benign fine-tuning: the baseline arm's program, every point with its own theta_aligned and v_rev.
    self.spec, self.tx = benign.benign_optimizer(rc, st.cfg)
    self.bset = benign.benign_set(rc, st.tok, st.train_pairs, st.system)
    sc = scan.ScanConfig(arm="baseline", lora_scale=self.spec.scale, position=rc.probe.position,
                         n_targets=max_targets(self.bset.loss_mask))
    self.program = scan.make_program(st.cfg, sc, self.tx, per_run_frozen=True)

  def scores(self, params) -> dict[str, float]:
    """probes.tasks scores of `params` on the sweep's scored probes (log-prob readout)."""
    s = np.asarray(steering.baseline_pass(params, self.st.cfg, self.tasks)[0], np.float64)
    return dict(zip(self.behaviors, s.tolist()))


def _stack(trees: Sequence[Any]):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def _run_group(study: _Study, config, kill, points: list[grid.Point], dirs: list[str]) -> None:
  """Safety phase + evaluations per point (sequential), then the group's benign fine-tuning (one program)."""
  rc, st = config.reversion, study.st
  targets = os.path.join(study.workdir, "shared", "benign_targets.json")   # theta_early's: same for every point
  seeds, aligned, refs, infos = [], [], [], []
  for p, d in zip(points, dirs):
    pc = point_config(config, p, kill)
    theta, safety_info = safety.safety_phase(st.params, st.cfg, st.tok, st.train_pairs, pc, d, st.system, targets)
    t0 = time.time()
    layers = adapters.resolve_layers(st.cfg.n_layers, tuple(pc.safety.lora.layers) or None,
                                     tuple(pc.safety.lora.depth) or None, bool(pc.safety.lora.complement))
    path = os.path.join(d, "aligned.json")
    if os.path.exists(path):
      info = json.load(open(path))
    else:
      info = {"layers": list(layers), "safety": safety_info, "scores": study.scores(theta),
              "eval": st.evaluator(theta, benign_refusal=True), "seconds": time.time() - t0}
      write_json(path, info)
    mean_aligned = st.mean_fn(theta, st.probe)
    seeds.append(int(pc.safety.seed))
    aligned.append(theta)
    refs.append({"mean_aligned": mean_aligned, "v_rev": study.mean_early - mean_aligned})
    infos.append(info)
    logging.info("%s: layers %s, harmful refused %.2f", p.name, list(layers), 1 - info["eval"]["harm_gen"])

  batches = benign.benign_batches(study.bset, rc, seeds)
  init = benign.benign_init(study.spec, study.tx, st.cfg, seeds)
  budget = None if config.stop_after < 0 else int(config.stop_after)
  recs = fit_chunks(study.program, init, _stack(aligned), _stack(refs), batches, st.probe,
                    [os.path.join(d, "benign") for d in dirs], int(rc.benign.eval_every),
                    lambda i, lora: st.evaluator(aligned[i], lora, study.spec.scale), budget)
  if recs is None:
    raise grid.Stopped(f"stopped after {budget} benign steps (checkpointed)")
  for p, d, info, ref, rec in zip(points, dirs, infos, refs, recs):
    a_all = rec["metrics"]["align_all"]
    last = rec["evals"][-1]
    ev = info["eval"]
    scal = {"layers_adapted": len(info["layers"])}
    for b in study.behaviors:
      scal[f"d_{b}"] = info["scores"][b] - study.early["scores"][b]
    scal.update(harmful_refused=1.0 - ev["harm_gen"], benign_refused=ev.get("benign_refusal", float("nan")),
                harm_lp=ev["harm_lp"], task_nll=ev["task_nll"], safety_loss=info["safety"]["final_loss"],
                v_rev_norm=float(jnp.linalg.norm(ref["v_rev"][1:])), align_1=float(a_all[0]),
                align_T=float(a_all[-1]), harm_T=last["harm_gen"], d_harm=last["harm_gen"] - ev["harm_gen"],
                harm_lp_T=last["harm_lp"], d_harm_lp=last["harm_lp"] - ev["harm_lp"], task_nll_T=last["task_nll"])
    for b in study.behaviors:
      scal[b] = info["scores"][b]
    grid.write_point(d, p, scal, layers=info["layers"], safety=info["safety"], scores=info["scores"],
                     eval_aligned=ev, evals=rec["evals"], align_all=a_all, align=rec["metrics"]["align"],
                     task_loss=rec["metrics"]["task"], benign_seconds=rec["seconds"],
                     eval_seconds=info["seconds"])


def run(config: AvoidRedConfig, workdir: str | None = None) -> str:
  """The whole study (module docstring); returns the report path, or the workdir when `config.stop_after`
  stopped it early (rerun to resume) or when `config.grid_points` made it one launcher work unit (those points
  only, no top-level outputs: `python -m analysis.grid collect` writes the report). Raises ValueError /
  FileNotFoundError for a bad kill zone or grid, TypeError unless `config` is an AvoidRedConfig
  (train.typed_config.from_configdict converts)."""
  if not isinstance(config, AvoidRedConfig):
    raise TypeError(f"analysis.avoid_red.study.run takes an AvoidRedConfig, got {type(config).__name__}; convert "
                    "with train.typed_config.from_configdict(AvoidRedConfig, c)")
  rc = config.reversion
  workdir = workdir or default_workdir(rc.model.split("/")[-1] + "-avoid-red")
  t0 = time.time()
  kill, _ = kill_window(config.kill_zone)
  points = grid.expand(config.grid)
  pcs = {p.name: point_config(config, p, kill) for p in points}          # validates every axis before any work
  todo = grid.select(points, config.grid_points)
  registry.resolve(rc.model)           # a missing model fails here, before the workdir is written
  unit = bool(config.grid_points)
  wd = None if unit else Workdir(workdir, config)
  state: dict[str, _Study] = {}

  def job(pts, dirs):
    if "study" not in state:
      state["study"] = _Study(config, workdir)
    _run_group(state["study"], config, kill, pts, dirs)

  status = grid.run(todo, workdir, job, config.vmap_axis, lambda p: fingerprint(config, pcs[p.name]))
  if unit or status["stopped"]:
    if wd is not None:
      wd.close()
    return workdir
  return collect(config, workdir, status, time.time() - t0, wd)


def collect(config: AvoidRedConfig, workdir: str, status: dict | None = None, seconds: float | None = None,
            wd: Workdir | None = None) -> str:
  """grid.csv, metrics.json, figures and report.md from the points finished so far in `workdir` (by any launcher:
  analysis.grid.collect with partial=True, so it is safe while work units still run; the report says PARTIAL and
  lists the missing points). Idempotent. Returns the report path. Raises FileNotFoundError when no point has
  finished yet (early.json is written by the first work unit)."""
  kill, kill_source = kill_window(config.kill_zone)
  points = grid.expand(config.grid)
  table = grid.collect(points, workdir, config.vmap_axis, partial=True)
  path = os.path.join(workdir, "early.json")
  if not table["points"] or not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no finished grid point yet (missing {len(table['missing'])} of "
                            f"{len(points)})")
  with open(path) as f:
    early = json.load(f)
  if status is None:
    status = {"ran": [], "skipped": [r["name"] for r in table["points"]], "stopped": []}
  wd = wd or Workdir(workdir, config)
  report = avoid_red_report.write(wd, config, table, early, kill, kill_source, status,
                                  float("nan") if seconds is None else seconds)
  wd.close()
  return report
