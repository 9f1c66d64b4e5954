"""The Llama / Qwen2 / Qwen3 decoder forward pass as a pure function over the stacked parameter pytree.

Layers are stacked on a leading axis and run with `jax.lax.scan`, so compile time does not grow with depth and
every per-layer quantity (captured activations, interventions, KV cache) is an array with a layer axis.

Interventions are arguments, not hooks (models.interventions: the sites, with TransformerLens names, and the
one-hot builders): arrays with a leading layer axis, so `jax.vmap` over layers / alphas / heads / seeds turns a
sweep into one compiled program. LoRA is a parameter transform (models.lora.adapt): an adapted weight is a
LowRank node that `project` applies, so the forward takes a fine-tuned model as just another params pytree.

The math matches transformers' `LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` (modeling_llama.py,
modeling_qwen2.py, modeling_qwen3.py of transformers 5.23): RMSNorm computed in float32, rotate-half RoPE
(with the "llama3" frequency scaling of `_compute_llama3_parameters`), grouped-query attention with
query head h reading kv head h // (H / KV), SiLU-gated MLP.

Sharding: the residual stream, q/k/v, per-head outputs, MLP hidden and logits carry `models.sharding.constrain`
annotations (batch over (data, fsdp), heads / MLP columns / vocab over tensor). They take effect only while a
mesh is active; without one the forward pass is unchanged.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from models import interventions as I
from models.config import ModelConfig
from models.interventions import CAPTURE_NAMES, Interventions  # noqa: F401 (public here too)
from models.layers import (apply_rope, attend, default_positions, mix, rms_norm,  # noqa: F401 (public here)
                           rope_inv_freq)
from models.lora import base, is_adapted, project
from models.sharding import BATCH_AXES, TENSOR, constrain

# forward(remat=...): the jax.checkpoint policy of each scanned layer (None = save nothing, recompute the layer).
REMAT = {False: None, True: None, "dots": jax.checkpoint_policies.checkpoint_dots}


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


def _qkv(cfg: ModelConfig, lp, resid):
  """Queries `[B, S, H, hd]`, keys and values `[B, S, KV, hd]` of a residual stream `[B, S, D]` (before RoPE)."""
  B, S, _ = resid.shape
  x = rms_norm(resid, lp["attn_norm"], cfg.rms_eps)
  q, k, v = project(lp["wq"], x), project(lp["wk"], x), project(lp["wv"], x)
  if cfg.qkv_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  q, k, v = (q.reshape(B, S, cfg.n_heads, cfg.head_dim), k.reshape(B, S, cfg.n_kv_heads, cfg.head_dim),
             v.reshape(B, S, cfg.n_kv_heads, cfg.head_dim))
  q, k, v = (constrain(t, BATCH_AXES, None, TENSOR, None) for t in (q, k, v))
  if cfg.qk_norm:
    q, k = rms_norm(q, lp["q_norm"], cfg.rms_eps), rms_norm(k, lp["k_norm"], cfg.rms_eps)
  return q, k, v


class _Context(NamedTuple):
  """What every layer of one forward call shares: capture names (static), RoPE inverse frequencies, the new
  tokens' validity `[B, S]` bool and RoPE positions `[B, S]`, and index = their first cache slot."""
  capture: tuple[str, ...]
  inv_freq: Any
  new_valid: jax.Array
  positions: jax.Array
  index: jax.Array


def _attn_probs(probs, cached: bool, index):
  """attn_probs `[B, H, S, slots]` in slot order from attend's `[B, KV, G, S, T + S]`."""
  B, KV, G, S, _ = probs.shape
  if cached:   # in slot order: the new tokens' probabilities at slots index .. index + S - 1
    T = probs.shape[-1] - S
    probs = probs[..., :T] + jax.lax.dynamic_update_slice(jnp.zeros_like(probs[..., :T]), probs[..., T:],
                                                          (0, 0, 0, 0, index))
  return probs.reshape(B, KV * G, S, -1)


