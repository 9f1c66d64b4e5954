"""Per-layer statistics of the residual stream, computed in JAX over the captured `[L+1, B, S, D]` tensor."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def residual_stats(resid: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Depth profile of the residual stream over real (mask = 1) tokens.

  Args:
    resid: `[L+1, B, S, D]` residual stream at every layer boundary (models.transformer capture "resid").
    mask: `[B, S]` 0/1 attention mask.

  Returns (float32; boundary axis first):
    norm_mean `[L+1]`: mean L2 norm of the residual vector per token.
    norm_last `[L+1]`: mean L2 norm at each row's last position (the prompt's final token; rows are left-padded).
    update_ratio `[L]`: mean ||h_{l+1} - h_l|| / ||h_l||, how much layer l writes relative to what it reads.
    cos_next `[L]`: mean cosine between h_l and h_{l+1} per token.
    max_abs `[L+1]`: largest |activation| over tokens and dimensions ("massive activations").
    max_dim `[L+1]` (int32): the dimension holding max_abs.
  """
  r = resid.astype(jnp.float32)
  m = mask.astype(jnp.float32)[None]                                     # [1, B, S]
  n_tok = jnp.sum(m)
  norms = jnp.linalg.norm(r, axis=-1)                                    # [L+1, B, S]
  norm_mean = jnp.sum(norms * m, axis=(1, 2)) / n_tok
  norm_last = jnp.mean(norms[:, :, -1], axis=1)
  diff = jnp.linalg.norm(r[1:] - r[:-1], axis=-1)
  update_ratio = jnp.sum(diff / jnp.maximum(norms[:-1], 1e-12) * m, axis=(1, 2)) / n_tok
  cos = jnp.sum(r[1:] * r[:-1], axis=-1) / jnp.maximum(norms[1:] * norms[:-1], 1e-12)
  cos_next = jnp.sum(cos * m, axis=(1, 2)) / n_tok
  absr = jnp.abs(r) * m[..., None]
  flat = absr.reshape(r.shape[0], -1, r.shape[-1])
  per_dim = jnp.max(flat, axis=1)                                        # [L+1, D]
  return {"norm_mean": norm_mean, "norm_last": norm_last, "update_ratio": update_ratio, "cos_next": cos_next,
          "max_abs": jnp.max(per_dim, axis=-1), "max_dim": jnp.argmax(per_dim, axis=-1).astype(jnp.int32)}


@jax.jit
def mean_difference_separation(pos: jax.Array, neg: jax.Array) -> dict[str, jax.Array]:
  """How well the difference of class means separates two sets of activations, at every layer.

  Args:
    pos: `[L+1, N_pos, D]`, neg: `[L+1, N_neg, D]` activations (e.g. last-token residuals of harmful and
      benign prompts).

  Returns:
    diff_norm `[L+1]`: ||mean(pos) - mean(neg)||.
    d_prime `[L+1]`: separation of the two sets' projections on the unit mean-difference direction,
      (mu_pos - mu_neg) / sqrt((var_pos + var_neg) / 2) (in-sample, so optimistic for small N).
  """
  pos, neg = pos.astype(jnp.float32), neg.astype(jnp.float32)
  d = jnp.mean(pos, axis=1) - jnp.mean(neg, axis=1)                      # [L+1, D]
  dn = jnp.linalg.norm(d, axis=-1)
  u = d / jnp.maximum(dn, 1e-12)[:, None]
  pp, pn = jnp.einsum("lnd,ld->ln", pos, u), jnp.einsum("lnd,ld->ln", neg, u)
  pooled = jnp.sqrt((jnp.var(pp, axis=1) + jnp.var(pn, axis=1)) / 2)
  return {"diff_norm": dn, "d_prime": (jnp.mean(pp, 1) - jnp.mean(pn, 1)) / jnp.maximum(pooled, 1e-12)}
