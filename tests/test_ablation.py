"""Directional ablation: the activation intervention (models.interventions.ablate_direction) and weight
orthogonalisation (models.ablation.orthogonalize) are the same model, and the orthogonalised checkpoint written with
models.hf_io.save_hf loads in transformers with the intervention's logits; tied embeddings included."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models.ablation import orthogonalize
from models.hf_io import save_hf
from models.interventions import ablate_direction
from models.transformer import forward
from tests.reference import ours_from_torch, tiny_hf_model


@pytest.mark.parametrize("variant", ["llama", "qwen2"])          # untied, and tied with q/k/v biases
def test_orthogonalised_weights_equal_the_intervention_and_load_in_transformers(variant, tmp_path):
  params, cfg = ours_from_torch(tiny_hf_model(variant))
  L, D = cfg.n_layers, cfg.d_model
  r = np.random.default_rng(0).normal(size=D).astype(np.float32)
  toks = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 9)))
  iv_logits, acts = forward(params, toks, cfg, interventions=ablate_direction(L, 3.0 * r), capture=("resid",))
  unit = r / np.linalg.norm(r)
  # the residual stream has no component along r anywhere after the embeddings' ablation
  assert np.abs(np.asarray(acts["resid"][1:]) @ unit).max() < 1e-4
  base = np.asarray(forward(params, toks, cfg)[0])
  assert np.abs(np.asarray(iv_logits) - base).max() > 1e-3                # the ablation changes the model
  new, ncfg = orthogonalize(params, cfg, r)
  assert not ncfg.tie_embeddings and np.abs(np.asarray(new["embed"]) @ unit).max() < 1e-5
  ours = np.asarray(forward(new, toks, ncfg)[0])
  np.testing.assert_allclose(ours, np.asarray(iv_logits), atol=1e-4, rtol=0)
  out = save_hf(new, ncfg, str(tmp_path / "ablated"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(np.asarray(toks))).logits.numpy()
  np.testing.assert_allclose(ref, np.asarray(iv_logits), atol=1e-4, rtol=0)


def test_ablation_at_chosen_layers_only_and_bad_directions():
  params, cfg = ours_from_torch(tiny_hf_model("llama"))
  r = np.ones(cfg.d_model, np.float32)
  iv = ablate_direction(cfg.n_layers, r, layers=[1])
  assert np.count_nonzero(np.abs(np.asarray(iv.resid_ablate)).sum(-1)) == 1
  toks = jnp.asarray(np.random.default_rng(2).integers(0, 97, (1, 7)))
  _, acts = forward(params, toks, cfg, interventions=iv, capture=("resid",))
  along = np.abs(np.asarray(acts["resid"]) @ (r / np.linalg.norm(r))).max(axis=(1, 2))   # per boundary
  assert along[2] < 1e-5 and along[1] > 1e-3 and along[3] > 1e-3       # resid_post[1] only (boundary 2)
  with pytest.raises(ValueError, match="zero norm"):
    ablate_direction(cfg.n_layers, np.zeros(cfg.d_model))
  with pytest.raises(ValueError, match=r"non-zero \[\d+\] vector"):
    orthogonalize(params, cfg, np.ones(3))
