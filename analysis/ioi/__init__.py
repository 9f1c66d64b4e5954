"""The IOI circuits study (`python -m analysis.ioi --config=configs/ioi.py:<preset>`), one module a concern:

- config.py: IoiConfig, the typed frozen schema of configs/ioi.py (nests train.train_config.TrainConfig);
- study.py: the phases (base -> clean -> poisoned -> retrained), the per-phase analysis and `run`;
- data.py: IOI prompts after Wang et al. 2022 (templates, single-token names, ABC counterparts) and the separate
  ABC set of the mean ablation;
- circuits.py: activation / attribution / path patching, knockout, DLA and CMAP over all heads;
- discovery.py: the circuit by path patching, position-aware (Wang et al. Section 3), and its knockout mask;
- baselines.py: localisation against seed noise and a permutation null, CMAP against random head sets;
- retrain.py: the retraining curve and the neuroplasticity verdict;
- head_classes.py: attention evidence and the standard head classes;
- greater_than.py: the Greater-Than task (Hanna et al. 2023), the study's second task;
- report.py: metrics.json, figures and report.md;
- __main__.py: the absl entry point.

Kept free of imports so that `from analysis.ioi import circuits` loads only what it names.
"""
