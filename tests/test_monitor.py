"""The reversion monitor (analysis.monitor) on adapters written by PEFT from a tiny transformers model: its
alignments against the same quantities computed in torch from PEFT's merged models, checkpoint ordering, the
alert threshold and its exit status."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from analysis import monitor
from tests.reference import ours_from_torch, tiny_hf_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_adapter(model, out_dir, seed, scale=0.3):
  """A PEFT LoRA on a copy of `model` with random A and B, saved with PEFT's save_pretrained; the merged model."""
  torch.manual_seed(seed)
  pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.copy_(torch.randn_like(p) * scale)
  pm.save_pretrained(out_dir)
  return pm.merge_and_unload().eval()


def _last(model, toks):
  with torch.no_grad():
    hs = model(torch.tensor(toks), output_hidden_states=True).hidden_states
  return np.stack([h[:, -1].numpy() for h in hs[:-1]])          # boundaries 0..L-1 (HF's last one is normed)


def test_monitor_matches_torch_on_peft_checkpoints(tmp_path):
  base = tiny_hf_model("llama").eval()
  params, cfg = ours_from_torch(base)
  ref_t = _peft_adapter(base, str(tmp_path / "reference"), 0)
  ckpts = {s: _peft_adapter(ref_t, str(tmp_path / "run" / f"checkpoint-{s}"), s, scale=0.2 * (s // 10))
           for s in (10, 20, 100)}
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 97, (12, 7)), rng.integers(0, 97, (12, 7))
  ones = np.ones_like(a)
  ref = monitor.load_variant(str(tmp_path / "reference"), params, cfg)
  paths = sorted((str(tmp_path / "run" / f"checkpoint-{s}") for s in ckpts), key=monitor.step_of)
  assert [monitor.step_of(p) for p in paths] == [10, 20, 100]
  res = monitor.measure(params, ref, ((p, monitor.load_variant(p, ref, cfg)) for p in paths), cfg, (a, ones),
                        (b, ones), null_samples=500)
  # torch: the same quantities from PEFT's merged models (decoder-layer boundaries 1..L-1 of HF's hidden states)
  v = _last(base, a).mean(1) - _last(ref_t, a).mean(1)
  rb = _last(ref_t, b).mean(1)
  L = cfg.n_layers
  for s, p in zip(ckpts, paths):
    d = _last(ckpts[s], b).mean(1) - rb
    cos = [float(d[l] @ v[l] / np.linalg.norm(d[l]) / np.linalg.norm(v[l])) for l in range(1, L)]
    np.testing.assert_allclose(res["checkpoints"][p]["alignment_layer"][:L - 1], cos, atol=1e-4)
  assert 0 < res["null_isotropic_p99"] < res["null_covariance_p99"] < 1
  # threshold and outputs: everything above -1 alerts, nothing above +1 does
  out = monitor.write_outputs(str(tmp_path / "mon"), res, threshold=-1.0)
  j = json.load(open(out))
  assert j["alert"] and j["alerting_checkpoints"] == paths
  assert not json.load(open(monitor.write_outputs(str(tmp_path / "mon2"), res, threshold=1.0)))["alert"]
  assert os.path.isfile(tmp_path / "mon" / "monitor.png") and "| checkpoint-100 | 100 |" in open(
      tmp_path / "mon" / "monitor.md").read()


def test_monitor_bad_input(tmp_path):
  with pytest.raises(ValueError, match="no directory matches"):
    monitor.run("smollm2-135m-instruct", str(tmp_path), str(tmp_path / "nothing-*"), str(tmp_path / "o"))
  assert monitor.step_of("runs/x/checkpoint-1500/") == 1500 and monitor.step_of("final") == -1