def _attention(cfg: ModelConfig, ctx: _Context, h, lp, iv: Interventions, cache_kv):
  """The attention block of one layer on resid_pre h `[B, S, D]`: (attn_out `[B, S, D]`, z `[B, S, H, hd]`
  after the head interventions, probs, new_kv) with path patching's qkv_source on the way in."""
  B, S, _ = h.shape
  q, k, v = _qkv(cfg, lp, h)
  if iv.qkv_source is not None:
    qs, ks, vs = _qkv(cfg, lp, jnp.broadcast_to(iv.qkv_source.astype(h.dtype), h.shape))
    if iv.q_from_source is not None:
      q = mix(q, iv.q_from_source[..., None], qs)
    if iv.kv_from_source is not None:
      k = mix(k, iv.kv_from_source[..., None], ks)
      v = mix(v, iv.kv_from_source[..., None], vs)
  q, k = apply_rope(q, ctx.positions, ctx.inv_freq), apply_rope(k, ctx.positions, ctx.inv_freq)
  z, probs, new_kv = attend(q, k, v, ctx.new_valid, cache_kv)
  z = constrain(I.apply_heads(z, iv), BATCH_AXES, None, TENSOR, None)
  attn_out = project(lp["wo"], z.reshape(B, S, -1))
  if cfg.o_bias:
    attn_out = attn_out + lp["bo"]
  return attn_out, z, probs, new_kv


def _layer(cfg: ModelConfig, ctx: _Context, h, lp, iv: Interventions, cache_kv):
  """One decoder layer. h `[B, S, D]` = resid_pre; lp / iv: this layer's parameters (a weight may be a
  models.lora.LowRank) and interventions.

  cache_kv: None, or this layer's cache (k `[B, T, KV, hd]`, v, old_valid `[B, T]` = slots written before this
  call): the new queries attend to those slots and to the new tokens, with one softmax over both.
  Returns (resid_post, acts: this layer's captured sites, (k, v)) with the new tokens' keys (after RoPE) and
  values `[B, S, KV, hd]` for the caller to store (None without a cache).
  """
  h = I.ablate(h, iv)
  resid_pre = h
  attn_out, z, probs, new_kv = _attention(cfg, ctx, h, lp, iv, cache_kv)
  resid_mid = I.ablate(h + attn_out, iv)
  x = rms_norm(resid_mid, lp["mlp_norm"], cfg.rms_eps)
  hidden = constrain(jax.nn.silu(project(lp["w_gate"], x)) * project(lp["w_up"], x), BATCH_AXES, None, TENSOR)
  mlp_out = project(lp["w_down"], hidden)
  h = constrain(I.apply_resid(resid_mid + mlp_out, iv), BATCH_AXES, None, None)
  sites = {"resid": h, "resid_pre": resid_pre, "resid_mid": resid_mid, "resid_post": h, "heads": z,
           "attn_out": attn_out, "mlp_out": mlp_out}
  acts = {k: v for k, v in sites.items() if k in ctx.capture}
  if "attn_probs" in ctx.capture:
    acts["attn_probs"] = _attn_probs(probs, cache_kv is not None, ctx.index)
  return h, acts, new_kv


def forward_cached(params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig, *,
                   attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                   capture: Sequence[str] = (), interventions: Interventions | None = None,
                   cache: KVCache | None = None, logits: str = "all", remat: bool = False,
                   logit_positions: jax.Array | None = None, adapters_from: int = 0):
  """Forward pass that also reads/writes a KV cache. See `forward` for the arguments.

  With a cache, `tokens` are written at slots `cache.index ... cache.index + S - 1`, `attention_mask`
  (`[B, S]`) marks which of them are real, and `positions` must be given (RoPE positions of the new tokens).

  Returns:
    (logits, acts, new_cache); new_cache is None when cache is None.
  """
  capture = I.check_capture(capture)
  iv = I.check(interventions, cfg)
  B, S = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((B, S), jnp.int32)
  if cache is not None and positions is None:
    raise ValueError("forward_cached with a cache needs explicit positions [B, S]")
  ctx = _Context(capture, rope_inv_freq(cfg), attention_mask.astype(bool),
                 default_positions(attention_mask) if positions is None else positions,
                 jnp.zeros((), jnp.int32) if cache is None else cache.index)
  h = constrain(params["embed"][tokens], BATCH_AXES, None, None)
  resid0 = h
  # The layer scan only reads the cache and emits the new tokens' keys / values `[L, B, S, KV, hd]`; one
  # in-place write below stores them (a cache passed through the scan as output would be copied every step).
  cache_kv = (cache.k, cache.v) if cache is not None else None
  old_valid = None if cache is None else cache.valid & (jnp.arange(cache.valid.shape[1]) < ctx.index)[None, :]

  def body(h, xs):
    lp, liv, lkv = xs
    h, acts, new_kv = _layer(cfg, ctx, h, lp, liv, None if lkv is None else (*lkv, old_valid))
    return h, (acts, new_kv)

  if remat not in REMAT:
    raise ValueError(f"forward: remat must be one of {sorted(REMAT, key=str)}, got {remat!r}")
  if remat:   # jax.checkpoint: the backward pass recomputes what the policy does not save
    body = jax.checkpoint(body, prevent_cse=False, policy=REMAT[remat])
  h, (acts, new_kv) = _scan_layers(body, h, params["layers"], iv, cache_kv, adapters_from)
  if "resid" in acts:
    acts["resid"] = jnp.concatenate([resid0[None], acts["resid"]], axis=0)
  if logit_positions is not None:
    if logits != "all":
      raise ValueError(f"logit_positions needs logits='all', got logits={logits!r}")
    h = jnp.take_along_axis(h, logit_positions.astype(jnp.int32)[..., None], axis=1)
  out = final_logits(params, cfg, h, logits) if logits != "none" else None
  new_cache = None
  if cache is not None:
    write = lambda c, n: jax.lax.dynamic_update_slice(c, n, (0, 0, ctx.index, 0, 0))
    new_cache = KVCache(write(cache.k, new_kv[0]), write(cache.v, new_kv[1]),
                        jax.lax.dynamic_update_slice(cache.valid, ctx.new_valid, (0, ctx.index)), ctx.index + S)
  return out, acts, new_cache


