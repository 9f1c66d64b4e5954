"""Gravitational reversion (Poppi & Lukas 2026): `python -m analysis.reversion --config=configs/reversion.py:<preset>`.

study.py (setup and run), safety.py (theta_early -> theta_aligned), benign.py (the benign fine-tuning arms and
their checkpointed chunked driver), evaluate.py (harmfulness and task cost), metrics.py (isotropic null,
Spearman), report.py and plots.py (outputs).
"""
