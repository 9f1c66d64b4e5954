"""Vector files (probes.vectors) and llama.cpp control vectors (probes.export_control_vector): exact round trips,
the layer mapping against transformers' decoder layers (torch forward hooks at each layer's output, llama.cpp's
convention), and one-line errors for bad input."""
import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.interventions import resid_add_at
from models.transformer import forward
from probes import export_control_vector as X
from probes import vectors as V
from tests.reference import ours_from_torch, tiny_hf_model


def _vector(L, D, seed=0):
  return np.random.default_rng(seed).normal(size=(L + 1, D)).astype(np.float32)


def test_vector_file_round_trip_and_errors(tmp_path):
  v = _vector(4, 8)
  path, side = V.save_vector(str(tmp_path / "b.caa.safetensors"), v, {"behavior": "bias", "evidence": {"q": [0.01]}})
  back, meta = V.load_vector(path)
  assert back.dtype == np.float32 and np.array_equal(back, v)
  assert meta["behavior"] == "bias" and meta["shape"] == [5, 8] and "row l + 1 = resid_post[l]" in meta["layer_convention"]
  assert sorted(os.listdir(tmp_path)) == ["b.caa.json", "b.caa.safetensors"]            # no temporary file left
  with pytest.raises(ValueError, match="must end in .safetensors"):
    V.save_vector(str(tmp_path / "x.npy"), v, {})
  with pytest.raises(ValueError, match=r"x.safetensors: tensor 'vector' must be a finite"):
    V.save_vector(str(tmp_path / "x.safetensors"), v[0], {})
  json.dump({**meta, "shape": [4, 8]}, open(side, "w"))
  with pytest.raises(ValueError, match="b.caa.safetensors: tensor 'vector' has shape"):
    V.load_vector(path)


def test_layer_spec_and_mapping():
  assert X.parse_layers("2-4", 6) == [2, 3, 4] and X.parse_layers("5,1,3", 6) == [1, 3, 5]
  for bad in ("0-2", "3-6", "a-b", ""):
    with pytest.raises(ValueError, match="--layers="):
      X.parse_layers(bad, 6)
  v = _vector(6, 4)
  d = X.control_directions(v, [1, 5], 2.5)
  assert sorted(d) == [1, 5]
  np.testing.assert_array_equal(d[1], 2.5 * v[2])            # direction.{l} = alpha * resid_post[l] = row l + 1
  np.testing.assert_array_equal(d[5], 2.5 * v[6])


def test_control_vector_gguf_reproduces_steering_and_llama_cpp_semantics(tmp_path):
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  L, D = cfg.n_layers, cfg.d_model
  v = _vector(L, D, seed=1) * 0.5
  V.save_vector(str(tmp_path / "refusal.caa.safetensors"), v,
                {"model": "tiny", "architecture": "llama", "behavior": "refusal", "method": "caa",
                 "evidence": {"screen": {"q": [0.2] * L}}})
  out = X.export(str(tmp_path / "refusal.caa.safetensors"), f"1-{L - 1}", 3.0, str(tmp_path / "refusal.gguf"))
  dirs, meta = X.read_control_vector(out)
  assert sorted(dirs) == list(range(1, L)) and 0 not in dirs
  assert meta["general.architecture"] == "controlvector" and meta["controlvector.layer_count"] == L - 1
  assert meta["controlvector.model_hint"] == "llama" and meta["gravlab.behavior"] == "refusal"
  assert json.loads(meta["gravlab.layers"]) == list(range(1, L)) and json.loads(meta["gravlab.alpha"]) == 3.0
  toks = np.random.default_rng(2).integers(0, 97, (2, 9))
  ours = np.asarray(forward(params, jnp.asarray(toks), cfg, interventions=X.to_interventions(dirs, L))[0])
  # llama.cpp's semantics in transformers: direction.{il} added to decoder layer il's output, every position
  hooks = [model.model.layers[il].register_forward_hook(
      lambda m, a, o, t=torch.tensor(d): (o[0] + t, *o[1:]) if isinstance(o, tuple) else o + t)
      for il, d in dirs.items()]
  try:
    with torch.no_grad():
      ref = model(torch.tensor(toks)).logits.numpy()
  finally:
    for h in hooks:
      h.remove()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # one exported layer equals the sweep's own steering of that cell (resid_add_at, alpha x row l + 1)
  X.write_control_vector(str(tmp_path / "one.gguf"), X.control_directions(v, [2], 3.0), "llama")
  one, _ = X.read_control_vector(str(tmp_path / "one.gguf"))
  cell = forward(params, jnp.asarray(toks), cfg, interventions=resid_add_at(L, 2, 3.0 * jnp.asarray(v[3])))[0]
  got = forward(params, jnp.asarray(toks), cfg, interventions=X.to_interventions(one, L))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(cell), atol=1e-5, rtol=0)
  assert not np.allclose(np.asarray(cell), np.asarray(forward(params, jnp.asarray(toks), cfg)[0]), atol=1e-3)


def test_read_control_vector_refuses_other_gguf_files(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
  w.add_tensor("token_embd.weight", np.zeros((2, 2), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(ValueError, match="m.gguf: general.architecture is 'llama'"):
    X.read_control_vector(str(tmp_path / "m.gguf"))