def _scan_layers(body, h, layers, iv, cache_kv, adapters_from: int):
  """`lax.scan` of body over the stacked layers. With adapters_from > 0 and LowRank weights, the layers below
  it run on their frozen weights in a scan of their own: nothing there depends on the adapters, so autodiff
  runs no backward pass through those layers."""
  if not is_adapted(layers) or adapters_from <= 0:
    return jax.lax.scan(body, h, (layers, iv, cache_kv))
  split = lambda t, sl: jax.tree.map(lambda x: x[sl], t)
  lo, hi = slice(0, adapters_from), slice(adapters_from, None)
  h, out0 = jax.lax.scan(body, h, (split(base(layers), lo), split(iv, lo), split(cache_kv, lo)))
  h, out1 = jax.lax.scan(body, h, split((layers, iv, cache_kv), hi))
  return h, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out0, out1)


def final_logits(params: dict[str, Any], cfg: ModelConfig, h: jax.Array, mode: str = "all") -> jax.Array:
  """Final RMSNorm + LM head on the last residual stream h `[B, S, D]`: float32 `[B, S, V]` ("all") or
  `[B, V]` at the last position ("last")."""
  hl = h[:, -1:] if mode == "last" else h
  hn = rms_norm(hl, params["final_norm"], cfg.rms_eps)
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  out = constrain((hn @ w.astype(hn.dtype)).astype(jnp.float32), BATCH_AXES, None, TENSOR)
  return out[:, 0] if mode == "last" else out


def next_token_logprobs(params: dict[str, Any], cfg: ModelConfig, h: jax.Array, tokens: jax.Array,
                        vocab_chunk: int = 8192) -> jax.Array:
  """Teacher-forced log p(tokens[:, t+1] | tokens[:, :t+1]) `[B, S-1]` float32 from the last residual stream h
  `[B, S, D]`, without the `[B, S, V]` logits: the final RMSNorm, then the LM head and an online logsumexp over
  vocabulary chunks of at most `vocab_chunk` columns (a `lax.scan`; the last chunk is masked where V is not a
  multiple), and the target token's logit as a dot product with its LM-head column. Equals
  `log_softmax(final_logits(h))` at the next tokens up to float32 rounding; the working memory is `[B, S, chunk]`.
  A sweep that vmaps several configurations over many tasks holds this instead of 49k-152k logits per token.
  """
  hn = rms_norm(h[:, :-1], params["final_norm"], cfg.rms_eps)
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]                            # [D, V]
  V = w.shape[1]
  n = -(-V // vocab_chunk)
  c = -(-V // n)
  wc = jnp.pad(w, ((0, 0), (0, n * c - V))).reshape(w.shape[0], n, c).transpose(1, 0, 2)         # [n, D, c]

  def step(carry, xs):
    m, s = carry
    wk, k = xs
    z = (hn @ wk.astype(hn.dtype)).astype(jnp.float32)
    z = jnp.where(k * c + jnp.arange(c) < V, z, -jnp.inf)
    m_new = jnp.maximum(m, z.max(-1))
    return (m_new, s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)), None

  init = (jnp.full(hn.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(hn.shape[:-1], jnp.float32))
  (m, s), _ = jax.lax.scan(step, init, (wc, jnp.arange(n)))
  target = jnp.einsum("bsd,bsd->bs", hn, w.T[tokens[:, 1:]].astype(hn.dtype)).astype(jnp.float32)
  return target - (m + jnp.log(s))


def run_layers(params: dict[str, Any], cfg: ModelConfig, h: jax.Array, attention_mask: jax.Array,
               start) -> jax.Array:
  """Apply decoder layers start..L-1 (no interventions, no capture) to a residual stream h `[B, S, D]`.

  `start` may be traced (a `lax.fori_loop` over the remaining layers), so a vmapped sweep that steers at layer l
  can reuse the cached unsteered residual resid[l+1] and run only the layers after it. attention_mask `[B, S]`
  0/1 as in `forward` (positions from `default_positions`). Returns the residual `[B, S, D]` after layer L-1.
  """
  ctx = _Context((), rope_inv_freq(cfg), attention_mask.astype(bool), default_positions(attention_mask),
                 jnp.zeros((), jnp.int32))
  none = Interventions()

  def body(i, h):
    h = constrain(h, BATCH_AXES, None, None)
    lp = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), params["layers"])
    return _layer(cfg, ctx, h, lp, none, None)[0]

  return jax.lax.fori_loop(start, cfg.n_layers, body, h)


