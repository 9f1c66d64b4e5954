"""Control directions for steering: nulls of the same kind as a behavior vector, each rescaled to its norm.

A CAA vector (Rimsky et al. 2024) lives in the high-variance subspace of the residual stream, where an isotropic
direction of the same norm mostly does not; an isotropic control is therefore an easy null. Three kinds, per
layer, all rescaled to the behavior vector's norm at that layer (`norms` `[L]`):

- "isotropic": v ~ N(0, I_D), the classic random-direction control;
- "covariance": v ~ N(0, Sigma_l), Sigma_l the covariance of the residual stream's activations at that layer
  (drawn as X_c^T z / sqrt(N - 1) with z ~ N(0, I_N) and X_c the centered activations, which has covariance
  exactly Sigma_hat without forming the D x D matrix);
- "shuffled": the CAA vector of randomly relabelled contrast pairs, mean_i s_i (pos_i - neg_i) with s_i = +-1
  (a permutation null of CAA's labels: the difference vector a random labelling of the same pairs gives).

Shapes: activations `[L, N, D]` (N texts or pairs), directions `[L, M, D]` float32. Deterministic in `key`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("isotropic", "covariance", "shuffled")


def rescale(directions: jax.Array, norms: jax.Array) -> jax.Array:
  """`[L, M, D]` directions rescaled so each has the L2 norm `norms[l]` `[L]` of its layer (a zero direction
  stays zero)."""
  n = jnp.linalg.norm(directions, axis=-1, keepdims=True)
  return directions / jnp.maximum(n, 1e-30) * norms[:, None, None]


def isotropic(key: jax.Array, norms: jax.Array, m: int, d: int) -> jax.Array:
  """`[L, m, d]` isotropic Gaussian directions with norm `norms[l]`."""
  return rescale(jax.random.normal(key, (norms.shape[0], m, d), jnp.float32), norms)


def covariance_shaped(key: jax.Array, acts: jax.Array, norms: jax.Array, m: int) -> jax.Array:
  """`[L, m, D]` draws from N(0, Sigma_l) of the activations `acts` `[L, N, D]` (N >= 2), rescaled to `norms`.

  Raises ValueError for fewer than two activation rows (no covariance).
  """
  L, N, _ = acts.shape
  if N < 2:
    raise ValueError(f"covariance-shaped controls need >= 2 activation rows per layer, got {N}")
  x = acts.astype(jnp.float32)
  xc = x - x.mean(1, keepdims=True)
  z = jax.random.normal(key, (L, m, N), jnp.float32)
  return rescale(jnp.einsum("lmn,lnd->lmd", z, xc) / jnp.sqrt(N - 1.0), norms)


def shuffled_caa(key: jax.Array, pos: jax.Array, neg: jax.Array, norms: jax.Array, m: int) -> jax.Array:
  """`[L, m, D]` CAA vectors of randomly relabelled pairs (pos, neg `[L, N, D]`): mean_i s_i (pos_i - neg_i),
  s_i uniform on {-1, +1} per pair and draw (the same signs at every layer), rescaled to `norms`."""
  diffs = (pos - neg).astype(jnp.float32)
  s = jax.random.rademacher(key, (m, diffs.shape[1]), jnp.float32)
  return rescale(jnp.einsum("mn,lnd->lmd", s, diffs) / diffs.shape[1], norms)


def controls(kind: str, key: jax.Array, norms: jax.Array, m: int, *, acts: jax.Array | None = None,
             pos: jax.Array | None = None, neg: jax.Array | None = None) -> jax.Array:
  """`[L, m, D]` controls of one kind (KINDS): "isotropic" needs only norms and D (from acts, pos or neg);
  "covariance" the activations `acts`; "shuffled" the contrast pairs pos / neg. Raises ValueError for an unknown
  kind or a missing input."""
  if kind not in KINDS:
    raise ValueError(f"control kind must be one of {KINDS}, got {kind!r}")
  if kind == "covariance":
    if acts is None:
      raise ValueError("covariance-shaped controls need the activations (acts [L, N, D])")
    return covariance_shaped(key, acts, norms, m)
  if kind == "shuffled":
    if pos is None or neg is None:
      raise ValueError("shuffled-label controls need the contrast pairs' activations (pos, neg [L, N, D])")
    return shuffled_caa(key, pos, neg, norms, m)
  ref = next((a for a in (acts, pos, neg) if a is not None), None)
  if ref is None:
    raise ValueError("isotropic controls need some activations to read d_model from")
  return isotropic(key, norms, m, ref.shape[-1])
