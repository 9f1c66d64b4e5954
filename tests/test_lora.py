"""LoRA adapters: PEFT initialisation, target / window selection, merge, and PEFT export parity with transformers."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.lora import adapt
from models.params import init_params
from models.transformer import forward_jit as forward
from train import adapters

CFG = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)


@functools.lru_cache(maxsize=None)
def _params():
  return init_params(CFG, jax.random.PRNGKey(0), std=0.1)


def _random_lora(spec, key, scale=0.3):
  """Adapters with non-zero B (trained-like), zero outside the window."""
  lora = adapters.init_lora(spec, CFG, key)
  m = jnp.asarray(spec.layer_mask())[:, None, None]
  for i, t in enumerate(lora):
    lora[t]["b"] = scale * jax.random.normal(jax.random.fold_in(key, i), lora[t]["b"].shape) * m
  return lora


def test_b_zero_leaves_logits_unchanged():
  params = _params()
  spec = adapters.LoraSpec.create(CFG, rank=4, alpha=8, targets="all")
  lora = adapters.init_lora(spec, CFG, jax.random.PRNGKey(1))
  assert all(float(jnp.abs(ab["a"]).max()) > 0 for ab in lora.values())
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, CFG.vocab_size)
  base, _ = forward(params, toks, CFG)
  with_lora, _ = forward(adapt(params, lora, spec.scale), toks, CFG)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))


def test_init_matches_peft_kaiming_uniform():
  """A ~ U(-1/sqrt(in), 1/sqrt(in)) as torch's kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in]."""
  import torch
  spec = adapters.LoraSpec.create(CFG, rank=64, alpha=8, targets="down")
  a = np.asarray(adapters.init_lora(spec, CFG, jax.random.PRNGKey(0))["w_down"]["a"])
  d_in = CFG.d_ff
  w = torch.empty(64, d_in)
  torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
  bound_torch = float(w.abs().max())
  assert np.abs(a).max() <= 1 / math.sqrt(d_in) + 1e-7
  assert bound_torch <= 1 / math.sqrt(d_in) + 1e-7
  # Uniform on [-b, b]: std b/sqrt(3), the same for both (n = 4 * 48 * 64 samples).
  assert abs(a.std() - float(w.std())) < 0.05 * float(w.std())


def test_scale_and_rslora():
  assert adapters.LoraSpec.create(CFG, rank=16, alpha=32).scale == 2.0
  assert adapters.LoraSpec.create(CFG, rank=16, alpha=32, rslora=True).scale == 8.0


def test_targets_and_windows():
  assert adapters.resolve_targets("q,v") == ("wq", "wv")
  assert adapters.resolve_targets(["gate_proj", "w_(up|down)"]) == ("w_gate", "w_up", "w_down")
  assert adapters.resolve_targets("all") == adapters.LORA_TARGETS
  assert adapters.resolve_layers(30, depth=(0.35, 0.52)) == (11, 12, 13, 14, 15)
  assert adapters.resolve_layers(4, layers=(1, 2)) == (1, 2)
  assert adapters.resolve_layers(4) == (0, 1, 2, 3)


@pytest.mark.parametrize("kw, msg", [
    (dict(targets="qq"), "matches no module"),
    (dict(targets="x_proj"), "matches no module"),
    (dict(layers=(2, 9)), "outside the model"),
    (dict(layers=(3, 1)), "lo > hi"),
    (dict(depth=(0.9, 0.95)), "contains no layer"),
    (dict(depth=(0.2, 1.5)), "depth window"),
    (dict(layers=(0, 1), depth=(0.1, 0.2)), "not both"),
    (dict(rank=0), "rank"),
])
def test_bad_spec_errors(kw, msg):
  args = dict(rank=4, alpha=8)
  args.update(kw)
  with pytest.raises(adapters.AdapterError, match=msg):
    adapters.LoraSpec.create(CFG, **args)


def test_window_layers_zero_and_merge_equals_adapter_forward():
  params = _params()
  spec = adapters.LoraSpec.create(CFG, rank=4, alpha=8, targets="q,k,v,o,gate,up,down", layers=(1, 2))
  lora = _random_lora(spec, jax.random.PRNGKey(3))
  for ab in lora.values():
    assert float(jnp.abs(ab["a"][jnp.asarray([0, 3])]).max()) == 0.0
  toks = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, CFG.vocab_size)
  adapted, _ = forward(adapt(params, lora, spec.scale), toks, CFG)
  base, _ = forward(params, toks, CFG)
  merged, _ = forward(adapters.merge_lora(params, lora, spec.scale), toks, CFG)
  assert float(jnp.abs(adapted - base).max()) > 1e-2          # the adapter does something
  np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=2e-5, rtol=1e-5)


