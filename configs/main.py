"""Config for the main job (`make run` = `python -m analysis.main --config=configs/main.py:smollm2`): the layer
sweep (rho-eval baselines, vector validation, the first-order screen and the exact kill-zone test) followed by the
gravitational-reversion study.

Presets: smollm2 (the `make run` sizes: configs/sweep.py:smollm2_fast + configs/reversion.py:smollm2_fast; the time
measured on a 2-core CPU is in the README), full (the full sweep and the full reversion protocol), quick (tiny sizes; tests).
Override either part: --config.sweep.exact_alphas="(2.0,4.0)"
--config.reversion.benign.steps=60.
"""
import ml_collections

from configs import reversion, sweep


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  presets = {"smollm2": ("smollm2_fast", "smollm2_fast"), "full": ("smollm2", "smollm2"),
             "quick": ("quick", "quick")}
  if arg not in presets:
    raise ValueError(f"unknown main-job config {arg!r}; choose {', '.join(presets)}")
  s, r = presets[arg]
  c = ml_collections.ConfigDict()
  c.sweep = sweep.get_config(s)
  c.reversion = reversion.get_config(r)
  c.run_sweep = True
  c.run_reversion = True
  c.resume = "check"            # check | force (train.resume)
  c.quiet_libraries = True      # hide orbax / absl INFO chatter so the progress bars stay readable
  return c
