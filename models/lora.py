"""LoRA as a parameter transform: `adapt(params, lora, scale)` replaces each adapted weight by a `LowRank` node
that the forward pass projects through, so the forward never sees adapters as an option of its own.

Hu et al. 2021, "LoRA": W x -> W x + scale * B A x. In our row-vector layout a projection is `x @ W` with W
`[in, out]`, and an adapter is `{"a": [L, in, r], "b": [L, r, out]}` per target: PEFT's `lora.Linear` with
A = lora_A.weight.T, B = lora_B.weight.T, scale = lora_alpha / r (or lora_alpha / sqrt(r), rsLoRA). The adapted
pytree keeps the layer axis on every leaf, so `jax.vmap` over runs / seeds of adapters and `lax.scan` over layers
work unchanged; gradients with respect to `lora` flow through `adapt`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "a", "b"], meta_fields=["scale"])
@dataclasses.dataclass
class LowRank:
  """A frozen weight with a low-rank update: w `[..., in, out]`, a `[..., in, r]`, b `[..., r, out]` (the
  leading axes, e.g. the layer axis, shared), scale a static float. `project` computes
  `x @ w + ((x @ a) @ b) * scale` in x's dtype."""
  w: jax.Array
  a: jax.Array
  b: jax.Array
  scale: float = 1.0


def adapt(params: dict[str, Any], lora: dict[str, dict[str, jax.Array]] | None,
          scale: float = 1.0) -> dict[str, Any]:
  """`params` (models.params layout) with `params["layers"][t]` replaced by LowRank(w, a, b, scale) for every
  target t of `lora` (`{t: {"a": [L, in, r], "b": [L, r, out]}}`, t in LORA_TARGETS). lora=None returns params.

  Raises ValueError naming an unknown target or an adapter whose shape does not fit the weight.
  """
  if lora is None:
    return params
  bad = [k for k in lora if k not in LORA_TARGETS]
  if bad:
    raise ValueError(f"LoRA targets {bad} unknown; choose from {LORA_TARGETS}")
  layers = dict(params["layers"])
  for t, f in lora.items():
    w = layers[t]
    if (f["a"].shape[:-1] != w.shape[:-1] or f["b"].shape[-1] != w.shape[-1]
        or f["a"].shape[-1] != f["b"].shape[-2]):
      raise ValueError(f"LoRA factors of {t}: a {tuple(f['a'].shape)}, b {tuple(f['b'].shape)} do not fit the "
                       f"weight {tuple(w.shape)}")
    layers[t] = LowRank(w, f["a"], f["b"], float(scale))
  return {**params, "layers": layers}


def project(w: jax.Array | LowRank, x: jax.Array) -> jax.Array:
  """x `[..., in]` @ w `[in, out]`, plus the low-rank term when w is a LowRank. Returns `[..., out]`."""
  if not isinstance(w, LowRank):
    return x @ w
  y = x @ w.w
  return y + ((x @ w.a.astype(x.dtype)) @ w.b.astype(x.dtype)) * jnp.asarray(w.scale, x.dtype)


def base(layers: dict[str, Any]) -> dict[str, Any]:
  """The stacked layer parameters with every LowRank replaced by its frozen weight."""
  return {k: v.w if isinstance(v, LowRank) else v for k, v in layers.items()}


def is_adapted(layers: dict[str, Any]) -> bool:
  """Whether any of the stacked layer parameters `layers` (params["layers"]) is a LowRank adapter."""
  return any(isinstance(v, LowRank) for v in layers.values())