def test_adapters_from_skips_the_frozen_prefix_with_identical_values_and_gradients():
  """forward(adapters_from=first adapted layer): same logits and LoRA gradients as the full-depth scan, and the
  jaxpr of the gradient has one layer scan in the backward pass over only the adapted layers."""
  from models.transformer import forward as fwd
  params = _params()
  spec = adapters.LoraSpec.create(CFG, rank=4, alpha=8, targets="all", layers=(2, 3))
  lora = _random_lora(spec, jax.random.PRNGKey(5))
  toks = jax.random.randint(jax.random.PRNGKey(6), (2, 9), 0, CFG.vocab_size)

  def loss(lo, lora_from):
    logits, _ = fwd(adapt(params, lo, spec.scale), toks, CFG, adapters_from=lora_from)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3])

  full = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (v0, g0), (v2, g2) = full(lora, 0), full(lora, min(spec.layers))
  np.testing.assert_allclose(float(v2), float(v0), rtol=1e-6)
  for t in lora:
    for f in ("a", "b"):
      np.testing.assert_allclose(np.asarray(g2[t][f]), np.asarray(g0[t][f]), rtol=1e-5, atol=1e-6)
      assert float(jnp.abs(g2[t][f][:2]).max()) == 0.0
  assert float(jnp.abs(g2["wq"]["b"][2:]).max()) > 0
  lengths = lambda lf: sorted(e.params["length"] for e in jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
      lora, lf).eqns if e.primitive.name == "scan")
  assert lengths(0) == [4, 4]                 # forward and backward over all 4 layers
  assert lengths(2) == [2, 2, 2]              # frozen prefix forward only; adapted layers forward + backward


def test_peft_export_loads_and_reproduces_logits(tmp_path):
  """Our PEFT export, loaded by peft.PeftModel onto the transformers model, gives our adapter logits."""
  import torch
  from peft import PeftModel

  from tests.reference import ours_from_torch, tiny_hf_model
  hf = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(hf)
  spec = adapters.LoraSpec.create(cfg, rank=4, alpha=12, targets="q,v,o,down", layers=(1, 2), rslora=True)
  lora = adapters.init_lora(spec, cfg, jax.random.PRNGKey(5))
  m = jnp.asarray(spec.layer_mask())[:, None, None]
  lora = {t: {"a": ab["a"], "b": 0.2 * jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape) * m}
          for i, (t, ab) in enumerate(lora.items())}
  out = adapters.save_peft(spec, lora, str(tmp_path / "adapter"), base_model="tiny")
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  peft_model = PeftModel.from_pretrained(hf, out).eval()
  keys = [k for k in peft_model.state_dict() if "lora_A" in k]
  assert len(keys) == 4 * 2                                    # 4 modules x 2 window layers, nothing else
  with torch.no_grad():
    ref = peft_model(torch.as_tensor(toks)).logits.numpy()
  ours, _ = forward(adapt(params, lora, spec.scale), jnp.asarray(toks), cfg)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  ours_base, _ = forward(params, jnp.asarray(toks), cfg)
  assert np.abs(np.asarray(ours_base) - ref).max() > 1e-3       # the adapter was really applied
  # Round trip through load_peft.
  spec2, lora2 = adapters.load_peft(out, cfg)
  assert spec2 == spec
  for t in lora:
    np.testing.assert_array_equal(np.asarray(lora2[t]["b"]), np.asarray(lora[t]["b"]))


def test_merged_export_matches_transformers(tmp_path):
  """save_hf of the merged weights loads in transformers with the adapter forward's logits."""
  import torch
  import transformers

  from models.hf_io import save_hf
  params = _params()
  spec = adapters.LoraSpec.create(CFG, rank=2, alpha=4, targets="w_up,wk")
  lora = _random_lora(spec, jax.random.PRNGKey(6))
  out = save_hf(adapters.merge_lora(params, lora, spec.scale), CFG, tmp_path / "merged")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  toks = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8))
  with torch.no_grad():
    ref = hf(torch.as_tensor(toks)).logits.numpy()
  ours, _ = forward(adapt(params, lora, spec.scale), jnp.asarray(toks), CFG)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
