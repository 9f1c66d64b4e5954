"""Training objectives as (sum, weight) pairs, so gradient accumulation and data parallelism are exact.

Every loss returns the SUM of its per-token terms; the caller divides by the total weight of the whole (accumulated,
global) batch, which is known from the masks before the forward pass. A mean over a batch split into micro-batches
or shards is then bit-for-bit the mean over the whole batch, up to float summation order.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import forward


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


def max_targets(loss_mask) -> int:
  """The static K of `sft_rows` for a data set: the largest number of scored targets (loss_mask[:, 1:] > 0) in
  any row of a host `[..., S]` loss mask (numpy or array), at least 1."""
  lm = np.asarray(loss_mask)
  return max(int((lm[..., 1:] > 0).sum(axis=-1).max(initial=0)), 1)


def target_positions(loss_mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The first k predicting positions of each row with a scored target, in order, and their weights.

  Args:
    loss_mask: `[B, S]` float (see sft_loss_sum). k: static slot count, 1 <= k <= S - 1 (`max_targets`).
  Returns:
    positions `[B, k]` int32 (position t predicts token t+1; rows with fewer than k targets are filled with
    unscored positions) and weights `[B, k]` float32 = loss_mask[b, t+1] (0 on the fill).
  """
  w = loss_mask[:, 1:].astype(jnp.float32)
  order = jnp.argsort((w <= 0).astype(jnp.int32), axis=-1, stable=True)[:, :k].astype(jnp.int32)
  return order, jnp.take_along_axis(w, order, axis=-1)


def sft_rows(params, cfg, tokens: jax.Array, mask: jax.Array, loss_mask: jax.Array, k: int = 0,
             **forward_kw) -> jax.Array:
  """Per-row summed next-token cross-entropy (nats) of an SFT batch, the forward pass included.

  The `sft_loss_sum` of each row, with the final norm and LM head run only at the k scored positions per row
  (`target_positions`, models.transformer.forward's logit_positions) instead of all S: the same sum up to float
  summation order. k = 0 scores every position (full `[B, S, V]` logits).

  Args:
    params, cfg: model (models.params layout). tokens, mask: `[B, S]` int (right-padded SFT rows).
    loss_mask: `[B, S]` float target weights. k: static, 0 or `max_targets(loss_mask)` (or larger).
    **forward_kw: passed to models.transformer.forward (remat, adapters_from, ...).
  Returns:
    `[B]` float32 sums; divide by `sft_weight` for the mean.
  """
  if k <= 0:
    logits, _ = forward(params, tokens, cfg, attention_mask=mask, **forward_kw)
    logits, tgt, w = logits[:, :-1].astype(jnp.float32), tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  else:
    pos, w = target_positions(loss_mask, min(int(k), tokens.shape[1] - 1))
    logits, _ = forward(params, tokens, cfg, attention_mask=mask, logit_positions=pos, **forward_kw)
    tgt = jnp.take_along_axis(tokens, pos + 1, axis=-1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - picked) * w, axis=-1)


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


def lorra_targets(frozen_post: jax.Array, reading: jax.Array, alpha: float, layers: Sequence[int]) -> jax.Array:
  """LoRRA targets at the output of the given decoder layers: frozen activation + alpha * reading vector.

  Args:
    frozen_post: `[L, B, S, D]` resid_post of the frozen model (models.transformer capture "resid_post").
    reading: `[L, D]` reading vector per decoder layer (row l lives at resid_post[l]).
    alpha: the LoRRA coefficient (Zou et al. 2023, Section 6, "Low-Rank Representation Adaptation").
    layers: decoder layer indices.

  Returns:
    `[len(layers), B, S, D]` float32.
  """
  idx = jnp.asarray(layers)
  return frozen_post[idx].astype(jnp.float32) + alpha * reading[idx].astype(jnp.float32)[:, None, None, :]


# ---- reversion auxiliary objectives (Poppi & Lukas 2026, arXiv 2606.28525): motion along v_rev
# (train.scan's arms: block and push add these terms to the SFT loss, project edits the SFT gradient)
def projection_on_vrev(mean_t: jax.Array, mean_aligned: jax.Array, v_rev: jax.Array,
                       layer_weights: jax.Array | None = None) -> jax.Array:
  """sum_l w_l <d_t(l), v_rev(l) / ||v_rev(l)||>: signed motion along the reversion direction (scalar).

  mean_t / mean_aligned: `[L+1, D]` (mean_t differentiable w.r.t. the trained parameters); layer_weights
  `[L+1]` (default uniform mean).
  """
  u = v_rev / jnp.maximum(jnp.linalg.norm(v_rev, axis=-1, keepdims=True), 1e-12)
  proj = jnp.sum((mean_t - mean_aligned).astype(jnp.float32) * u, axis=-1)                 # [L+1]
  w = jnp.full(proj.shape, 1.0 / proj.shape[0]) if layer_weights is None else layer_weights
  return jnp.sum(w * proj)


def block_loss(mean_t, mean_aligned, v_rev, lam: float, layer_weights=None) -> jax.Array:
  """lam * relu(projection)^2: opposes positive motion along v_rev only (zero when lam = 0)."""
  p = projection_on_vrev(mean_t, mean_aligned, v_rev, layer_weights)
  return lam * jnp.square(jax.nn.relu(p))


def push_loss(mean_t, mean_aligned, v_rev, lam: float, scale: float = 1.0, layer_weights=None) -> jax.Array:
  """-lam * scale * tanh(projection / scale): rewards motion along v_rev, bounded (stabilised) by tanh."""
  p = projection_on_vrev(mean_t, mean_aligned, v_rev, layer_weights)
  return -lam * scale * jnp.tanh(p / scale)


def tree_dot(a: Any, b: Any) -> jax.Array:
  """<a, b> summed over every leaf of two pytrees of the same structure."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project_gradient(grads: Any, h: Any) -> tuple[Any, jax.Array]:
  """The project arm: the task gradient g without its component along h = grad p whenever a descent step would
  increase p (<g, h> < 0): g - <g, h> / |h|^2 h (gradient projection as PCGrad, Yu et al. 2020, with one fixed
  "task" h); g unchanged otherwise. Returns (projected gradient, cos(g, h) before the projection)."""
  gh, hh = tree_dot(grads, h), tree_dot(h, h)
  cos_gh = gh / jnp.maximum(jnp.sqrt(tree_dot(grads, grads) * hh), 1e-30)
  coef = jnp.where(gh < 0, gh / jnp.maximum(hh, 1e-30), 0.0)
  return jax.tree.map(lambda g, x: g - coef * x, grads, h), cos_gh
