"""Load Llama / Qwen2 / Qwen3 GGUF files (llama.cpp format) into our stacked parameter pytree.

Matches transformers 5.23 `modeling_gguf_pytorch_utils.load_gguf_checkpoint` (config mapping from
`integrations/ggml.py`, tensors dequantized with `gguf.quants.dequantize`, Q/K rows of the "llama" architecture
un-permuted as in `LlamaTensorProcessor._reverse_permute_weights`), so a model loaded here equals
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` tensor for tensor.

GGUF -> Hugging Face tensor names (per layer `blk.{i}.` <-> `model.layers.{i}.`):

  token_embd.weight      model.embed_tokens.weight      attn_norm.weight    input_layernorm.weight
  output_norm.weight     model.norm.weight              attn_{q,k,v}.weight self_attn.{q,k,v}_proj.weight (+ .bias)
  output.weight          lm_head.weight (absent: tied)  attn_output.weight  self_attn.o_proj.weight (+ .bias)
  ffn_norm.weight        post_attention_layernorm.weight
  ffn_{gate,up,down}.weight  mlp.{gate,up,down}_proj.weight
  attn_{q,k}_norm.weight     self_attn.{q,k}_norm.weight (Qwen3)

Dequantized tensors come back as float32 numpy arrays of shape [out, in] (GGUF lists dims innermost first, so
`ne = [in, out]`), i.e. already in HF orientation.
"""
from __future__ import annotations

import os
import re
import struct
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf.quants import dequantize

from models.config import ModelConfig
from models.errors import CorruptFileError, MissingTensorError, ModelError, UnsupportedArchitectureError
from models.params import build_params

GGUF_ARCHS = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")

# Errors numpy / struct raise when GGUFReader walks a truncated or garbled memmap.
_READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, UnicodeDecodeError,
                struct.error, OSError)


