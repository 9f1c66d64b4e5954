"""Model configuration for the Llama / Qwen2 / Qwen3 decoder family.

`ModelConfig` is a frozen (hashable) dataclass so it can be a static argument of jitted functions.
It is read from a Hugging Face `config.json` (`from_hf_dict`) or from GGUF metadata (models.gguf_io), and
written back to a `config.json` that transformers 5.x loads (`to_hf_dict`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from models.errors import ModelError, UnsupportedArchitectureError

ARCHS = ("llama", "qwen2", "qwen3")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of a decoder-only transformer.

  Attributes:
    arch: "llama", "qwen2" or "qwen3".
    vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: sizes (HF names: vocab_size,
      hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size).
    rms_eps: RMSNorm epsilon.
    rope_theta: RoPE base frequency.
    rope_type: "default" or "llama3" (Llama 3.1/3.2 frequency-dependent scaling).
    rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_pos: llama3 scaling fields.
    tie_embeddings: lm_head shares the token-embedding matrix.
    qkv_bias: q/k/v projections carry a bias (Qwen2; Llama with attention_bias).
    o_bias: o_proj carries a bias (Llama with attention_bias).
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
    max_position_embeddings: context length from the config (informational).
    bos_token_id, eos_token_ids, pad_token_id: special tokens (None where unknown).
  """
  arch: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_pos: int = 8192
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise UnsupportedArchitectureError(f"architecture {self.arch!r} is not supported (supported: {ARCHS})")
    if self.n_heads % self.n_kv_heads:
      raise ModelError(f"num_attention_heads={self.n_heads} is not a multiple of "
                       f"num_key_value_heads={self.n_kv_heads}")
    if self.rope_type not in ("default", "llama3"):
      raise ModelError(f"rope scaling type {self.rope_type!r} is not supported (supported: default, llama3)")

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- Hugging Face config.json
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    """Build from a Hugging Face config dict.

    Raises:
      UnsupportedArchitectureError: model_type is not llama/qwen2/qwen3, or a feature gravlab does not
        implement is switched on (mlp_bias, sliding-window attention, a non-silu activation).
      ModelError: a required field is missing (the message names `source` and the field).
    """
    mt = d.get("model_type")
    if mt not in ARCHS:
      raise UnsupportedArchitectureError(
          f"{source}: model_type {mt!r} is not supported (supported: {', '.join(ARCHS)})")

    def need(key):
      if key not in d or d[key] is None:
        raise ModelError(f"{source}: required field {key!r} is missing")
      return d[key]

    if d.get("mlp_bias"):
      raise UnsupportedArchitectureError(f"{source}: mlp_bias=true is not supported")
    if d.get("use_sliding_window"):
      raise UnsupportedArchitectureError(f"{source}: use_sliding_window=true is not supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise UnsupportedArchitectureError(f"{source}: hidden_act {act!r} is not supported (only silu)")

    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
      raise UnsupportedArchitectureError(f"{source}: rope scaling type {rope_type!r} is not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    n_heads = int(need("num_attention_heads"))
    d_model = int(need("hidden_size"))
    eos = d.get("eos_token_id")
    eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    attn_bias = bool(d.get("attention_bias", False))
    return cls(
        arch=mt,
        vocab_size=int(need("vocab_size")),
        d_model=d_model,
        n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or d_model // n_heads),
        d_ff=int(need("intermediate_size")),
        rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_pos=int(rope.get("original_max_position_embeddings", 8192)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2") or attn_bias,
        o_bias=attn_bias and mt == "llama",
        qk_norm=(mt == "qwen3"),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=d.get("pad_token_id"),
    )

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike) -> "ModelConfig":
    """Read a config.json whose `architectures` (when present) gravlab implements.

    The causal-LM class must be the one of the config's model_type (LlamaForCausalLM for "llama",
    Qwen2ForCausalLM for "qwen2", Qwen3ForCausalLM for "qwen3"): a `*ForSequenceClassification` head, say, would
    otherwise load as a language model with its score head silently dropped.

    Raises:
      ModelError: the file is missing, not UTF-8, not JSON, or `architectures` is not a list of class names.
      UnsupportedArchitectureError: model_type or a feature is not implemented (from_hf_dict), or
        `architectures` names another class (the message names the file and the class).
    """
    path = os.fspath(path)
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except FileNotFoundError as e:
      raise ModelError(f"{path}: config.json not found") from e
    except UnicodeDecodeError as e:
      raise ModelError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from e
    except json.JSONDecodeError as e:
      raise ModelError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
      raise ModelError(f"{path}: expected a JSON object, got {type(d).__name__}")
    cfg = cls.from_hf_dict(d, source=path)
    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
      raise ModelError(f"{path}: field 'architectures' must be a list of class names, got {archs!r}")
    for name in archs or ():
      if name.lower() != _HF_CLASS[cfg.arch].lower():   # lower: early Llama exports spell it LLaMAForCausalLM
        raise UnsupportedArchitectureError(
            f"{path}: architectures names {name!r}, which gravlab does not implement for model_type "
            f"{cfg.arch!r} (supported: {_HF_CLASS[cfg.arch]})")
    return cfg

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that transformers 5.x loads into the matching *ForCausalLM class."""
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type == "llama3":
      rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_pos)
    d: dict[str, Any] = {
        "architectures": [_HF_CLASS[self.arch]],
        "model_type": self.arch,
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "intermediate_size": self.d_ff,
        "num_hidden_layers": self.n_layers,
        "num_attention_heads": self.n_heads,
        "num_key_value_heads": self.n_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                         else (self.eos_token_ids[0] if self.eos_token_ids else None)),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32",
    }
    if self.arch == "llama":
      d["attention_bias"] = self.o_bias
      d["mlp_bias"] = False
    return d


# Published shapes of public checkpoints (their Hugging Face config.json), for memory plans (train.plan) and
# compile checks of 8B-class programs without weights. Special tokens are the Instruct models'.
KNOWN_SHAPES: dict[str, ModelConfig] = {
    # meta-llama/Llama-3.1-8B(-Instruct)
    "llama-3.1-8b": ModelConfig(
        arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        d_ff=14336, rms_eps=1e-5, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_pos=8192, tie_embeddings=False,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    # Qwen/Qwen2.5-7B(-Instruct)
    "qwen2.5-7b": ModelConfig(
        arch="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
        d_ff=18944, rms_eps=1e-6, rope_theta=1000000.0, tie_embeddings=False, qkv_bias=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645,)),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded default model, models.registry)
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
        rms_eps=1e-5, rope_theta=100000.0, tie_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
        eos_token_ids=(2,), pad_token_id=2),
}
