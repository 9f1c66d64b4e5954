"""Config for `python -m analysis.avoid_red --config=configs/grid.py:<preset>`: an ablation grid of the safety
LoRA (the point job of analysis/avoid_red/study.py: safety LoRA -> behavior cost, refusal, reversion under benign fine-tuning).

Usage: --config=configs/grid.py:smollm2 (depth window x rank x seed: is the kill-zone window's cost a matter of
placement or of capacity? kill at rank 48 has the trainable parameters of all 30 layers at rank 8: 5 x 48 =
30 x 8), :quick (SmolLM2 cut to 2 decoder layers; tests).
Axes: window ("kill" | "outside" | "all" | (f_lo, f_hi)), seed, and analysis.avoid_red.study.AXES (rank, alpha,
targets, steps, lr), listed in expansion order in grid.axes; the others are declared empty (inactive), so the
command line can switch one on (and an axis off by emptying it): --config.grid.axes="('window','lr','seed')"
--config.grid.lr="(1e-4,2e-4)" --config.grid.rank="()".
LoRA alpha stays fixed, so the scale alpha / r falls with the rank (PEFT's default); set
--config.reversion.safety.lora.rslora=True for alpha / sqrt(r).
"""
import ml_collections

from configs import avoid_red


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  if arg not in ("smollm2", "quick"):
    raise ValueError(f"unknown grid config {arg!r}; choose smollm2 or quick")
  c = avoid_red.get_config(arg)
  c.grid = ml_collections.ConfigDict()
  c.grid.axes = ("window", "rank", "seed")
  c.grid.window = ("kill", "all")
  c.grid.rank = (2, 4) if arg == "quick" else (8, 48)
  c.grid.seed = (0,) if arg == "quick" else (0, 1, 2)
  c.grid.lr = ()                         # inactive axes (analysis/grid/__init__.py): list them in grid.axes and give values
  c.grid.steps = ()
  c.grid.alpha = ()
  c.grid.targets = ()
  return c
