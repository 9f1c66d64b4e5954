"""Training objectives as (sum, weight) pairs, so gradient accumulation and data parallelism are exact.

Every loss returns the SUM of its per-token terms; the caller divides by the total weight of the whole (accumulated,
global) batch, which is known from the masks before the forward pass. A mean over a batch split into micro-batches
or shards is then bit-for-bit the mean over the whole batch, up to float summation order.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def sft_loss_sum(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Summed next-token cross-entropy (nats) over masked targets.

  Args:
    logits: `[B, S, V]` float32; position t predicts token t+1.
    tokens: `[B, S]` int token ids.
    loss_mask: `[B, S]` float, 1 where token t is a target (response tokens; prompt and padding are 0).

  Returns:
    Scalar float32 sum over b, t >= 1 of `loss_mask[b, t] * -log softmax(logits[b, t-1])[tokens[b, t]]`.
    Divide by `loss_mask[:, 1:].sum()` for the mean (the standard causal-LM loss with prompt masking, as
    transformers' `ForCausalLMLoss` with labels = -100 on prompt and padding).
  """
  lg = logits[:, :-1].astype(jnp.float32)
  tgt = tokens[:, 1:]
  w = loss_mask[:, 1:].astype(jnp.float32)
  lse = jax.nn.logsumexp(lg, axis=-1)
  picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - picked) * w)


def sft_weight(loss_mask: jax.Array) -> jax.Array:
  """Number of scored targets of `sft_loss_sum` for a `[..., S]` loss mask (float32 scalar)."""
  return jnp.sum(loss_mask[..., 1:].astype(jnp.float32))


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis with a zero (sub)gradient at 0 (as torch.norm), float32."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def representation_loss_sum(acts: jax.Array, target: jax.Array, mask: jax.Array, *,
                            squared: bool = False) -> jax.Array:
  """Summed per-token distance between activations and target activations.

  Args:
    acts: `[n, B, S, D]` activations (e.g. residual stream at n chosen layer boundaries), any float dtype.
    target: same shape (or broadcastable), e.g. frozen activations + alpha * reading vector.
    mask: `[B, S]` float, which token positions count.
    squared: squared L2 distance instead of the L2 distance.

  Returns:
    float32 scalar `sum_{i,b,s} mask[b, s] * ||acts[i,b,s] - target[i,b,s]||_2` (or its square). Divide by
    `n * mask.sum()` for the mean per layer and token (the representation loss of Zou et al. 2023, LoRRA,
    whose reference code takes `torch.norm(lora_hidden - target_hidden, dim=-1, p=2).nanmean()`).
  """
  d = acts.astype(jnp.float32) - target.astype(jnp.float32)
  dist = jnp.sum(jnp.square(d), axis=-1) if squared else _safe_norm(d)
  return jnp.sum(dist * mask.astype(jnp.float32)[None])


def lorra_targets(frozen_resid: jax.Array, reading: jax.Array, alpha: float, layers: Sequence[int]) -> jax.Array:
  """LoRRA targets at the output of the given decoder layers: frozen activation + alpha * reading vector.

  Args:
    frozen_resid: `[L+1, B, S, D]` residual stream of the frozen model (models.transformer capture "resid").
    reading: `[L, D]` reading vector per decoder layer (row l lives at the output of layer l = boundary l+1).
    alpha: the LoRRA coefficient (Zou et al. 2023, Section 6, "Low-Rank Representation Adaptation").
    layers: decoder layer indices.

  Returns:
    `[len(layers), B, S, D]` float32.
  """
  idx = jnp.asarray(layers) + 1
  base = frozen_resid[idx].astype(jnp.float32)
  return base + alpha * reading[jnp.asarray(layers)].astype(jnp.float32)[:, None, None, :]
