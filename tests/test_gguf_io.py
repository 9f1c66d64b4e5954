"""Tests for models.gguf_io.

Fast tests write tiny random GGUF files with `gguf.GGUFWriter`, permuting Llama Q/K rows the way llama.cpp's
convert_hf_to_gguf.py does, and check that the loader gives back the original HF-orientation tensors exactly.
Slow tests compare the real embedded models with transformers' own GGUF loader.
"""
import os

import gguf
import numpy as np
import pytest

from models import gguf_io, registry
from models.config import ModelConfig
from models.errors import CorruptFileError, MissingTensorError, ModelError, UnsupportedArchitectureError
from models.params import GLOBAL_SPECS, LAYER_SPECS, global_shapes, hf_tensors, layer_shapes
from models.gguf_io import config_from_gguf, load_gguf, load_gguf_tokenizer

TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=24,
            rms_eps=1e-5, rope_theta=50000.0, max_position_embeddings=128, bos_token_id=1,
            eos_token_ids=(2,), pad_token_id=0)


def llama_cpp_permute(weights, n_head, n_head_kv=None):
  """Verbatim from llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF -> GGUF row order)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def tiny_cfg(arch="llama", **kw):
  extra = {"qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True)}.get(arch, {})
  return ModelConfig(arch=arch, **{**TINY, **extra, **kw})


def hf_state(cfg, seed=0):
  """Random HF-named float32 tensors (HF orientation, [out, in] for Linear weights) for `cfg`."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in global_shapes(cfg).items():
    spec = GLOBAL_SPECS[name]
    out[spec.hf] = rng.normal(size=shape[::-1] if spec.transpose else shape).astype(np.float32)
  for i in range(cfg.n_layers):
    for name, shape in layer_shapes(cfg).items():
      spec = LAYER_SPECS[name]
      out[spec.hf.format(i=i)] = rng.normal(size=shape[::-1] if spec.transpose else shape).astype(np.float32)
  return out


def write_gguf(path, cfg, state, *, arch=None, drop=(), extra_tensors=None):
  """Write `state` (HF names) as a llama.cpp-style GGUF: GGUF names, metadata, Q/K permuted for llama."""
  arch = arch or cfg.arch
  w = gguf.GGUFWriter(os.fspath(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
  w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_ids[0])
  w.add_pad_token_id(cfg.pad_token_id)
  for hf_name, arr in state.items():
    name = gguf_io.gguf_name(hf_name)
    if name in drop:
      continue
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      arr = llama_cpp_permute(arr, cfg.n_heads, cfg.n_kv_heads if ".attn_k." in name else cfg.n_heads)
    w.add_tensor(name, np.ascontiguousarray(arr))
  for name, arr in (extra_tensors or {}).items():
    w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return os.fspath(path)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
def test_roundtrip_recovers_hf_tensors(tmp_path, arch, tied):
  cfg = tiny_cfg(arch, tie_embeddings=tied)
  state = hf_state(cfg)
  path = write_gguf(tmp_path / "tiny.gguf", cfg, state)
  assert config_from_gguf(path) == cfg
  params, got_cfg = load_gguf(path)
  assert got_cfg == cfg
  ours = dict(hf_tensors(params, got_cfg))
  assert sorted(ours) == sorted(state)
  for name, ref in state.items():
    np.testing.assert_array_equal(ours[name], ref, err_msg=name)


def test_unpermute_matches_rope_pairing():
  """GGUF row 2j+s of a head is HF row s*hd/2 + j (interleaved pairs vs rotate-half halves)."""
  n_head, hd = 3, 8
  hf = np.arange(n_head * hd * 5, dtype=np.float32).reshape(n_head * hd, 5)
  g = gguf_io.permute_qk(hf, n_head)
  for h in range(n_head):
    for j in range(hd // 2):
      for s in range(2):
        np.testing.assert_array_equal(g[h * hd + 2 * j + s], hf[h * hd + s * hd // 2 + j])
  np.testing.assert_array_equal(g, llama_cpp_permute(hf, n_head))
  np.testing.assert_array_equal(gguf_io.unpermute_qk(g, n_head), hf)
  bias = np.arange(n_head * hd, dtype=np.float32)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(gguf_io.permute_qk(bias, n_head), n_head), bias)


def test_llama_q_is_actually_unpermuted(tmp_path):
  """Guard against a loader that skips the unpermute: the file's Q rows differ from HF's."""
  cfg = tiny_cfg()
  state = hf_state(cfg)
  path = write_gguf(tmp_path / "tiny.gguf", cfg, state)
  stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
  hf_q = state["model.layers.0.self_attn.q_proj.weight"]
  assert not np.array_equal(stored["blk.0.attn_q.weight"], hf_q)
  params, _ = load_gguf(path)
  np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][0]).T, hf_q)