def forward(params: dict[str, Any], tokens: jax.Array, cfg: ModelConfig, *,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
            capture: Sequence[str] = (), interventions: Interventions | None = None,
            logits: str = "all", remat: bool = False, logit_positions: jax.Array | None = None,
            adapters_from: int = 0):
  """Decoder forward pass.

  Args:
    params: stacked parameter pytree (models.params layout), float32 or bfloat16. A fine-tuned model with
      LoRA adapters is `models.lora.adapt(params, lora, scale)`: its adapted weights are LowRank nodes.
    tokens: `[B, S]` int token ids.
    cfg: ModelConfig (static under jit).
    attention_mask: `[B, S]` 0/1, 1 for real tokens; left padding supported. Default all ones.
    positions: `[B, S]` RoPE positions; default `default_positions(attention_mask)`, so a left-padded row
      gives the same outputs at its real tokens as the unpadded row.
    capture: names of activation sites to return (static; models.interventions lists them with their
      TransformerLens names): "resid" `[L+1, B, S, D]` every layer boundary (0 = embeddings, l + 1 =
      resid_post[l]; the last entry is before the final norm); "resid_pre", "resid_mid", "resid_post"
      `[L, B, S, D]` per block; "heads" `[L, B, S, H, hd]` per-head z before o_proj (after head
      interventions); "attn_out", "mlp_out" `[L, B, S, D]`; "attn_probs" `[L, B, H, S, S]` float32.
    interventions: `Interventions` (arrays with a leading layer axis; vmappable).
    logits: "all" -> `[B, S, V]`, "last" -> `[B, V]` at the last position, "none" -> None.
    remat: static; False, True or "dots" (REMAT). True wraps each scanned layer in `jax.checkpoint`: the
      backward pass keeps only every layer's input residual `[B, S, D]` and recomputes the layer, trading ~1/3
      more FLOPs for activation memory (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
      "dots" keeps the matmul outputs and recomputes the rest (`jax.checkpoint_policies.checkpoint_dots`: the
      norms, RoPE, softmax and attention probabilities `[B, H, S, S]`), which on the 2-core CPU makes an
      activation-gradient pass 7-13% faster than saving everything (less memory written and read back).
      Values are unchanged either way.
    logit_positions: optional `[B, K]` int positions; with logits="all" the final norm and LM head run only
      there and logits are `[B, K, V]` (row b, slot k = position logit_positions[b, k]). The LM head over a
      49k-152k vocabulary is a third of a 135M model's forward time, so an SFT loss that scores a few response
      tokens per row computes only those (train.losses.sft_rows).
    adapters_from: static; the LoRA factors of layers below it must be zero (a depth window starting there,
      train.adapters.LoraSpec): those layers run on the frozen weights, and gradients with respect to the
      factors skip their backward pass (a window over the top 60% of depth saves ~40% of the backward).
      Values are unchanged.

  Returns:
    (logits float32, acts dict of the captured arrays in the activation dtype).

  Raises:
    ValueError: an unknown capture name, an intervention array of the wrong rank / layer count,
      logit_positions with logits other than "all", or a remat value not in REMAT.
  """
  out, acts, _ = forward_cached(params, tokens, cfg, attention_mask=attention_mask, positions=positions,
                                capture=capture, interventions=interventions, logits=logits, remat=remat,
                                logit_positions=logit_positions, adapters_from=adapters_from)
  return out, acts


forward_jit = jax.jit(forward, static_argnames=("cfg", "capture", "logits", "remat", "adapters_from"))
