"""Logistic-regression probes on the residual stream at every layer at once (vmap over layers x L2 strengths x seeds).

For each layer boundary, L2 strength and seed: features are standardized with the training split's mean / std,
then w, b minimise mean binary cross-entropy + l2 * ||w||^2 by full-batch Adam (optax) for a fixed number of
steps (the loss is convex; Alain & Bengio 2016 linear probes). Splits are by group (a contrast pair's two texts
stay together, so a probe cannot match a pair's members): train / validation / test. The L2 strength is chosen per
(layer, seed) on validation accuracy; accuracy, ROC AUC and ECE (10 bins, confidence = probability of the
predicted class; probes.stats) are reported on the held-out test split.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from probes import stats


def group_splits(groups: np.ndarray, seeds: Sequence[int], fractions=(0.6, 0.2, 0.2)) -> np.ndarray:
  """Split assignments `[n_seeds, N]` int8 (0 train, 1 validation, 2 test): each seed permutes the unique groups
  (numpy default_rng(seed)) and cuts them by `fractions`.

  Raises:
    ValueError: fewer than 3 groups, or fractions that leave a split empty.
  """
  groups = np.asarray(groups)
  uniq = np.unique(groups)
  G = len(uniq)
  n_tr = int(round(fractions[0] * G))
  n_va = int(round(fractions[1] * G))
  if G < 3 or n_tr < 1 or n_va < 1 or G - n_tr - n_va < 1:
    raise ValueError(f"cannot split {G} groups by {fractions} into non-empty train/validation/test")
  out = np.zeros((len(seeds), len(groups)), np.int8)
  for i, s in enumerate(seeds):
    perm = np.random.default_rng(int(s)).permutation(uniq)
    split = np.zeros(G, np.int8)
    split[n_tr:n_tr + n_va] = 1
    split[n_tr + n_va:] = 2
    lookup = dict(zip(perm.tolist(), split.tolist()))
    out[i] = [lookup[g] for g in groups.tolist()]
  return out


def _fit_one(x, y, split, l2, steps: int, lr: float):
  """One probe. x `[N, D]`, y `[N]` 0/1, split `[N]`, l2 scalar. Returns metrics dict of scalars."""
  tr = (split == 0).astype(jnp.float32)
  n_tr = jnp.maximum(tr.sum(), 1.0)
  mu = (tr[:, None] * x).sum(0) / n_tr
  sd = jnp.sqrt((tr[:, None] * (x - mu) ** 2).sum(0) / n_tr) + 1e-6
  xs = (x - mu) / sd
  yf = y.astype(jnp.float32)

  def loss_fn(p):
    z = xs @ p["w"] + p["b"]
    bce = optax.sigmoid_binary_cross_entropy(z, yf)
    return jnp.sum(bce * tr) / n_tr + l2 * jnp.sum(p["w"] ** 2)

  opt = optax.adam(lr)
  p0 = {"w": jnp.zeros(x.shape[1], jnp.float32), "b": jnp.zeros((), jnp.float32)}

  def step(carry, _):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, _), _ = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
  prob = jax.nn.sigmoid(xs @ p["w"] + p["b"])
  pred = (prob > 0.5).astype(jnp.int32)
  correct = (pred == y).astype(jnp.float32)
  conf = jnp.maximum(prob, 1.0 - prob)
  out = {}
  for name, k in (("train", 0), ("val", 1), ("test", 2)):
    m = split == k
    mf = m.astype(jnp.float32)
    out[f"{name}_acc"] = jnp.sum(correct * mf) / jnp.maximum(mf.sum(), 1.0)
  te = split == 2
  out["test_auc"] = stats.mann_whitney_auc(prob, y == 1, te)
  out["test_ece"] = stats.ece(conf, correct, 10, te)
  out["w_norm"] = jnp.linalg.norm(p["w"] / sd)
  return out


def probe_sweep(acts: np.ndarray, labels: np.ndarray, groups: np.ndarray, l2s: Sequence[float],
                seeds: Sequence[int], *, steps: int = 300, lr: float = 0.05,
                fractions=(0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
  """Train logistic-regression probes for every layer, L2 strength and seed in one jitted, vmapped program.

  Args:
    acts: `[L+1, N, D]` float activations (e.g. last-token residual stream at every boundary).
    labels: `[N]` 0/1. groups: `[N]` group ids (rows sharing a group land in the same split).
    l2s: R L2 strengths. seeds: S split seeds. steps, lr: Adam steps and learning rate.
  Returns:
    dict of numpy arrays: "grid" metrics `[L+1, R, S]` for each of train_acc, val_acc, test_acc, test_auc,
    test_ece, w_norm (as "grid/<name>"); "best_l2_index" `[L+1, S]` (argmax validation accuracy); and the
    selected probes' test metrics "acc", "auc", "ece" `[L+1, S]`, with their means over seeds "acc_mean",
    "auc_mean", "ece_mean", "acc_std" `[L+1]`.
  Raises:
    ValueError: shapes disagree or labels are not 0/1.
  """
  acts = jnp.asarray(acts, jnp.float32)
  labels = np.asarray(labels)
  if acts.ndim != 3 or acts.shape[1] != len(labels) or len(groups) != len(labels):
    raise ValueError(f"acts {acts.shape}, labels {labels.shape}, groups {np.shape(groups)} disagree")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError("labels must be 0/1")
  splits = jnp.asarray(group_splits(groups, seeds, fractions))
  y = jnp.asarray(labels, jnp.int32)
  l2a = jnp.asarray(l2s, jnp.float32)

  @jax.jit
  def run(acts, y, splits, l2a):
    f = lambda x, l2, sp: _fit_one(x, y, sp, l2, steps, lr)
    f = jax.vmap(f, in_axes=(None, None, 0))          # seeds
    f = jax.vmap(f, in_axes=(None, 0, None))          # l2 strengths
    f = jax.vmap(f, in_axes=(0, None, None))          # layers
    return f(acts, l2a, splits)

  grid = {k: np.asarray(v) for k, v in run(acts, y, splits, l2a).items()}     # [L+1, R, S]
  best = grid["val_acc"].argmax(1)                                             # [L+1, S]
  pick = lambda a: np.take_along_axis(a, best[:, None, :], axis=1)[:, 0]
  out = {f"grid/{k}": v for k, v in grid.items()}
  out["best_l2_index"] = best
  for k, name in (("test_acc", "acc"), ("test_auc", "auc"), ("test_ece", "ece")):
    out[name] = pick(grid[k])
    out[name + "_mean"] = out[name].mean(1)
  out["acc_std"] = out["acc"].std(1)
  return out