def gguf_name(hf_name: str) -> str | None:
  """The llama.cpp tensor name for an HF tensor name (e.g. 'model.layers.3.mlp.up_proj.weight' ->
  'blk.3.ffn_up.weight'); None for names with no GGUF counterpart. Source: gguf-py `tensor_mapping.py`."""
  if hf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[hf_name]
  m = _LAYER_RE.fullmatch(hf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
  return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`), HF -> GGUF order.

  Within each head, HF's rotate-half layout (first half, second half) becomes interleaved pairs.
  w: [n_head * head_dim, ...] (a weight [out, in] or a bias [out]); n_head is n_kv_heads for K.
  """
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `permute_qk` (GGUF -> HF order); equals transformers `LlamaTensorProcessor._reverse_permute_weights`.

  w: [n_head * head_dim, ...]; returns the same shape and dtype.
  """
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: str | os.PathLike):
  """GGUFReader over `path`, checked to hold every tensor's bytes.

  Raises:
    ModelError: the path does not exist or is not a file.
    CorruptFileError: the file is empty, truncated or its header is unreadable.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ModelError(f"{path}: GGUF file not found")
  if not os.path.isfile(path):
    raise ModelError(f"{path}: not a regular file")
  size = os.path.getsize(path)
  try:
    reader = gguf.GGUFReader(path)
  except _READ_ERRORS as e:
    raise CorruptFileError(f"{path}: not a readable GGUF file, truncated or corrupt "
                           f"({type(e).__name__}: {e})") from e
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise CorruptFileError(f"{path}: truncated: tensor {t.name!r} needs bytes up to "
                             f"{t.data_offset + t.n_bytes}, file has {size}")
  return reader


def _field(reader, key: str, default: Any = None) -> Any:
  """A metadata value (str, int, float, bool or list) or `default` if absent."""
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def _f32(x: float) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
  return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def _config_from_reader(reader, path: str) -> ModelConfig:
  arch = _field(reader, "general.architecture")
  if arch not in GGUF_ARCHS:
    raise UnsupportedArchitectureError(
        f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise UnsupportedArchitectureError(
        f"{path}: has a 'rope_freqs.weight' tensor (Llama 3.1+ rope scaling baked into the GGUF), which this "
        f"loader does not read; use the Hugging Face safetensors directory of the model instead")
  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    raise UnsupportedArchitectureError(f"{path}: rope scaling type {scaling!r} is not supported")

  def need(key):
    v = _field(reader, f"{arch}.{key}")
    if v is None:
      raise ModelError(f"{path}: required GGUF field {arch}.{key!r} is missing")
    return v

  d_model, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
  n_kv = _field(reader, f"{arch}.attention.head_count_kv", n_heads)
  if isinstance(n_kv, list):
    raise UnsupportedArchitectureError(f"{path}: per-layer head_count_kv is not supported")
  head_dim = int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads))
  v_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
  rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
  if v_dim != head_dim or rot != head_dim:
    raise UnsupportedArchitectureError(f"{path}: key_length={head_dim}, value_length={v_dim}, "
                                       f"rope.dimension_count={rot}: only equal sizes are supported")
  vocab = _field(reader, f"{arch}.vocab_size")
  if vocab is None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise ModelError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    vocab = len(tokens.data)
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  o_bias = "blk.0.attn_output.bias" in names
  if arch != "llama" and o_bias:
    raise UnsupportedArchitectureError(f"{path}: attn_output.bias is only supported for the llama architecture")
  return ModelConfig(
      arch=arch,
      vocab_size=int(vocab),
      d_model=d_model,
      n_layers=int(need("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(n_kv),
      head_dim=head_dim,
      d_ff=int(need("feed_forward_length")),
      rms_eps=_f32(need("attention.layer_norm_rms_epsilon")),
      rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in names,
      qkv_bias=(arch == "qwen2") or (arch == "llama" and "blk.0.attn_q.bias" in names),
      o_bias=o_bias,
      qk_norm=(arch == "qwen3"),
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_ids=() if eos is None else (int(eos),),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
  )


def config_from_gguf(path: str | os.PathLike) -> ModelConfig:
  """Read a ModelConfig from GGUF metadata (transformers `load_gguf_checkpoint` + `GGUF_CONFIG_MAPPING`).

  Fields: `{arch}.block_count / embedding_length / feed_forward_length / attention.head_count(_kv) /
  attention.key_length (head_dim, default d_model // n_heads) / rope.freq_base /
  attention.layer_norm_rms_epsilon / context_length / vocab_size` (else the length of
  `tokenizer.ggml.tokens`), `tokenizer.ggml.{bos,eos,padding}_token_id`. Tied embeddings = no `output.weight`
  tensor; qkv_bias for qwen2 (and llama files with `attn_q.bias`); qk_norm for qwen3. float32 fields are
  rounded to their shortest decimal (rms_eps 1e-05, not 9.99999974e-06; transformers keeps the latter, a
  difference below float32 resolution).

  Raises:
    ModelError: the file does not exist, or a required field is missing.
    CorruptFileError: the file is truncated or unreadable.
    UnsupportedArchitectureError: architecture other than llama/qwen2/qwen3, a `rope_freqs.weight` tensor
      (llama3 rope scaling: use the HF safetensors directory instead), rope scaling, partial rotary.
  """
  path = os.fspath(path)
  return _config_from_reader(_open(path), path)


def load_gguf(path: str | os.PathLike, *, dtype=jnp.float32, sharding_fn=None) -> tuple[dict[str, Any], ModelConfig]:
  """Load a GGUF file into our stacked parameter pytree.

  Every tensor is dequantized to float32 with `gguf.quants.dequantize` (any ggml type gguf-py knows: F32,
  F16, BF16, Q4_0..Q8_0, K-quants, ...), the llama architecture's Q/K weights and biases are un-permuted
  (`unpermute_qk`; n_head = n_kv_heads for K; qwen2/qwen3 files are not permuted by llama.cpp), then
  `models.params.build_params` casts to `dtype` and places them, one stacked tensor at a time.

  Args:
    path: the .gguf file.
    dtype: parameter dtype.
    sharding_fn: `sharding_fn(path, shape) -> Sharding | None`, see `models.params.place`.

  Returns:
    (params, cfg): the pytree described in models/params.py, and the config from `config_from_gguf`.

  Raises:
    ModelError / CorruptFileError / UnsupportedArchitectureError: as `config_from_gguf`; CorruptFileError
      also when a tensor's data cannot be dequantized.
    MissingTensorError: a tensor the config needs is absent (names the GGUF and the HF name).
    ShapeMismatchError: a tensor's shape disagrees with the metadata.
  """
  path = os.fspath(path)
  reader = _open(path)
  cfg = _config_from_reader(reader, path)
  tensors = {t.name: t for t in reader.tensors}

  def get_tensor(hf_name: str) -> np.ndarray:
    name = gguf_name(hf_name)
    t = tensors.get(name) if name else None
    if t is None:
      raise MissingTensorError(f"{path}: tensor {name or '?'!r} (HF {hf_name!r}) is missing")
    try:
      w = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise UnsupportedArchitectureError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, "
                                         f"which gguf-py cannot dequantize") from e
    except _READ_ERRORS as e:
      raise CorruptFileError(f"{path}: tensor {name!r} cannot be decoded ({type(e).__name__}: {e})") from e
    if cfg.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      n = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads
      rows = cfg.n_heads * cfg.head_dim if ".attn_q." in name else cfg.n_kv_heads * cfg.head_dim
      if w.shape[0] == rows:  # else leave it: build_params reports the shape mismatch
        w = unpermute_qk(w, n)
    return w

  return build_params(cfg, get_tensor, dtype=dtype, sharding_fn=sharding_fn, source=path), cfg


# GGUF `tokenizer.ggml.*_id` key -> tokenizer attribute (transformers 5.23 `gguf_tokenizer_mapping._SPECIAL_TOKENS`).
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                      "pad_token": "padding_token_id"}


def gguf_tokenizer_metadata(path: str | os.PathLike) -> tuple[str, dict, dict]:
  """`(architecture, tokenizer_dict, tokenizer_config)` of a GGUF file, read with the `gguf` package.

  The same triple as transformers 5.23 `integrations.gguf.get_gguf_tokenizer`, whose reader module imports torch;
  the keys are renamed by transformers' own `GGUF_TOKENIZER_MAPPING` table. tokenizer_dict holds the vocabulary
  (`tokens`, a list of str), `merges`, `token_type`, `scores` where present; tokenizer_config holds
  `chat_template`, `add_bos_token` / `add_eos_token` and the special tokens as strings.

  Raises:
    ModelError / CorruptFileError: as `_open` (missing, truncated or unreadable file).
  """
  from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING   # local: transformers takes seconds to import
  path = os.fspath(path)
  reader = _open(path)
  try:
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.") or k == "general.architecture"}
  except _READ_ERRORS as e:
    raise CorruptFileError(f"{path}: tokenizer metadata cannot be decoded ({type(e).__name__}: {e})") from e
  if "tokenizer.ggml.tokens" not in meta:
    raise CorruptFileError(f"{path}: no 'tokenizer.ggml.tokens' in the GGUF metadata (no tokenizer)")
  grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer.get("tokenizer_type") == "llama":
    # as transformers: llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
    tokenizer_config.setdefault("add_bos_token", True)
  for name, key in _SPECIAL_TOKEN_IDS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  return meta["general.architecture"], tokenizer, tokenizer_config


def load_gguf_tokenizer(path: str | os.PathLike):
  """The fast tokenizer of a GGUF file, with its chat template, offline and without torch.

  Reads the metadata with the `gguf` package (`gguf_tokenizer_metadata`), builds the `tokenizers` backend with
  transformers' GGUF vocabulary converter (`integrations.gguf.convert_gguf_tokenizer`: byte-level BPE for
  "gpt2" vocabularies, sentencepiece for "llama") and wraps it in `PreTrainedTokenizerFast`. Token ids, special
  tokens and `apply_chat_template` strings equal those of
  `AutoTokenizer.from_pretrained(dirname, gguf_file=basename)` (tests/test_tokenizer_parity.py), which would
  import torch through transformers' GGUF reader.

  Returns:
    transformers.PreTrainedTokenizerFast.

  Raises:
    ModelError: the file does not exist or is not a regular file.
    CorruptFileError: the file is truncated or unreadable, or holds no tokenizer.
  """
  from transformers import PreTrainedTokenizerFast   # local: transformers takes seconds to import, the weights path
  from transformers.integrations.gguf import convert_gguf_tokenizer   # local: (same) never needs it
  arch, tokenizer_dict, tokenizer_config = gguf_tokenizer_metadata(os.path.abspath(os.fspath(path)))
  backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
