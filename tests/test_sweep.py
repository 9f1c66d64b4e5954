"""The sweep entry point end to end: a tiny random model with a character tokenizer (fast), and the real SmolLM2
`:quick` config (slow)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sweep import get_config
from models.interventions import resid_add_at
from models.readout import last_token_resid
from models import tokenizer as tk
from models.transformer import forward
from probes import margins, sweep, tasks as tasks_lib, vectors
from probes.sweep_config import SweepConfig
from tests.reference import ours_from_torch, tiny_hf_model
from tests.test_layer_map import check_map
from tests.runtime_only import run_runtime_only
from tests.test_probes_stats import CharTokenizer
from train.resume import ResumeConfigError
from train.typed_config import from_configdict

FIGURES = ("screen_depth", "cross_matrix", "exact_cells", "probe_accuracy")


def _check_outputs(wd, n_layers, cfg):
  m = json.load(open(os.path.join(wd, "metrics.json")))
  for b in cfg.behaviors:
    r = m["baseline_rho_eval"][b]
    assert r["readout"] == ("generation" if b in ("bias", "sycophancy") else "teacher-forced")
    assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["n"] == (cfg.baseline_n or r["n"])
    assert m["probes_per_behavior"][b] == {"screen": cfg.n_probes[b], "exact": min(cfg.exact_probes,
                                                                                  cfg.n_probes[b])}
  assert m["controls_per_cell"] == dict(cfg.exact_controls) and m["screen_directions"] == cfg.screen_directions
  cells = m["exact_cells"]
  assert len(cells) == len(cfg.behaviors) * len(cfg.exact_layers) * len(cfg.exact_alphas)
  for c in cells:
    assert c["ci_low"] <= c["delta"] <= c["ci_high"] and 0 < c["p"] <= 1 and c["p"] <= c["q"] <= 1
  for name in FIGURES:
    assert os.path.getsize(os.path.join(wd, "figures", name + ".png")) > 10_000
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(n_layers))
  report = open(os.path.join(wd, "report.md")).read()
  for heading in ("## Baselines: rho-eval 2.6.0's scores", "## Vector validation", "## Source x target",
                  "## Exact test at large alpha", "## Kill zones", "## Linear probes by depth"):
    assert heading in report
  assert len(m["probes"]["truth"]["acc_mean"]) == n_layers + 1
  return m


def _own_vector(params, cfg, tok, config, behavior):
  """The behavior's CAA vector at resid_post `[L, D]`, recomputed from its contrast pairs."""
  pairs = sweep.contrast_pairs(config, sweep.split_probes(config))[behavior][:config.n_vector_pairs]
  toks, mask = tk.encode_left_padded(tok, [p for p, _ in pairs] + [q for _, q in pairs], add_special_tokens=True)
  acts = last_token_resid(params, cfg, toks, mask, 4, site="resid_post")
  return acts[:, :len(pairs)].mean(1) - acts[:, len(pairs):].mean(1)


