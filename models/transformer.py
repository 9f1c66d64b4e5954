"""The Llama / Qwen2 / Qwen3 decoder forward pass as a pure function over the stacked parameter pytree.

Layers are stacked on a leading axis and run with `jax.lax.scan`, so compile time does not grow with depth and
every per-layer quantity (captured activations, interventions, KV cache) is an array with a layer axis.

Interventions are arguments, not hooks (`Interventions`): arrays with a leading layer axis, so
`jax.vmap` over layers / alphas / heads / seeds turns a sweep into one compiled program.

The math matches transformers' `LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` (modeling_llama.py,
modeling_qwen2.py, modeling_qwen3.py of transformers 5.23): RMSNorm computed in float32, rotate-half RoPE
(with the "llama3" frequency scaling of `_compute_llama3_parameters`), grouped-query attention with
query head h reading kv head h // (H / KV), SiLU-gated MLP.

Sharding: the residual stream, q/k/v, per-head outputs, MLP hidden and logits carry `models.sharding.constrain`
annotations (batch over (data, fsdp), heads / MLP columns / vocab over tensor). They take effect only while a
mesh is active; without one the forward pass is unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import apply_rope, attend, default_positions, mix, rms_norm, rope_inv_freq  # noqa: F401 (public here too)
from models.sharding import BATCH_AXES, TENSOR, constrain

CAPTURE_NAMES = ("resid", "heads", "attn_out", "mlp_out", "attn_probs")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["resid_add", "resid_mask", "resid_value", "head_scale", "head_mask",
                                "head_value", "head_add", "qkv_source", "q_from_source", "kv_from_source"],
                   meta_fields=[])
@dataclasses.dataclass
class Interventions:
  """Per-layer interventions, all optional. L = n_layers, B = batch, S = sequence, H = heads, hd = head_dim.

  Every array has a leading layer axis; batch and sequence axes may be 1 (broadcast). Any field may be None.
  Layer l's interventions act inside layer l, in this order:

  - `qkv_source` `[L, B|1, S|1, D]` with `q_from_source` `[L, B|1, S|1, H]` and/or `kv_from_source`
    `[L, B|1, S|1, KV]`: an alternative residual stream entering layer l; query head h (kv head g) computes
    its query (key and value) from it instead of from the real residual, mixed by the mask
    (q <- q + mask * (q_source - q), before RoPE). This is the receiver side of path patching
    (Wang et al. 2022, "Interpretability in the Wild", Section 3.1): only the chosen heads' inputs change.
  - `head_scale` `[L, B|1, S|1, H]`: multiplies each head's attention output z (before o_proj).
    0 is zero-ablation, 1 is a no-op.
  - `head_mask` `[L, B|1, S|1, H]` with `head_value` `[L, B|1, S|1, H, hd]`:
    z <- z + mask * (value - z) (after head_scale). mask=1 replaces a head's output: activation patching
    (value = a cached run's z), mean ablation (value = the mean z over a reference distribution), cross-model
    patching (value = another model's z).
  - `resid_mask` `[L, B|1, S|1]` with `resid_value` `[L, B|1, S|1, D]`: h <- h + mask * (value - h) on the
    residual stream at the output of layer l (the boundary captured as resid[l+1]).
  - `resid_add` `[L, B|1, S|1, D]`: added to the residual stream at the output of layer l, after the
    replacement (steering: CAA / reading vectors scaled by alpha, as rho-eval's forward hook on
    `model.layers[l]` does).

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


class KVCache(NamedTuple):
  """Key/value cache for incremental decoding.

  k, v: `[L, B, T, KV, hd]` keys (after RoPE) and values, in the parameter dtype.
  valid: `[B, T]` bool, True where a slot holds a real (non-padding) token.
  index: int32 scalar, the next slot to write.
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
               jnp.zeros((), jnp.int32))


def _proj(lp, lora, lora_scale, x, name):
  """x @ W_name, plus the LoRA term (x @ A) @ B * lora_scale where `lora` has factors for `name`."""
  y = x @ lp[name]
  if lora is not None and name in lora:
    a, b = lora[name]["a"], lora[name]["b"]
    y = y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(lora_scale, x.dtype)
  return y


def _qkv(cfg: ModelConfig, lp, proj, resid):
  """Queries `[B, S, H, hd]`, keys and values `[B, S, KV, hd]` of a residual stream `[B, S, D]` (before RoPE)."""
  B, S, _ = resid.shape
  x = rms_norm(resid, lp["attn_norm"], cfg.rms_eps)
  q, k, v = proj(x, "wq"), proj(x, "wk"), proj(x, "wv")
  if cfg.qkv_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  q, k, v = (q.reshape(B, S, cfg.n_heads, cfg.head_dim), k.reshape(B, S, cfg.n_kv_heads, cfg.head_dim),
             v.reshape(B, S, cfg.n_kv_heads, cfg.head_dim))
  q, k, v = (constrain(t, BATCH_AXES, None, TENSOR, None) for t in (q, k, v))
  if cfg.qk_norm:
    q, k = rms_norm(q, lp["q_norm"], cfg.rms_eps), rms_norm(k, lp["k_norm"], cfg.rms_eps)
  return q, k, v


def _heads_intervened(z, iv: Interventions):
  """Per-head output interventions on z `[B, S, H, hd]`: scale, then patch (mask / value), then add."""
  if iv.head_scale is not None:
    z = z * iv.head_scale.astype(z.dtype)[..., None]
  if iv.head_mask is not None:
    z = mix(z, iv.head_mask[..., None], iv.head_value)
  if iv.head_add is not None:
    z = z + iv.head_add.astype(z.dtype)
  return z


def _captured(capture, h, z, attn_out, mlp_out, probs, cached: bool, index):
  """The requested activations of one layer (CAPTURE_NAMES); attn_probs `[B, H, S, slots]` in slot order."""
  acts = {"resid": h, "heads": z, "attn_out": attn_out, "mlp_out": mlp_out}
  acts = {k: v for k, v in acts.items() if k in capture}
  if "attn_probs" in capture:
    B, KV, G, S, _ = probs.shape
    if cached:   # in slot order: the new tokens' probabilities at slots index .. index + S - 1
      T = probs.shape[-1] - S
      probs = probs[..., :T] + jax.lax.dynamic_update_slice(jnp.zeros_like(probs[..., :T]), probs[..., T:],
                                                            (0, 0, 0, 0, index))
    acts["attn_probs"] = probs.reshape(B, KV * G, S, -1)
  return acts


def _layer(cfg: ModelConfig, inv_freq, capture, lora_scale, h, lp, iv, lora, cache_kv, new_valid, positions,
           index):
  """One decoder layer. h `[B, S, D]`; lp / iv / lora: this layer's parameters, interventions, LoRA factors.

  new_valid `[B, S]` bool marks the real new tokens (causal attention among them). cache_kv: None, or this
  layer's cache (k `[B, T, KV, hd]`, v, old_valid `[B, T]` = slots written before this call): the new queries
  attend to those slots and to the new tokens, with one softmax over both; index = the new tokens' first slot.
  Returns (h, acts, (k, v)) with the new tokens' keys (after RoPE) and values `[B, S, KV, hd]` for the caller
  to store (None without a cache).
  """
  B, S, _ = h.shape
  proj = functools.partial(_proj, lp, lora, lora_scale)
  q, k, v = _qkv(cfg, lp, proj, h)
  if iv.qkv_source is not None:
    qs, ks, vs = _qkv(cfg, lp, proj, jnp.broadcast_to(iv.qkv_source.astype(h.dtype), h.shape))
    if iv.q_from_source is not None:
      q = mix(q, iv.q_from_source[..., None], qs)
    if iv.kv_from_source is not None:
      k = mix(k, iv.kv_from_source[..., None], ks)
      v = mix(v, iv.kv_from_source[..., None], vs)
  q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
  z, probs, new_kv = attend(q, k, v, new_valid, cache_kv)
  z = constrain(_heads_intervened(z, iv), BATCH_AXES, None, TENSOR, None)
  attn_out = proj(z.reshape(B, S, -1), "wo")
  if cfg.o_bias:
    attn_out = attn_out + lp["bo"]
  h = h + attn_out
  x = rms_norm(h, lp["mlp_norm"], cfg.rms_eps)
  hidden = constrain(jax.nn.silu(proj(x, "w_gate")) * proj(x, "w_up"), BATCH_AXES, None, TENSOR)
  mlp_out = proj(hidden, "w_down")
  h = h + mlp_out
  if iv.resid_mask is not None:
    h = mix(h, iv.resid_mask[..., None], iv.resid_value)
  if iv.resid_add is not None:
    h = h + iv.resid_add.astype(h.dtype)
  h = constrain(h, BATCH_AXES, None, None)
  return h, _captured(capture, h, z, attn_out, mlp_out, probs, cache_kv is not None, index), new_kv


def _check_capture(capture: Sequence[str]) -> tuple[str, ...]:
  capture = tuple(capture)
  bad = [c for c in capture if c not in CAPTURE_NAMES]
  if bad:
    raise ValueError(f"unknown capture name(s) {bad}; choose from {CAPTURE_NAMES}")
  return capture


def _check_interventions(iv: Interventions | None, cfg: ModelConfig) -> Interventions:
  if iv is None:
    return Interventions()
  ranks = {"resid_add": 4, "resid_mask": 3, "resid_value": 4, "head_scale": 4, "head_mask": 4, "head_value": 5,
           "head_add": 5, "qkv_source": 4, "q_from_source": 4, "kv_from_source": 4}
  for f, r in ranks.items():
    a = getattr(iv, f)
    if a is None:
      continue
    if a.ndim != r or a.shape[0] != cfg.n_layers:
      raise ValueError(f"Interventions.{f} must have rank {r} with leading layer axis {cfg.n_layers}; "
                       f"got shape {a.shape}")
  for m, v in (("resid_mask", "resid_value"), ("head_mask", "head_value")):
    if (getattr(iv, m) is None) != (getattr(iv, v) is None):
      raise ValueError(f"Interventions.{m} and Interventions.{v} must be given together")
  has_mask = iv.q_from_source is not None or iv.kv_from_source is not None
  if has_mask != (iv.qkv_source is not None):
    raise ValueError("Interventions.qkv_source needs q_from_source and/or kv_from_source, and vice versa")
  return iv


def forward_cached(params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig, *,
                   attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                   capture: Sequence[str] = (), interventions: Interventions | None = None,
                   cache: KVCache | None = None, logits: str = "all", lora: dict | None = None,
                   lora_scale: float = 1.0, remat: bool = False, logit_positions: jax.Array | None = None,
                   lora_from: int = 0):
  """Forward pass that also reads/writes a KV cache. See `forward` for the arguments.

  With a cache, `tokens` are written at slots `cache.index ... cache.index + S - 1`, `attention_mask`
  (`[B, S]`) marks which of them are real, and `positions` must be given (RoPE positions of the new tokens).

  Returns:
    (logits, acts, new_cache); new_cache is None when cache is None.
  """
  capture = _check_capture(capture)
  iv = _check_interventions(interventions, cfg)
  B, S = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((B, S), jnp.int32)
  new_valid = attention_mask.astype(bool)
  if cache is None:
    index = jnp.zeros((), jnp.int32)
    if positions is None:
      positions = default_positions(attention_mask)
  else:
    if positions is None:
      raise ValueError("forward_cached with a cache needs explicit positions [B, S]")
    index = cache.index
  inv_freq = rope_inv_freq(cfg)

  h = constrain(params["embed"][tokens], BATCH_AXES, None, None)
  resid0 = h

  if lora is not None:
    bad = [k for k in lora if k not in LORA_TARGETS]
    if bad:
      raise ValueError(f"LoRA targets {bad} unknown; choose from {LORA_TARGETS}")

  def body(h, xs):
    lp, liv, llora, lkv = xs
    lkv = None if lkv is None else (*lkv, old_valid)
    h, acts, new_kv = _layer(cfg, inv_freq, capture, lora_scale, h, lp, liv, llora, lkv, new_valid, positions,
                             index)
    return h, (acts, new_kv)

  # The layer scan only reads the cache and emits the new tokens' keys / values `[L, B, S, KV, hd]`; one
  # in-place write below stores them (a cache passed through the scan as output would be copied every step).
  cache_kv = (cache.k, cache.v) if cache is not None else None
  old_valid = None if cache is None else cache.valid & (jnp.arange(cache.valid.shape[1]) < index)[None, :]
  if remat:   # keep only each layer's input for the backward pass; recompute the layer (jax.checkpoint)
    body = jax.checkpoint(body, prevent_cse=False)
  xs = (params["layers"], iv, lora, cache_kv)
  if lora is not None and lora_from > 0:
    # Layers below lora_from run without adapters in a scan of their own: nothing in it depends on the LoRA
    # factors, so autodiff runs no backward pass through those layers.
    split = lambda t, sl: jax.tree.map(lambda x: x[sl], t)
    lo, hi = slice(0, lora_from), slice(lora_from, None)
    h, out0 = jax.lax.scan(body, h, (split(params["layers"], lo), split(iv, lo), None, split(cache_kv, lo)))
    h, out1 = jax.lax.scan(body, h, split(xs, hi))
    acts, new_kv = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out0, out1)
  else:
    h, (acts, new_kv) = jax.lax.scan(body, h, xs)
  if "resid" in acts:
    acts["resid"] = jnp.concatenate([resid0[None], acts["resid"]], axis=0)

  if logit_positions is not None:
    if logits != "all":
      raise ValueError(f"logit_positions needs logits='all', got logits={logits!r}")
    h = jnp.take_along_axis(h, logit_positions.astype(jnp.int32)[..., None], axis=1)
  out = final_logits(params, cfg, h, logits) if logits != "none" else None
  new_cache = None
  if cache is not None:
    write = lambda c, n: jax.lax.dynamic_update_slice(c, n, (0, 0, index, 0, 0))
    new_cache = KVCache(write(cache.k, new_kv[0]), write(cache.v, new_kv[1]),
                        jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, index)), index + S)
  return out, acts, new_cache


def final_logits(params: dict[str, Any], cfg: ModelConfig, h: jax.Array, mode: str = "all") -> jax.Array:
  """Final RMSNorm + LM head on the last residual stream h `[B, S, D]`: float32 `[B, S, V]` ("all") or
  `[B, V]` at the last position ("last")."""
  hl = h[:, -1:] if mode == "last" else h
  hn = rms_norm(hl, params["final_norm"], cfg.rms_eps)
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  out = constrain((hn @ w.astype(hn.dtype)).astype(jnp.float32), BATCH_AXES, None, TENSOR)
  return out[:, 0] if mode == "last" else out


def run_layers(params: dict[str, Any], cfg: ModelConfig, h: jax.Array, attention_mask: jax.Array,
               start) -> jax.Array:
  """Apply decoder layers start..L-1 (no interventions, no capture) to a residual stream h `[B, S, D]`.

  `start` may be traced (a `lax.fori_loop` over the remaining layers), so a vmapped sweep that steers at layer l
  can reuse the cached unsteered residual resid[l+1] and run only the layers after it. attention_mask `[B, S]`
  0/1 as in `forward` (positions from `default_positions`). Returns the residual `[B, S, D]` after layer L-1.
  """
  inv_freq = rope_inv_freq(cfg)
  positions = default_positions(attention_mask)
  valid = attention_mask.astype(bool)
  none = Interventions()

  def body(i, h):
    h = constrain(h, BATCH_AXES, None, None)
    lp = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), params["layers"])
    h, _, _ = _layer(cfg, inv_freq, (), 1.0, h, lp, none, None, None, valid, positions, jnp.zeros((), jnp.int32))
    return h

  return jax.lax.fori_loop(start, cfg.n_layers, body, h)


def forward(params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig, *,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
            capture: Sequence[str] = (), interventions: Interventions | None = None,
            logits: str = "all", lora: dict | None = None, lora_scale: float = 1.0, remat: bool = False,
            logit_positions: jax.Array | None = None, lora_from: int = 0):
  """Decoder forward pass.

  Args:
    params: stacked parameter pytree (models.params layout), float32 or bfloat16.
    tokens: `[B, S]` int token ids.
    cfg: ModelConfig (static under jit).
    attention_mask: `[B, S]` 0/1, 1 for real tokens; left padding supported. Default all ones.
    positions: `[B, S]` RoPE positions; default `default_positions(attention_mask)`, so a left-padded row
      gives the same outputs at its real tokens as the unpadded row.
    capture: names of activations to return (static):
      "resid"      `[L+1, B, S, D]` residual stream at every layer boundary (0 = embeddings, l+1 = output of
                   layer l, after that layer's interventions; the last entry is before the final norm);
      "heads"      `[L, B, S, H, hd]` per-head attention outputs before o_proj (after head interventions);
      "attn_out"   `[L, B, S, D]` attention block output (after o_proj);
      "mlp_out"    `[L, B, S, D]` MLP block output;
      "attn_probs" `[L, B, H, S, S]` attention probabilities (float32).
    interventions: `Interventions` (arrays with a leading layer axis; vmappable).
    logits: "all" -> `[B, S, V]`, "last" -> `[B, V]` at the last position, "none" -> None.
    lora: optional low-rank adapters `{target: {"a": [L, in, r], "b": [L, r, out]}}` for targets in
      LORA_TARGETS (wq, wk, wv, wo, w_gate, w_up, w_down); each projection becomes
      `x @ W + lora_scale * (x @ A) @ B` (Hu et al. 2021; PEFT's `lora.Linear` with A = lora_A.weight.T,
      B = lora_B.weight.T, lora_scale = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA).
    lora_scale: float multiplier of the LoRA term (static under jit).
    remat: wrap each scanned layer in `jax.checkpoint` (static): the backward pass keeps only every layer's
      input residual `[B, S, D]` and recomputes the layer, trading ~1/3 more FLOPs for activation memory
      (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"). Values are unchanged.
    logit_positions: optional `[B, K]` int positions; with logits="all" the final norm and LM head run only
      there and logits are `[B, K, V]` (row b, slot k = position logit_positions[b, k]). The LM head over a
      49k-152k vocabulary is a third of a 135M model's forward time, so an SFT loss that scores a few response
      tokens per row computes only those (train.losses.sft_rows).
    lora_from: static; the LoRA factors of layers below it must be zero (a depth window starting there,
      train.adapters.LoraSpec): those layers run without the adapter term, and gradients with respect to the
      factors skip their backward pass (a window over the top 60% of depth saves ~40% of the backward).
      Values are unchanged.

  Returns:
    (logits float32, acts dict of the captured arrays in the activation dtype).

  Raises:
    ValueError: an unknown capture name, an intervention array of the wrong rank / layer count, or
      logit_positions with logits other than "all".
  """
  out, acts, _ = forward_cached(params, tokens, cfg, attention_mask=attention_mask, positions=positions,
                                capture=capture, interventions=interventions, logits=logits, lora=lora,
                                lora_scale=lora_scale, remat=remat, logit_positions=logit_positions,
                                lora_from=lora_from)
  return out, acts


forward_jit = jax.jit(forward, static_argnames=("cfg", "capture", "logits", "lora_scale", "remat", "lora_from"))
