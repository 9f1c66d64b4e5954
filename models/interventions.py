"""Interventions and capture sites of the decoder block, as arguments (arrays with a leading layer axis).

Names follow TransformerLens (Nanda & Bloom 2022, `HookedTransformer`'s hook points) so a reader can map a result
onto the field's tooling. Per block l (L = n_layers, B batch, S sequence, D d_model, H heads, hd head_dim):

  site          TransformerLens             shape               what
  resid_pre     blocks.l.hook_resid_pre     `[L, B, S, D]`       residual stream entering block l
  heads         blocks.l.attn.hook_z        `[L, B, S, H, hd]`   per-head attention output before o_proj
  attn_probs    blocks.l.attn.hook_pattern  `[L, B, H, S, S]`    attention probabilities (float32)
  attn_out      blocks.l.hook_attn_out      `[L, B, S, D]`       attention block output (after o_proj)
  resid_mid     blocks.l.hook_resid_mid     `[L, B, S, D]`       resid_pre + attn_out
  mlp_out       blocks.l.hook_mlp_out       `[L, B, S, D]`       MLP block output
  resid_post    blocks.l.hook_resid_post    `[L, B, S, D]`       output of block l, after its interventions
  resid         (accumulated_resid)         `[L+1, B, S, D]`     every layer boundary: 0 = embeddings,
                                                                 l + 1 = resid_post[l]

`resid_post[l]` is what rho-eval's forward hook on `model.layers[l]` steers, so a per-layer sweep reads
`resid_post` directly; `resid` is for analyses over all L + 1 boundaries (v_rev, linear probes by depth).

The builders (`at_layer`, `one_head`, `head_mask`, `resid_add_at`) make the one-hot layer / head arrays that sweeps
vmap over: `layer` and `head` may be traced, so `jax.vmap(lambda l: forward(..., interventions=resid_add_at(L, l,
v)))` over layers is one compiled program.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import mix

CAPTURE_NAMES = ("resid", "resid_pre", "resid_mid", "resid_post", "heads", "attn_out", "mlp_out", "attn_probs")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["resid_add", "resid_mask", "resid_value", "head_scale", "head_mask",
                                "head_value", "head_add", "qkv_source", "q_from_source", "kv_from_source",
                                "resid_ablate"],
                   meta_fields=[])
@dataclasses.dataclass
class Interventions:
  """Per-layer interventions, all optional. L = n_layers, B = batch, S = sequence, H = heads, hd = head_dim.

  Every array has a leading layer axis; batch and sequence axes may be 1 (broadcast). Any field may be None.
  Layer l's interventions act inside layer l, in this order:

  - `qkv_source` `[L, B|1, S|1, D]` with `q_from_source` `[L, B|1, S|1, H]` and/or `kv_from_source`
    `[L, B|1, S|1, KV]`: an alternative resid_pre of layer l; query head h (kv head g) computes its query (key
    and value) from it instead of from the real residual, mixed by the mask (q <- q + mask * (q_source - q),
    before RoPE). This is the receiver side of path patching (Wang et al. 2022, "Interpretability in the
    Wild", Section 3.1): only the chosen heads' inputs change.
  - `head_scale` `[L, B|1, S|1, H]`: multiplies each head's z (before o_proj). 0 is zero-ablation, 1 a no-op.
  - `head_mask` `[L, B|1, S|1, H]` with `head_value` `[L, B|1, S|1, H, hd]`:
    z <- z + mask * (value - z) (after head_scale). mask=1 replaces a head's output: activation patching
    (value = a cached run's z), mean ablation (value = the mean z over a reference distribution), cross-model
    patching (value = another model's z).
  - `head_add` `[L, B|1, S|1, H, hd]`: added to z after the patch.
  - `resid_mask` `[L, B|1, S|1]` with `resid_value` `[L, B|1, S|1, D]`: h <- h + mask * (value - h) on
    resid_post of layer l.
  - `resid_add` `[L, B|1, S|1, D]`: added to resid_post of layer l, after the replacement (steering: CAA /
    reading vectors scaled by alpha, as rho-eval's forward hook on `model.layers[l]` does).
  - `resid_ablate` `[L, B|1, S|1, D]` unit directions r (zeros: none): directional ablation, x <- x - (x . r) r,
    on layer l's input (resid_pre), resid_mid and resid_post (before the replacement and the add). With the same r
    at every layer and position the residual stream never has a component along r: the same model as weight
    orthogonalisation (models.ablation.orthogonalize; Arditi et al. 2024, "Refusal in Language Models Is
    Mediated by a Single Direction": its "directional ablation" intervention).

  dtypes: float (any; cast to the activation dtype). Masks are float so they can be fractional.
  """
  resid_add: jax.Array | None = None
  resid_mask: jax.Array | None = None
  resid_value: jax.Array | None = None
  head_scale: jax.Array | None = None
  head_mask: jax.Array | None = None
  head_value: jax.Array | None = None
  head_add: jax.Array | None = None
  qkv_source: jax.Array | None = None
  q_from_source: jax.Array | None = None
  kv_from_source: jax.Array | None = None
  resid_ablate: jax.Array | None = None


_RANKS = {"resid_add": 4, "resid_mask": 3, "resid_value": 4, "head_scale": 4, "head_mask": 4, "head_value": 5,
          "head_add": 5, "qkv_source": 4, "q_from_source": 4, "kv_from_source": 4, "resid_ablate": 4}


def check_capture(capture) -> tuple[str, ...]:
  """The capture names as a tuple. Raises ValueError naming any name not in CAPTURE_NAMES."""
  capture = tuple(capture)
  bad = [c for c in capture if c not in CAPTURE_NAMES]
  if bad:
    raise ValueError(f"unknown capture name(s) {bad}; choose from {CAPTURE_NAMES}")
  return capture


def check(iv: Interventions | None, cfg: ModelConfig) -> Interventions:
  """`iv` (an empty Interventions for None) after checking ranks, layer axes and paired fields.

  Raises ValueError naming the field: wrong rank or leading axis != cfg.n_layers, a mask without its value
  (or the reverse), qkv_source without q_from_source / kv_from_source (or the reverse).
  """
  if iv is None:
    return Interventions()
  for f, r in _RANKS.items():
    a = getattr(iv, f)
    if a is not None and (a.ndim != r or a.shape[0] != cfg.n_layers):
      raise ValueError(f"Interventions.{f} must have rank {r} with leading layer axis {cfg.n_layers}; "
                       f"got shape {a.shape}")
  for m, v in (("resid_mask", "resid_value"), ("head_mask", "head_value")):
    if (getattr(iv, m) is None) != (getattr(iv, v) is None):
      raise ValueError(f"Interventions.{m} and Interventions.{v} must be given together")
  has_mask = iv.q_from_source is not None or iv.kv_from_source is not None
  if has_mask != (iv.qkv_source is not None):
    raise ValueError("Interventions.qkv_source needs q_from_source and/or kv_from_source, and vice versa")
  return iv


def apply_heads(z: jax.Array, iv: Interventions) -> jax.Array:
  """Per-head output interventions of one layer on z `[B, S, H, hd]`: scale, then patch (mask / value), then
  add (`iv` holds this layer's slices)."""
  if iv.head_scale is not None:
    z = z * iv.head_scale.astype(z.dtype)[..., None]
  if iv.head_mask is not None:
    z = mix(z, iv.head_mask[..., None], iv.head_value)
  if iv.head_add is not None:
    z = z + iv.head_add.astype(z.dtype)
  return z


def ablate(h: jax.Array, iv: Interventions) -> jax.Array:
  """h `[B, S, D]` with this layer's resid_ablate direction r projected out (h - (h . r) r); h if there is none."""
  if iv.resid_ablate is None:
    return h
  r = iv.resid_ablate.astype(h.dtype)
  return h - jnp.sum(h * r, axis=-1, keepdims=True) * r


def apply_resid(h: jax.Array, iv: Interventions) -> jax.Array:
  """Residual interventions of one layer on its resid_post h `[B, S, D]`: ablate, patch (mask / value), add."""
  h = ablate(h, iv)
  if iv.resid_mask is not None:
    h = mix(h, iv.resid_mask[..., None], iv.resid_value)
  if iv.resid_add is not None:
    h = h + iv.resid_add.astype(h.dtype)
  return h


# ----------------------------------------------------------------------------------------------------- builders
def at_layer(n_layers: int, layer, value: jax.Array) -> jax.Array:
  """`[n_layers, *value.shape]`: `value` at index `layer` (int or traced int32 scalar), zeros elsewhere.

  The one-hot product keeps one compiled shape for every layer, so it can be vmapped over `layer`.
  """
  onehot = jax.nn.one_hot(layer, n_layers, dtype=jnp.float32)
  value = jnp.asarray(value)
  return onehot.reshape((n_layers,) + (1,) * value.ndim) * value[None]


def head_mask(n_layers: int, n_heads: int, layer, head) -> jax.Array:
  """float32 `[n_layers, n_heads]`, 1 at (layer, head) and 0 elsewhere (both may be traced)."""
  return jax.nn.one_hot(layer, n_layers)[:, None] * jax.nn.one_hot(head, n_heads)[None, :]


def one_head(n_layers: int, n_heads: int, layer, head, pos_mask: jax.Array | None = None) -> jax.Array:
  """A head-site mask `[L, N|1, S|1, H]` selecting head `head` of layer `layer` at the positions where
  `pos_mask` `[N, S]` is nonzero (every position when None), for Interventions.head_mask / head_scale."""
  m = head_mask(n_layers, n_heads, layer, head)[:, None, None, :]
  return m if pos_mask is None else m * pos_mask[None, :, :, None].astype(m.dtype)


def ablate_direction(n_layers: int, direction: jax.Array, layers=None) -> Interventions:
  """Directional ablation of `direction` `[D]` (normalised here) at every position of `layers` (default all):
  Interventions(resid_ablate) `[L, 1, 1, D]`, zeros at the other layers. Raises ValueError for a zero direction."""
  r = jnp.asarray(direction, jnp.float32)
  norm = float(jnp.linalg.norm(r))
  if not norm > 0:
    raise ValueError("ablate_direction: the direction has zero norm")
  on = jnp.zeros(n_layers).at[jnp.asarray(range(n_layers) if layers is None else list(layers))].set(1.0)
  return Interventions(resid_ablate=on[:, None, None, None] * (r / norm)[None, None, None, :])


def resid_add_at(n_layers: int, layer, vector: jax.Array) -> Interventions:
  """Interventions adding `vector` `[D]` (already scaled by alpha) to resid_post of `layer` at every position
  and batch row: CAA (Rimsky et al. 2024) / reading-vector steering as rho-eval's forward hook does it."""
  return Interventions(resid_add=at_layer(n_layers, layer, jnp.asarray(vector)[None, None, :]))
