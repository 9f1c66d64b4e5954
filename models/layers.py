"""The pieces of one decoder layer, as pure functions: RMSNorm, RoPE, causal grouped-query attention (with an
optional read-only KV cache) and the masked mix used by patching interventions.

Shapes: B batch, S new tokens, T cache slots, H query heads, KV kv heads, G = H / KV, hd head_dim. The math
matches transformers 5.23 modeling_llama.py / modeling_qwen2.py / modeling_qwen3.py (see models/transformer.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig

NEG = -1e30  # finite mask value: fully-masked rows (left padding) stay NaN-free


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies `[head_dim // 2]` float32.

  Matches transformers `_compute_default_rope_parameters` and, for rope_type "llama3",
  `_compute_llama3_parameters` (modeling_rope_utils.py).
  """
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "llama3":
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_pos
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, statistics in float32, as transformers' LlamaRMSNorm. Returns x.dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w * y.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE. x `[B, S, n, hd]`, positions `[B, S]` int. Matches `apply_rotary_pos_emb`."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]   # [B, S, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
  sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rot * sin


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """Positions `[B, S]` from a `[B, S]` 0/1 mask: cumsum - 1, clipped at 0 (left padding gets position 0).

  This is the rule transformers' `generate` uses, so a left-padded row sees the same RoPE positions as the
  unpadded sequence.
  """
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def mix(x: jax.Array, mask: jax.Array, value: jax.Array) -> jax.Array:
  """x where mask is 0, value where mask is 1 (mask broadcasts against x; fractional masks interpolate)."""
  return x + mask.astype(x.dtype) * (value.astype(x.dtype) - x)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, new_valid: jax.Array, cache_kv=None):
  """Causal softmax attention of the new queries over the new tokens and, with a cache, its written slots.

  q `[B, S, H, hd]`, k / v `[B, S, KV, hd]` (after RoPE); query head h reads kv head h // G. new_valid `[B, S]`
  bool marks the real new tokens. cache_kv: None, or (k `[B, T, KV, hd]`, v, old_valid `[B, T]` bool), only read:
  one softmax runs over the old slots and the new tokens. Scores are float32, scaled by 1 / sqrt(hd).

  Returns (z `[B, S, H, hd]`, probs `[B, KV, G, S, T + S]` float32 (T = 0 without a cache), new_kv): new_kv is the
  new tokens' (k, v) in the cache dtype for the caller to store, or None without a cache.
  """
  B, S, H, hd = q.shape
  KV = k.shape[2]
  new_kv = None
  slots = jnp.arange(S)
  allowed = (slots[None, None, :] <= slots[None, :, None]) & new_valid[:, None, :]          # [B, S, S]
  qg = q.reshape(B, S, KV, H // KV, hd)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k).astype(jnp.float32) / math.sqrt(hd)
  if cache_kv is not None:
    # The cache is only read here (no per-layer copy of it): scores over the old slots and the new tokens.
    ck, cv, old_valid = cache_kv
    new_kv = (k.astype(ck.dtype), v.astype(cv.dtype))
    T = ck.shape[1]
    old = jnp.einsum("bskgd,btkd->bkgst", qg, ck.astype(q.dtype)).astype(jnp.float32) / math.sqrt(hd)
    scores = jnp.concatenate([old, scores], axis=-1)
    allowed = jnp.concatenate([jnp.broadcast_to(old_valid[:, None, :], (B, S, T)), allowed], axis=-1)
  scores = jnp.where(allowed[:, None, None, :, :], scores, NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  if cache_kv is None:
    z = jnp.einsum("bkgst,btkd->bskgd", probs.astype(q.dtype), v)
  else:
    pq = probs.astype(q.dtype)
    z = (jnp.einsum("bkgst,btkd->bskgd", pq[..., :T], cv.astype(q.dtype))
         + jnp.einsum("bkgst,btkd->bskgd", pq[..., T:], v))
  return z.reshape(B, S, H, hd), probs, new_kv
