"""Readouts of the residual stream: the last-token residual of every row (batched host loop), the mean activation
over prompts at one position, the cosine and the logit lens: the one copy of each that the studies share.

Shapes: a residual stream captured as "resid" is `[L+1, N, S, D]` (boundary 0 = embeddings, boundary l = the
output of decoder layer l), prompts left-padded so the last prompt token sits at position S-1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.transformer import final_logits, forward, forward_jit


def mean_activation(resid: jax.Array, mask: jax.Array, position: str = "last") -> jax.Array:
  """Mean residual activation over prompts at one position.

  Args:
    resid: `[L+1, N, S, D]` residual stream (capture "resid") of N left-padded prompts.
    mask: `[N, S]` 0/1. position: "last" (the last prompt token; rows are left-padded so it is S-1) or
      "mean" (mean over each prompt's real tokens, then over prompts).

  Returns:
    `[L+1, D]` float32.
  """
  r = resid.astype(jnp.float32)
  if position == "last":
    return jnp.mean(r[:, :, -1], axis=1)
  if position == "mean":
    m = mask.astype(jnp.float32)
    per_prompt = jnp.einsum("lnsd,ns->lnd", r, m) / jnp.sum(m, axis=1)[None, :, None]
    return jnp.mean(per_prompt, axis=1)
  raise ValueError(f"position must be 'last' or 'mean', got {position!r}")


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Cosine along the last axis, broadcasting leading axes; 0 where either vector is ~0."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
  return jnp.where((na > eps) & (nb > eps), jnp.sum(a * b, -1) / jnp.maximum(na * nb, eps), 0.0)


def last_token_resid(params, cfg: ModelConfig, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 16,
                     progress=None, site: str = "resid") -> np.ndarray:
  """Residual stream at the last (real) token of each left-padded row, at every layer boundary ("resid") or at
  one per-block site ("resid_pre" / "resid_mid" / "resid_post", models.interventions).

  Args:
    tokens, mask: `[N, S]` left-padded int32 (models.tokenizer.encode_left_padded).
    batch_size: rows per forward pass (rows are processed in length order to limit padding; sequence widths are
      rounded up to a multiple of 32 so few shapes compile).
    progress: optional callable(n_rows_done) for a progress bar.
  Returns:
    `[L+1, N, D]` float32 numpy for "resid" (0 = embeddings, l+1 = output of layer l), `[L, N, D]` for a
    per-block site.
  Raises ValueError for any other site.
  """
  if site not in ("resid", "resid_pre", "resid_mid", "resid_post"):
    raise ValueError(f"last_token_resid: site must be resid / resid_pre / resid_mid / resid_post, got {site!r}")
  lengths = mask.sum(1)
  order = np.argsort(lengths, kind="stable")
  out = np.zeros((cfg.n_layers + (site == "resid"), len(tokens), cfg.d_model), np.float32)
  for i in range(0, len(order), batch_size):
    idx = order[i:i + batch_size]
    S = min(tokens.shape[1], -(-int(lengths[idx].max()) // 32) * 32)   # multiple of 32: few compilations
    _, acts = forward_jit(params, jnp.asarray(tokens[idx, -S:]), cfg, attention_mask=jnp.asarray(mask[idx, -S:]),
                            capture=(site,), logits="none")
    out[:, idx] = np.asarray(acts[site][:, :, -1], np.float32)
    if progress is not None:
      progress(len(idx))
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def logit_lens(params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, targets: jax.Array,
               top_k: int = 5) -> dict[str, jax.Array]:
  """The logit lens (nostalgebraist 2020) at the last token of every row, at every residual boundary, in one
  program: the model's own final RMSNorm and LM head applied to resid[l] (l = 0 embeddings ... L the last layer's
  output, so boundary L is the model's prediction).

  Args:
    tokens, mask: `[B, S]` left-padded prompts (the last prompt token at position S-1).
    targets: `[B, K]` int token ids whose log-probabilities to read (e.g. a refusal token and a compliance token).
    top_k: how many of each boundary's most likely tokens to return (static).
  Returns:
    {"logprobs": `[L+1, B, K]` float32 log-softmax at the targets, "top_ids": `[L+1, B, top_k]` int32,
    "top_logprobs": `[L+1, B, top_k]` float32}.
  """
  _, acts = forward(params, tokens, cfg, attention_mask=mask, capture=("resid",), logits="none")
  h = acts["resid"][:, :, -1]                                                         # [L+1, B, D]
  logp = jax.nn.log_softmax(final_logits(params, cfg, h), axis=-1)                   # [L+1, B, V]
  top, ids = jax.lax.top_k(logp, top_k)
  picked = jnp.take_along_axis(logp, jnp.broadcast_to(targets[None], (logp.shape[0], *targets.shape)), axis=-1)
  return {"logprobs": picked, "top_ids": ids.astype(jnp.int32), "top_logprobs": top}
