"""Tests of models.hf_io against transformers' own save_pretrained / from_pretrained (tiny random models)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from models import hf_io
from models.errors import (CorruptFileError, MissingTensorError, ModelError, ShapeMismatchError,
                           UnsupportedArchitectureError)
from models.hf_io import SafetensorsReader, load_hf, save_hf
from models.params import hf_tensors
from tests.reference import tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# variant -> (tests.reference variant, overrides)
VARIANTS = {
    "llama": ("llama", dict(num_hidden_layers=2)),
    "llama3_tied": ("llama_tied_llama3", {}),
    "qwen2": ("qwen2", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "qwen3_tied": ("qwen3", dict(num_hidden_layers=2, tie_word_embeddings=True)),
}


def _tiny_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
  """Random fp32 *ForCausalLM (tests.reference) with vocab 128 and d_ff 96."""
  base, overrides = VARIANTS[variant]
  return tiny_hf_model(base, seed=seed, vocab_size=128, intermediate_size=96, **overrides)


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """`ckpt(variant) -> (directory, torch model, numpy state_dict)`, each saved once per module."""
  cache = {}

  def get(variant):
    if variant not in cache:
      model = _tiny_model(variant)
      d = str(tmp_path_factory.mktemp(variant))
      model.save_pretrained(d, safe_serialization=True)
      cache[variant] = (d, model, _state_dict(model))
    return cache[variant]
  return get


def _copy(ckpt_dir, tmp_path) -> str:
  dst = str(tmp_path / "ckpt")
  shutil.copytree(ckpt_dir, dst)
  return dst


def _ours(params, cfg) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in hf_tensors(params, cfg)}


def _expected(sd, cfg) -> dict[str, np.ndarray]:
  return {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


def _assert_same_tensors(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(np.asarray(got[k], np.float32), want[k], err_msg=k)


def _assert_same_params(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _edit_config(d, **changes):
  path = os.path.join(d, "config.json")
  with open(path) as f:
    c = json.load(f)
  c.update(changes)
  with open(path, "w") as f:
    json.dump(c, f)


# -------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_recovers_every_tensor_and_the_config(ckpt, variant):
  d, model, sd = ckpt(variant)
  params, cfg = load_hf(d)
  hc = model.config
  head_dim = 24 if variant == "qwen3_tied" else 16
  assert params["embed"].dtype == jnp.float32
  assert ("lm_head" in params) == (not hc.tie_word_embeddings)
  _assert_same_tensors(_ours(params, cfg), _expected(sd, cfg))
  assert (cfg.arch, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff) == (
      hc.model_type, 128, 64, hc.num_hidden_layers, 96)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4, 2, head_dim)
  assert cfg.rms_eps == 1e-5 and cfg.tie_embeddings == hc.tie_word_embeddings
  assert cfg.qkv_bias == (variant == "qwen2") and cfg.qk_norm == (variant == "qwen3_tied")
  assert not cfg.o_bias
  assert params["layers"]["wq"].shape == (hc.num_hidden_layers, 64, 4 * head_dim)
  assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
  if variant == "llama3_tied":
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_pos, cfg.rope_theta) == ("llama3", 8.0, 1.0, 4.0, 16, 500000.0)
  else:
    assert cfg.rope_type == "default"


def test_tied_checkpoint_with_an_lm_head_tensor_is_accepted(ckpt, tmp_path):
  d, _, sd = ckpt("llama3_tied")
  d = _copy(d, tmp_path)
  path = os.path.join(d, "model.safetensors")
  with safe_open(path, "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  assert "lm_head.weight" not in tensors      # transformers drops the tied copy
  tensors["lm_head.weight"] = np.zeros_like(tensors["model.embed_tokens.weight"])
  save_file(tensors, path, metadata={"format": "pt"})
  params, cfg = load_hf(d)
  assert "lm_head" not in params
  _assert_same_tensors(_ours(params, cfg), _expected(sd, cfg))


def test_sharded_checkpoint_loads_the_same(ckpt, tmp_path):
  d, model, sd = ckpt("qwen2")
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="50KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
  params, cfg = load_hf(sharded)
  _assert_same_tensors(_ours(params, cfg), _expected(sd, cfg))
  _assert_same_params(params, load_hf(d)[0])


@pytest.mark.parametrize("want", [jnp.bfloat16, jnp.float32])
def test_bf16_checkpoint_loads(tmp_path, want):
  model = _tiny_model("llama3_tied").to(torch.bfloat16)   # a fresh model: .to() is in place
  d = str(tmp_path / "bf16")
  model.save_pretrained(d, safe_serialization=True)
  sd_bf16 = _state_dict(model)
  with SafetensorsReader([os.path.join(d, "model.safetensors")]) as r:
    assert r.get_tensor("model.embed_tokens.weight").dtype == ml_dtypes.bfloat16   # really stored as BF16
  params, cfg = load_hf(d, dtype=want)
  assert all(x.dtype == want for x in jax.tree_util.tree_leaves(params))
  _assert_same_tensors(_ours(params, cfg), _expected(sd_bf16, cfg))


def test_sharding_fn_is_called_per_stacked_parameter(ckpt):
  d, _, _ = ckpt("llama")
  seen = []
  dev = jax.devices()[0]

  def sharding_fn(path, shape):
    seen.append((path, shape))
    return jax.sharding.SingleDeviceSharding(dev)
  params, _ = load_hf(d, sharding_fn=sharding_fn)
  assert ("layers/w_gate", (2, 64, 96)) in seen and ("lm_head", (64, 128)) in seen
  assert len(seen) == len(jax.tree_util.tree_leaves(params))


# -------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_through_transformers(ckpt, tmp_path, variant):
  d, model, sd = ckpt(variant)
  params, cfg = load_hf(d)
  out = save_hf(params, cfg, tmp_path / "out")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["out"]      # no temp dir left behind
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "float32"
  with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
    assert ("lm_head.weight" in f.keys()) == (not cfg.tie_embeddings)
    assert f.metadata() == {"format": "pt"}
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
  _assert_same_tensors(_state_dict(reloaded), sd)
  tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    a, b = model(tokens).logits, reloaded(tokens).logits
  assert a.dtype == b.dtype == torch.float32
  assert (a - b).abs().max().item() <= 1e-6
  params2, cfg2 = load_hf(out)
  assert cfg2 == cfg
  _assert_same_params(params2, params)


def test_save_sharded_round_trip(ckpt, tmp_path):
  d, _, sd = ckpt("qwen2")
  params, cfg = load_hf(d)
  out = save_hf(params, cfg, tmp_path / "out", max_shard_bytes=40_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files and len(shards) > 2
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == shards and sorted(index["weight_map"]) == sorted(sd)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd.values())
  for s in shards:
    assert os.path.getsize(os.path.join(out, s)) < 40_000 + 64 * 1024   # tensors <= 40 kB plus a header
  _assert_same_tensors(_state_dict(transformers.AutoModelForCausalLM.from_pretrained(out)), sd)
  _assert_same_params(load_hf(out)[0], params)


def test_save_bf16_and_tokenizer(ckpt, tmp_path):
  d, model, sd = ckpt("llama")
  params, cfg = load_hf(d)

  class FakeTokenizer:
    def save_pretrained(self, directory):
      with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        f.write("{}")

  out = save_hf(params, cfg, tmp_path / "out", dtype=jnp.bfloat16, tokenizer=FakeTokenizer())
  assert "tokenizer.json" in os.listdir(out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  want = {k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
  _assert_same_tensors(_state_dict(reloaded), want)
  p16, _ = load_hf(out, dtype=jnp.bfloat16)
  _assert_same_params(p16, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))


def test_save_into_existing_directories(ckpt, tmp_path):
  d, _, _ = ckpt("llama")
  params, cfg = load_hf(d)
  empty = tmp_path / "empty"
  empty.mkdir()
  save_hf(params, cfg, empty)                              # an empty directory is fine
  assert "model.safetensors" in os.listdir(empty)
  full = tmp_path / "full"
  full.mkdir()
  (full / "old.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=str(full)):
    save_hf(params, cfg, full)
  assert os.listdir(full) == ["old.txt"]
  save_hf(params, cfg, full, overwrite=True)
  assert sorted(os.listdir(full)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["empty", "full"]  # no .tmp-/.old- siblings left
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="not a plain directory"):
    save_hf(params, cfg, tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(ckpt, tmp_path, monkeypatch, existing):
  d, _, _ = ckpt("llama")
  params, cfg = load_hf(d)
  parent = tmp_path / "parent"
  parent.mkdir()
  out = parent / "out"
  if existing:
    out.mkdir()
    (out / "old.txt").write_text("keep me")
  calls = []

  def flaky_save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:
      raise OSError("disk full")
    save_file(tensors, filename, metadata=metadata)
  monkeypatch.setattr(hf_io, "save_file", flaky_save_file)
  with pytest.raises(OSError, match="disk full"):
    save_hf(params, cfg, out, max_shard_bytes=40_000, overwrite=existing)
  assert len(calls) == 2
  if existing:
    assert os.listdir(parent) == ["out"] and os.listdir(out) == ["old.txt"]
  else:
    assert os.listdir(parent) == []


# -------------------------------------------------------------------------------------------- bad input
def test_missing_tensor(ckpt, tmp_path):
  d = _copy(ckpt("llama")[0], tmp_path)
  path = os.path.join(d, "model.safetensors")
  with safe_open(path, "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(MissingTensorError, match="model.layers.1.mlp.up_proj.weight") as e:
    load_hf(d)
  assert d in str(e.value)


def test_shape_mismatch(ckpt, tmp_path):
  d = _copy(ckpt("llama")[0], tmp_path)
  _edit_config(d, intermediate_size=80)
  with pytest.raises(ShapeMismatchError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight") as e:
    load_hf(d)
  assert d in str(e.value) and "(96, 64)" in str(e.value) and "(80, 64)" in str(e.value)


def test_unsupported_model_type(ckpt, tmp_path):
  d = _copy(ckpt("llama")[0], tmp_path)
  _edit_config(d, model_type="gpt2")
  with pytest.raises(UnsupportedArchitectureError, match="gpt2") as e:
    load_hf(d)
  assert os.path.join(d, "config.json") in str(e.value)


@pytest.mark.parametrize("keep", [4, 1000, -100])
def test_truncated_safetensors(ckpt, tmp_path, keep):
  d = _copy(ckpt("llama")[0], tmp_path)
  path = os.path.join(d, "model.safetensors")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:keep])
  with pytest.raises(CorruptFileError) as e:
    load_hf(d)
  assert path in str(e.value)


def test_truncated_shard_and_missing_shard(ckpt, tmp_path):
  _, model, _ = ckpt("llama")
  d = str(tmp_path / "sharded")
  model.save_pretrained(d, safe_serialization=True, max_shard_size="50KB")
  shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
  victim = os.path.join(d, shards[1])
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  with pytest.raises(CorruptFileError, match=shards[1]):
    load_hf(d)
  os.remove(victim)
  with pytest.raises(MissingTensorError, match=shards[1]) as e:
    load_hf(d)
  index = os.path.join(d, "model.safetensors.index.json")
  assert index in str(e.value)
  with open(index, "w") as f:
    f.write('{"weight_map": ')
  with pytest.raises(CorruptFileError, match="model.safetensors.index.json"):
    load_hf(d)


def test_pickle_checkpoints_are_refused(ckpt, tmp_path):
  d = str(tmp_path / "bin")
  os.mkdir(d)
  shutil.copy(os.path.join(ckpt("llama")[0], "config.json"), d)
  with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
    f.write(b"never unpickled")
  with pytest.raises(ModelError, match="pytorch_model.bin") as e:
    load_hf(d)
  msg = str(e.value)
  assert d in msg and "no safetensors" in msg and "refused on purpose" in msg


def test_missing_config_and_not_a_directory(ckpt, tmp_path):
  d = _copy(ckpt("llama")[0], tmp_path)
  os.remove(os.path.join(d, "config.json"))
  with pytest.raises(ModelError, match="config.json") as e:
    load_hf(d)
  assert d in str(e.value)
  with pytest.raises(ModelError, match="not a directory"):
    load_hf(os.path.join(d, "model.safetensors"))


# -------------------------------------------------------------------------------------------- memory
# Peak RSS is read from /proc/self/status (VmHWM), not resource.getrusage().ru_maxrss: Linux carries
# ru_maxrss over execve, so a child of this (large) pytest process starts with the parent's peak and the
# increase reads as 0. The baseline is the current RSS (VmRSS) once jax is imported and its CPU client
# started, so `increase` is an upper bound on what load_hf adds.
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from models.hf_io import load_hf

    def status_kb(field):
      with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    jnp.ones(8).block_until_ready()                      # start the CPU client before the baseline
    base = status_kb("VmRSS")
    params, cfg = load_hf(sys.argv[1])
    jax.block_until_ready(params)
    peak = status_kb("VmHWM")
    print(json.dumps({"increase": (peak - base) * 1024, "w_up": float(params["layers"]["w_up"][1, 2, 3])}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_load_peak_memory(tmp_path):
  d = str(tmp_path / "big")
  os.mkdir(d)
  D, F, L, V, H, KV = 1024, 4096, 3, 8192, 8, 4
  hd = D // H
  config = {"model_type": "llama", "vocab_size": V, "hidden_size": D, "intermediate_size": F,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
            "tie_word_embeddings": False}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)
  rng = np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
  for i in range(L):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
                   p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)})
  tensors = {k: rng.random(s, dtype=np.float32) for k, s in shapes.items()}
  want = float(tensors["model.layers.1.mlp.up_proj.weight"][3, 2])     # ours [L, D, F]: [1, 2, 3]
  size = sum(t.nbytes for t in tensors.values())
  save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  del tensors
  assert size > 200e6
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, d], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=120)
  assert res.returncode == 0, res.stderr
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["w_up"] == want
  ratio = out["increase"] / size
  print(f"peak RSS increase {out['increase'] / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint: {ratio:.2f}x")
  assert ratio < 1.6
