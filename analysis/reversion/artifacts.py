"""The reversion study's directions as vector files (probes.vectors): vectors/v_rev.safetensors and, with the
control arm, vectors/v_X.safetensors, `[L+1, D]` float32 in the boundary convention, with JSON sidecars naming the
model and weight digest, how the direction was estimated (set A, the position read) and the evidence (per-layer
norms, v_rev's split-half reliability, the nulls' p99 and each arm's final alignment on B)."""
from __future__ import annotations

from typing import Any

import numpy as np

from analysis.reversion.config import ReversionConfig
from probes import vectors as vectors_io
from train.rundir import Workdir


def write_vectors(wd: Workdir, config: ReversionConfig, ref: dict, summary: dict) -> list[str]:
  """Write v_rev (and v_X) to `wd`/vectors; returns the tensor paths. `ref` from study.reference, `summary` the
  metrics.json dict after the nulls and arms are in it."""
  weights = vectors_io.weights_digest(config.model)
  base = {"model": config.model, "weights": weights, "n_layers": summary["n_layers"],
          "site": f"resid_post ({config.probe.position} prompt token)", "reference": config.reference}
  arms = {a: d.get("alignment_B") for a, d in summary.get("arms", {}).items()}
  evidence = {"null_isotropic_p99": summary.get("null_isotropic_p99"),
              "null_covariance_p99": summary.get("null_covariance_p99"),
              "v_rev_split_half": summary.get("v_rev_split_half"), "final_alignment_B": arms}
  v = np.asarray(ref["v_rev"])
  out = [vectors_io.save_vector(wd.file("vectors/v_rev.safetensors"), v, {
      **base, "behavior": "refusal (safety LoRA)", "method": "v_rev = mean act(theta_early) - mean act(theta_aligned)",
      "contrast_pairs": {"source": "set A (train.prompt_sets)", "count": int(summary["sets"]["A"]["n"])},
      "evidence": {**evidence, "norm_by_boundary": np.linalg.norm(v, axis=-1).tolist()}})[0]]
  if "control" in ref:
    vx = np.asarray(ref["control"]["ref"]["v_rev"])
    out.append(vectors_io.save_vector(wd.file("vectors/v_X.safetensors"), vx, {
        **base, "behavior": "control style adapter", "method": "v_X = mean act(theta_early) - mean act(theta_X)",
        "contrast_pairs": {"source": "set A (train.prompt_sets)", "count": int(summary["sets"]["A"]["n"])},
        "evidence": {"control_adapter": summary.get("control_adapter"),
                     "norm_by_boundary": np.linalg.norm(vx, axis=-1).tolist()}})[0])
  return out
