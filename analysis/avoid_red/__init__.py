"""Avoid the red: the safety LoRA in, outside or across the kill zone, over a grid of points.

`python -m analysis.avoid_red --config=configs/avoid_red.py:<preset>` (or `--config=configs/grid.py:<preset>` for a
larger grid). study.py (the points and their phases), report.py (grid.csv, metrics.json, figures, report.md).
"""
