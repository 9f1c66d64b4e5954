"""Tiny random transformers (PyTorch) models, the independent reference the JAX code is tested against."""
from __future__ import annotations

import re

import numpy as np
import torch
import transformers

from models import params as model_params
from models.config import ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

TINY = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama_tied_llama3": dict(model_type="llama", tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "llama_bias": dict(model_type="llama", attention_bias=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False),
}


def tiny_hf_model(variant: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A random fp32 transformers *ForCausalLM: 3 layers, d_model 64, 4 heads, 2 KV heads, vocab 97.

  Biases and norm scales are randomised too (HF initialises them to 0 / 1, which would hide bugs).
  """
  kw = dict(TINY[variant])
  model_type = kw.pop("model_type")
  base = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
  if model_type == "qwen3":
    base["head_dim"] = 24   # Qwen3 allows head_dim != hidden/heads
  base.update(kw)
  base.update(overrides)
  cfg = transformers.AutoConfig.for_model(model_type, **base)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def ours_from_torch(model, dtype=np.float32):
  """(params, cfg) for our JAX code, built from the torch model's state dict via `build_params`."""
  cfg = ModelConfig.from_hf_dict(model.config.to_dict())
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  return model_params.build_params(cfg, sd.get, dtype=dtype, source="torch state_dict"), cfg


class WordTokenizer:
  """Every ' word' / punctuation mark is one token; ids assigned in order of first use (deterministic)."""
  pad_token_id = 0
  eos_token_id = None

  def __init__(self):
    self.vocab = {"<pad>": 0}

  def encode(self, text, add_special_tokens=False):
    return [self.vocab.setdefault(p, len(self.vocab)) for p in re.findall(r"\s?\w+|[^\w\s]", text)]

  def decode(self, ids):
    inv = {v: k for k, v in self.vocab.items()}
    return "".join(inv[i] for i in ids)
