"""The sweep entry point end to end: a tiny random model with a character tokenizer (fast), and the real SmolLM2
`:quick` config (slow)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sweep import get_config
from probes import sweep
from tests.reference import ours_from_torch, tiny_hf_model
from tests.test_probes_stats import CharTokenizer


def _check_outputs(wd, n_layers, cfg):
  m = json.load(open(os.path.join(wd, "metrics.json")))
  layers = list(range(cfg.layer_start, n_layers, cfg.layer_stride))
  assert m["layers"] == layers
  delta = np.array(m["delta"])
  assert delta.shape == (len(cfg.behaviors), len(layers), len(cfg.alphas))
  scores = np.array(m["scores"])
  base = np.array([m["baseline"][b] for b in cfg.behaviors])
  np.testing.assert_allclose(delta, np.transpose(scores[:, :, 0] - base, (2, 0, 1)), atol=1e-6)
  for name in ("behavior_depth", "alpha_depth", "delta_band", "probe_accuracy"):
    assert os.path.getsize(os.path.join(wd, "figures", name + ".png")) > 10_000
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == layers
  report = open(os.path.join(wd, "report.md")).read()
  assert "## Kill zones" in report and "## Linear probes by depth" in report
  assert len(m["probes"]["truth"]["acc_mean"]) == n_layers + 1
  return m


def test_sweep_run_tiny_model(tmp_path):
  params, mcfg = ours_from_torch(tiny_hf_model("llama", seed=2))
  config = get_config("quick")
  with config.unlocked():
    config.layer_stride = 1
    config.probe_steps = 50
    config.n_vector_pairs = 4
    config.probe_pairs.factual = 8
    config.probe_pairs.refusal = 8
    config.max_tokens.sycophancy = 96
    config.max_tokens.bias = 96
  wd = str(tmp_path / "run")
  path = sweep.run(config, wd, loaded=(jax.tree.map(jnp.asarray, params), mcfg, CharTokenizer()))
  assert path.endswith("report.md")
  m = _check_outputs(wd, mcfg.n_layers, config)
  assert m["n_probes"] == {b: 4 for b in config.behaviors}


@pytest.mark.slow
def test_sweep_quick_smollm2(tmp_path):
  config = get_config("quick")
  wd = str(tmp_path / "run")
  sweep.run(config, wd)
  m = _check_outputs(wd, 30, config)
  # SmolLM2 separates true from false statements better than chance somewhere in depth
  assert max(m["probes"]["truth"]["acc_mean"]) > 0.6
  assert np.isfinite(np.array(m["z"])).all()
