"""Parameter layout: our stacked pytree, its shapes, and the mapping to Hugging Face tensor names.

Layout (a nested dict of arrays; every per-layer weight is stacked on a leading layer axis L so depth is an
array axis, and weights are stored `[in, out]` so a projection is `x @ w`):

    embed        [V, D]            model.embed_tokens.weight
    final_norm   [D]               model.norm.weight
    lm_head      [D, V]            lm_head.weight (transposed; absent when embeddings are tied)
    layers/
      attn_norm  [L, D]            model.layers.{i}.input_layernorm.weight
      wq         [L, D, H*hd]      ...self_attn.q_proj.weight (transposed)
      wk, wv     [L, D, KV*hd]     ...self_attn.k_proj/v_proj.weight (transposed)
      wo         [L, H*hd, D]      ...self_attn.o_proj.weight (transposed)
      bq         [L, H*hd]         ...self_attn.q_proj.bias        (qkv_bias)
      bk, bv     [L, KV*hd]        ...self_attn.k_proj/v_proj.bias (qkv_bias)
      bo         [L, D]            ...self_attn.o_proj.bias        (o_bias)
      q_norm     [L, hd]           ...self_attn.q_norm.weight      (qk_norm, Qwen3)
      k_norm     [L, hd]           ...self_attn.k_norm.weight      (qk_norm, Qwen3)
      mlp_norm   [L, D]            ...post_attention_layernorm.weight
      w_gate     [L, D, F]         ...mlp.gate_proj.weight (transposed)
      w_up       [L, D, F]         ...mlp.up_proj.weight (transposed)
      w_down     [L, F, D]         ...mlp.down_proj.weight (transposed)
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.errors import MissingTensorError, ShapeMismatchError


class Spec(NamedTuple):
  """Where one of our tensors lives in a Hugging Face checkpoint."""
  hf: str            # HF name; per-layer names contain "{i}"
  transpose: bool    # HF stores Linear weights [out, in]; we store [in, out]


GLOBAL_SPECS = {
    "embed": Spec("model.embed_tokens.weight", False),
    "final_norm": Spec("model.norm.weight", False),
    "lm_head": Spec("lm_head.weight", True),
}
LAYER_SPECS = {
    "attn_norm": Spec("model.layers.{i}.input_layernorm.weight", False),
    "wq": Spec("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": Spec("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": Spec("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": Spec("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": Spec("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": Spec("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": Spec("model.layers.{i}.self_attn.v_proj.bias", False),
    "bo": Spec("model.layers.{i}.self_attn.o_proj.bias", False),
    "q_norm": Spec("model.layers.{i}.self_attn.q_norm.weight", False),
    "k_norm": Spec("model.layers.{i}.self_attn.k_norm.weight", False),
    "mlp_norm": Spec("model.layers.{i}.post_attention_layernorm.weight", False),
    "w_gate": Spec("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": Spec("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": Spec("model.layers.{i}.mlp.down_proj.weight", True),
}
NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm")


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per-layer shapes (without the leading layer axis) of the tensors this config has."""
  D, F, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
  s = {"attn_norm": (D,), "wq": (D, cfg.q_dim), "wk": (D, cfg.kv_dim), "wv": (D, cfg.kv_dim),
       "wo": (cfg.q_dim, D), "mlp_norm": (D,), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
  if cfg.qkv_bias:
    s.update(bq=(cfg.q_dim,), bk=(cfg.kv_dim,), bv=(cfg.kv_dim,))
  if cfg.o_bias:
    s["bo"] = (D,)
  if cfg.qk_norm:
    s.update(q_norm=(hd,), k_norm=(hd,))
  return s


def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of the non-layer tensors this config has."""
  s = {"embed": (cfg.vocab_size, cfg.d_model), "final_norm": (cfg.d_model,)}
  if not cfg.tie_embeddings:
    s["lm_head"] = (cfg.d_model, cfg.vocab_size)
  return s


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """Nested dict of full shapes: globals, and `layers/<name>` with the leading `[L]` axis."""
  out: dict[str, Any] = dict(global_shapes(cfg))
  out["layers"] = {k: (cfg.n_layers, *v) for k, v in layer_shapes(cfg).items()}
  return out


def hf_to_ours(hf_name: str) -> tuple[str, int | None] | None:
  """Map an HF tensor name to (our name, layer index or None); None for names we do not use."""
  for ours, spec in GLOBAL_SPECS.items():
    if spec.hf == hf_name:
      return ours, None
  if hf_name.startswith("model.layers."):
    rest = hf_name[len("model.layers."):]
    idx, _, suffix = rest.partition(".")
    if idx.isdigit():
      for ours, spec in LAYER_SPECS.items():
        if spec.hf.split("{i}.", 1)[1] == suffix:
          return ours, int(idx)
  return None


def hf_tensors(params: dict[str, Any], cfg: ModelConfig):
  """Yield (HF name, numpy array in HF orientation) for every tensor of `params` (host copies)."""
  for name in global_shapes(cfg):
    arr = np.asarray(jax.device_get(params[name]))
    yield GLOBAL_SPECS[name].hf, (arr.T if GLOBAL_SPECS[name].transpose else arr)
  for name in layer_shapes(cfg):
    stacked = np.asarray(jax.device_get(params["layers"][name]))
    spec = LAYER_SPECS[name]
    for i in range(cfg.n_layers):
      yield spec.hf.format(i=i), (stacked[i].T if spec.transpose else stacked[i])


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict[str, Any]:
  """Random parameters with the layout above: weights and biases N(0, std^2), norm scales 1 + N(0, std^2).

  Used for tiny test models and 8B-shaped compile checks (`jax.eval_shape(init_params, ...)`).
  """
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, shape), k in zip(flat, keys):
    name = path[-1].key
    x = std * jax.random.normal(k, shape, jnp.float32)
    leaves.append((x + 1.0 if name in NORMS else x).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


ShardingFn = Any  # Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]; path like "layers/wq"


def place(path: str, array: np.ndarray, dtype, sharding_fn: ShardingFn | None = None) -> jax.Array:
  """Cast a host array to `dtype` and put it on device(s) with `sharding_fn(path, shape)` (default device if None).

  Uses `jax.device_put`, which copies the host buffer once (`jnp.asarray` makes one more transient copy).
  """
  array = np.asarray(array, dtype=jnp.dtype(dtype))
  sharding = sharding_fn(path, array.shape) if sharding_fn is not None else None
  return jax.device_put(array, sharding)


def build_params(cfg: ModelConfig, get_tensor, *, dtype=jnp.float32, sharding_fn: ShardingFn | None = None,
                 source: str = "checkpoint") -> dict[str, Any]:
  """Assemble our stacked pytree from a tensor getter, one stacked parameter at a time.

  Args:
    cfg: the model config the tensors must match.
    get_tensor: `get_tensor(hf_name) -> np.ndarray | None`, in HF orientation ([out, in] for Linear weights),
      any float dtype; None when the tensor is absent. Called once per tensor, so peak host memory is the
      placed model plus one stacked parameter `[L, ...]` (never 2x the model).
    dtype: parameter dtype (e.g. jnp.float32, jnp.bfloat16).
    sharding_fn: see `place`.
    source: file or directory name used in error messages.

  Returns:
    The nested parameter dict described in the module docstring.

  Raises:
    MissingTensorError: a tensor the config needs is absent (message names it and `source`).
    ShapeMismatchError: a tensor's shape differs from the config (message names tensor, both shapes, source).
  """
  np_dtype = jnp.dtype(dtype)

  def fetch(hf_name: str, spec: Spec, want: tuple[int, ...]) -> np.ndarray:
    t = get_tensor(hf_name)
    if t is None:
      raise MissingTensorError(f"{source}: tensor {hf_name!r} is missing")
    t = np.asarray(t)
    hf_shape = tuple(reversed(want)) if spec.transpose else want
    if t.shape != hf_shape:
      raise ShapeMismatchError(f"{source}: tensor {hf_name!r} has shape {t.shape}, config implies {hf_shape}")
    return t.T if spec.transpose else t

  out: dict[str, Any] = {}
  for name, shape in global_shapes(cfg).items():
    out[name] = place(name, fetch(GLOBAL_SPECS[name].hf, GLOBAL_SPECS[name], shape), dtype, sharding_fn)
  layers = {}
  for name, shape in layer_shapes(cfg).items():
    spec = LAYER_SPECS[name]
    stacked = np.empty((cfg.n_layers, *shape), np_dtype)
    for i in range(cfg.n_layers):
      stacked[i] = fetch(spec.hf.format(i=i), spec, shape)
    layers[name] = place(f"layers/{name}", stacked, dtype, sharding_fn)
    del stacked
  out["layers"] = layers
  return out


def truncate_layers(params: dict[str, Any], cfg: ModelConfig, n: int) -> tuple[dict[str, Any], ModelConfig]:
  """The first `n` decoder layers of a model, with its embeddings, final norm and LM head: a small real model
  for fast tests of whole pipelines. Returns (params, cfg with n_layers = n). Raises ValueError unless
  1 <= n <= cfg.n_layers."""
  if not 1 <= n <= cfg.n_layers:
    raise ValueError(f"cannot keep {n} of {cfg.n_layers} decoder layers")
  out = dict(params)
  out["layers"] = {k: v[:n] for k, v in params["layers"].items()}
  return out, dataclasses.replace(cfg, n_layers=n)
