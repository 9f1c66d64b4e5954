"""Jitted greedy and sampled generation with a KV cache (one compiled program: prefill + lax.scan of decode steps).

Prompts are left-padded `[B, S]` with an attention mask; RoPE positions continue from each row's real length,
as transformers' `generate` does, so greedy output equals `model.generate(do_sample=False)`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.transformer import Interventions, KVCache, default_positions, forward_cached


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature: float, top_p: float) -> jax.Array:
  """Pick next tokens from `[B, V]` float32 logits: argmax when temperature == 0, otherwise nucleus sampling.

  top_p keeps the smallest set of tokens whose probability mass reaches top_p (Holtzman et al. 2020), always
  including the most likely one. Returns `[B]` int32.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p", "eos_ids",
                                             "pad_id"))
def generate(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array, attention_mask: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
             eos_ids: tuple[int, ...] = (), pad_id: int = 0,
             interventions: Interventions | None = None) -> jax.Array:
  """Generate `max_new_tokens` tokens after left-padded prompts.

  Args:
    params, cfg: model (models.params layout; with LoRA adapters, models.lora.adapt(params, lora, scale)).
    tokens: `[B, S]` int prompt ids, left-padded. attention_mask: `[B, S]` 0/1.
    max_new_tokens: number of decode steps (static).
    temperature: 0.0 for greedy decoding; > 0 samples (static). top_p: nucleus mass (static).
    key: PRNG key, required when temperature > 0.
    eos_ids: a row stops after emitting any of these; later slots are filled with pad_id.
    interventions: applied at every step (prefill and decode); their sequence axes must be 1 (broadcast)
      so the same per-layer vectors steer every generated position.

  Returns:
    `[B, max_new_tokens]` int32 new tokens.
  """
  B, S = tokens.shape
  if temperature > 0.0 and key is None:
    raise ValueError("generate: temperature > 0 needs a PRNG key")
  if key is None:
    key = jax.random.key(0)
  cache = KVCache.init(cfg, B, S + max_new_tokens, params["embed"].dtype)
  positions = default_positions(attention_mask)
  logits, _, cache = forward_cached(params, tokens, cfg, attention_mask=attention_mask, positions=positions,
                                    cache=cache, interventions=interventions, logits="last")
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def step(carry, step_key):
    logits, cache, pos, done = carry
    tok = sample_logits(logits, step_key, temperature, top_p)
    tok = jnp.where(done, pad_id, tok)
    done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
    logits, _, cache = forward_cached(params, tok[:, None], cfg, attention_mask=jnp.ones((B, 1), jnp.int32),
                                      positions=pos[:, None], cache=cache, interventions=interventions,
                                      logits="last")
    return (logits, cache, pos + 1, done), tok

  init = (logits, cache, positions[:, -1] + 1, jnp.zeros((B,), bool))
  _, toks = jax.lax.scan(step, init, jax.random.split(key, max_new_tokens))
  return toks.T
