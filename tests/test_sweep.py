"""The sweep entry point end to end: a tiny random model with a character tokenizer (fast), and the real SmolLM2
`:quick` config (slow)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sweep import get_config
from probes import sweep, sweep_report
from probes.sweep_config import SweepConfig
from tests.reference import ours_from_torch, tiny_hf_model
from tests.runtime_only import run_runtime_only
from tests.test_probes_stats import CharTokenizer
from train.typed_config import from_configdict


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


@pytest.mark.parametrize("readout", ["logprob", "generate"])
def test_sweep_run_tiny_model(tmp_path, readout):
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
    config.readout = readout
    config.gen_max_cells = 2
  config = from_configdict(SweepConfig, config)
  wd = str(tmp_path / "run")
  tok = CharTokenizer()
  params = jax.tree.map(jnp.asarray, params)
  path = sweep.run(config, wd, loaded=(params, mcfg, tok))
  assert path.endswith("report.md")
  m = _check_outputs(wd, mcfg.n_layers, config)
  assert m["n_probes"] == {b: 4 for b in config.behaviors}
  report = open(path).read()
  assert m["readout"] == readout and f"Readout of bias and sycophancy: **{sweep_report.READOUT_TEXT[readout]}**" in report
  # the generation readout's baseline, recomputed here with models.generate + rho-eval's parse
  from models.generate import generate
  from probes import tasks as tasks_lib
  probes = sweep.split_probes(config)
  for b in ("bias", "sycophancy"):
    gt = tasks_lib.build_generation_task(b, tok, probes[b][0])
    new = generate(params, mcfg, jnp.asarray(gt.tokens), jnp.asarray(gt.mask), max_new_tokens=5, eos_ids=(2,),
                   pad_id=0)
    assert m["baseline_generation"][b]["score"] == float(tasks_lib.generation_readout(gt, tok, new, (2,))["score"])
    expected = m["baseline_generation"][b]["score"] if readout == "generate" else m["baseline_logprob"][b]
    assert m["baseline"][b] == expected
  # kill-zone table: one row per zone, or one "none" row per behavior
  table = report.split("## Kill zones")[1].split("\n\n")[2].splitlines()
  assert table[0].startswith("| behavior | alpha | window: layers | depth % | delta (at layer) | z vs control")
  assert "control band" in table[0]
  assert {r.split("|")[1].strip() for r in table[2:]} == set(config.behaviors)
  if readout == "logprob":
    cells = m["generation_cells"]
    assert {c["behavior"] for c in cells} == {"bias", "sycophancy"} and len(cells) <= 4
    assert all(len(c["ctrl_scores"]) == config.n_random for c in cells)
    assert "### Generation readout at the kill-zone cells" in report
  else:
    assert m["generation_cells"] == []


@pytest.mark.slow
def test_sweep_quick_smollm2_runs_without_test_only_packages(tmp_path):
  config = get_config("quick")
  wd = str(tmp_path / "run")
  run_runtime_only("probes.sweep", "--config=configs/sweep.py:quick", f"--workdir={wd}")
  m = _check_outputs(wd, 30, config)
  # SmolLM2 separates true from false statements better than chance somewhere in depth
  assert max(m["probes"]["truth"]["acc_mean"]) > 0.6
  assert np.isfinite(np.array(m["z"])).all()
