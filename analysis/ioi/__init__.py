"""The IOI circuits study (`python -m analysis.ioi --config=configs/ioi.py:<preset>`), one module a concern:

- config.py: IoiConfig, the typed frozen schema of configs/ioi.py (nests train.train_config.TrainConfig);
- study.py: the phases (base -> clean -> poisoned -> retrained), the per-phase analysis and `run`;
- data.py: IOI prompts after Wang et al. 2022 (templates, single-token names, ABC counterparts);
- circuits.py: activation / attribution / path patching, knockout, DLA and CMAP over all heads;
- head_classes.py: attention evidence and the standard head classes;
- greater_than.py: the Greater-Than task (Hanna et al. 2023), the study's second task;
- report.py: metrics.json, figures and report.md;
- __main__.py: the absl entry point.

Kept free of imports so that `from analysis.ioi import circuits` loads only what it names.
"""