def test_bfloat16_dtype(tmp_path):
  import jax.numpy as jnp
  cfg = tiny_cfg()
  path = write_gguf(tmp_path / "tiny.gguf", cfg, hf_state(cfg))
  params, _ = load_gguf(path, dtype=jnp.bfloat16)
  assert params["layers"]["wq"].dtype == jnp.bfloat16
  assert params["layers"]["wq"].shape == (2, 16, 16)


def test_truncated_file_raises_corrupt(tmp_path):
  cfg = tiny_cfg()
  good = write_gguf(tmp_path / "tiny.gguf", cfg, hf_state(cfg))
  data = open(good, "rb").read()
  for cut in (0, 3, 10, 40, 200, len(data) // 2, len(data) - 1):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    for fn in (config_from_gguf, load_gguf):
      with pytest.raises(CorruptFileError, match=f"cut{cut}.gguf"):
        fn(bad)


def test_garbage_file_raises_corrupt(tmp_path):
  bad = tmp_path / "garbage.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(CorruptFileError, match="garbage.gguf"):
    load_gguf(bad)


def test_missing_path(tmp_path):
  with pytest.raises(ModelError, match="nope.gguf"):
    load_gguf(tmp_path / "nope.gguf")
  with pytest.raises(ModelError, match="nope.gguf"):
    load_gguf_tokenizer(tmp_path / "nope.gguf")


def test_unsupported_arch(tmp_path):
  cfg = tiny_cfg()
  path = write_gguf(tmp_path / "phi.gguf", cfg, hf_state(cfg), arch="phi3")
  with pytest.raises(UnsupportedArchitectureError, match=r"phi\.gguf.*'phi3'"):
    load_gguf(path)


def test_rope_freqs_tensor_is_rejected(tmp_path):
  cfg = tiny_cfg()
  path = write_gguf(tmp_path / "l3.gguf", cfg, hf_state(cfg),
                    extra_tensors={"rope_freqs.weight": np.ones(cfg.head_dim // 2, np.float32)})
  with pytest.raises(UnsupportedArchitectureError, match=r"l3\.gguf.*rope_freqs.*safetensors"):
    config_from_gguf(path)


def test_missing_tensor(tmp_path):
  cfg = tiny_cfg()
  path = write_gguf(tmp_path / "tiny.gguf", cfg, hf_state(cfg), drop=("blk.1.ffn_up.weight",))
  with pytest.raises(MissingTensorError, match=r"tiny\.gguf.*blk\.1\.ffn_up\.weight.*model\.layers\.1\.mlp"):
    load_gguf(path)


# ------------------------------------------------------------------------------------- real models (slow)
def _real_gguf(name):
  if name == "qwen2.5-coder-0.5b-instruct":
    path = registry.cache_path(name)
    if not os.path.isfile(path):
      pytest.skip("run `make qwen` first")
    return path
  try:
    return registry.resolve(name).path
  except ModelError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def real_model(request):
  return _real_gguf(request.param)


@pytest.mark.slow
def test_real_weights_match_transformers(real_model):
  import torch
  from transformers import AutoModelForCausalLM
  params, cfg = load_gguf(real_model)
  ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(real_model), gguf_file=os.path.basename(real_model),
                                             dtype=torch.float32, local_files_only=True)
  theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert ref.config.tie_word_embeddings == cfg.tie_embeddings
  assert ref.config.num_hidden_layers == cfg.n_layers and ref.config.vocab_size == cfg.vocab_size
  ours = dict(hf_tensors(params, cfg))
  expected = set(theirs) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
  assert set(ours) == expected
  for name, arr in ours.items():
    assert arr.shape == theirs[name].shape, name
    assert float(np.max(np.abs(arr - theirs[name]))) <= 1e-6, name