def test_sweep_run_tiny_model(tmp_path):
  params, mcfg = ours_from_torch(tiny_hf_model("llama", seed=2))
  config = get_config("quick")
  with config.unlocked():
    config.probe_steps = 50
    config.n_vector_pairs = 4
    config.probe_pairs.factual = 8
    config.probe_pairs.refusal = 8
    config.max_tokens.sycophancy = 96
    config.max_tokens.bias = 96
    config.exact_layers = [0, mcfg.n_layers - 2]
    config.baseline_n = 6
  config = from_configdict(SweepConfig, config)
  wd = str(tmp_path / "run")
  tok = CharTokenizer()
  params = jax.tree.map(jnp.asarray, params)
  path = sweep.run(config, wd, loaded=(params, mcfg, tok))
  assert path.endswith("report.md")
  m = _check_outputs(wd, mcfg.n_layers, config)
  check_map(wd, m)
  # an exact cell's delta, recomputed by a direct steered forward with the own vector rebuilt from its pairs
  probes = sweep.split_probes(config)
  for b in ("bias", "factual"):
    v = _own_vector(params, mcfg, tok, config, b)
    task = tasks_lib.build_task(b, tok, probes[b][0][:config.exact_probes], config.max_tokens[b])
    a = task.arrays()
    layer, alpha = config.exact_layers[1], config.exact_alphas[-1]

    def scores(iv=None):
      logits, _ = forward(params, a["tokens"], mcfg, attention_mask=a["mask"], interventions=iv,
                          logits=tasks_lib.logits_mode(b))
      return np.asarray(margins.probe_scores(b, logits, a))
    ref = scores(resid_add_at(mcfg.n_layers, layer, alpha * jnp.asarray(v[layer]))) - scores()
    cell = next(c for c in m["exact_cells"] if (c["behavior"], c["layer"], c["alpha"]) == (b, layer, alpha))
    np.testing.assert_allclose(cell["delta"], ref.mean(), rtol=1e-4, atol=1e-5)
    # the vector file the run wrote (row l + 1 = resid_post[l]) reproduces the same cell, and says so
    saved, meta = vectors.load_vector(os.path.join(wd, "vectors", f"{b}.caa.safetensors"))
    assert saved.shape == (mcfg.n_layers + 1, mcfg.d_model) and meta["behavior"] == b and meta["method"] == "caa"
    np.testing.assert_allclose(saved[1:], v, rtol=1e-5, atol=1e-6)
    again = scores(resid_add_at(mcfg.n_layers, layer, alpha * jnp.asarray(saved[layer + 1]))) - scores()
    np.testing.assert_allclose(cell["delta"], again.mean(), rtol=1e-4, atol=1e-5)
    ev = next(c for c in meta["evidence"]["exact_cells"] if (c["layer"], c["alpha"]) == (layer, alpha))
    assert ev["delta"] == cell["delta"] and ev["q"] == cell["q"] and meta["contrast_pairs"]["count"] == 4
    assert meta["evidence"]["screen"]["q"] == m["screen"]["behaviors"][b]["q"]
    np.testing.assert_allclose(m["screen"]["behaviors"][b]["vector_norm"], np.linalg.norm(v, axis=-1), rtol=1e-5)
  # rerun into the same workdir: every stage comes back from its checkpoint, with the same numbers and timings
  sweep.run(config, wd, loaded=(params, mcfg, tok))
  again = json.load(open(os.path.join(wd, "metrics.json")))
  assert again["timing"].pop("resumed") == ["baselines", "screen"] + [f"exact layer {l}" for l in config.exact_layers]
  for k in ("baseline_s", "screen_s") + tuple(f"exact_layer_{l}_s" for l in config.exact_layers):
    assert again["timing"][k] == m["timing"][k]
  assert json.dumps({**again, "timing": None}) == json.dumps({**m, "timing": None})
  assert "Restored from this workdir's checkpoints: baselines, screen, exact layer" in open(path).read()
  # a changed field that alters results is refused before anything is computed or written
  with pytest.raises(ResumeConfigError, match="n_boot"):
    sweep.run(dataclasses.replace(config, n_boot=config.n_boot + 1), wd, loaded=(params, mcfg, tok))


@pytest.mark.slow
def test_sweep_quick_smollm2_runs_without_test_only_packages(tmp_path):
  config = from_configdict(SweepConfig, get_config("quick"))
  wd = str(tmp_path / "run")
  run_runtime_only("probes.sweep", "--config=configs/sweep.py:quick", f"--workdir={wd}")
  m = _check_outputs(wd, 30, config)
  # SmolLM2 separates true from false statements better than chance somewhere in depth
  assert max(m["probes"]["truth"]["acc_mean"]) > 0.6
  assert all(np.isfinite(c["delta"]) for c in m["exact_cells"])
