"""Baselines that can fail, for the IOI study's cross-phase claims (issue 19).

- Localisation of a change in the exact importance map `[L, H]` (drop in logit difference, nats, when a head's
  END output is patched from the ABC run): the share of sum |delta| carried by its own top-k heads (heavy-tailed
  maps give a large share to ANY change, so it is read beside the same share for seed-noise changes: base ->
  clean in every seed and clean -> clean of another seed) and the share carried by a fixed head set (the clean
  model's circuit) with a permutation test over heads (scipy.stats.permutation_test: are the circuit's |delta|
  larger than the other heads'?).
- CMAP at the circuit against CMAP at size-matched random head sets (>= 100): the empirical distribution of the
  patched logit difference and the circuit's rank in it, so "patching the circuit restores the behaviour" is
  compared with what patching any k heads does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from analysis.ioi import circuits as C
from models.config import ModelConfig
from models.transformer import Interventions, forward


def map_corr(a, b) -> float:
  """Pearson correlation of two maps (e.g. importance `[L, H]`), flattened; NaN when either is constant."""
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def top_k_share(before: np.ndarray, after: np.ndarray, k: int) -> float:
  """Share of sum |after - before| carried by the k heads with the largest |change| (1 = fully localised;
  k / (L * H) for a uniform change); NaN when nothing changed. before / after: `[L, H]` importance maps."""
  delta = np.abs(np.asarray(after, np.float64) - np.asarray(before, np.float64)).ravel()
  total = delta.sum()
  return float(np.sort(delta)[::-1][:k].sum() / total) if total > 0 else float("nan")


def circuit_share_test(before: np.ndarray, after: np.ndarray, heads: np.ndarray, n_resamples: int = 9999,
                       seed: int = 0) -> dict:
  """Share of sum |after - before| carried by `heads` (`[L, H]` 0/1) and a one-sided permutation test over
  heads (scipy.stats.permutation_test, independent samples, statistic = mean |delta| in the set minus outside):
  p small = the change sits in these heads more than in heads drawn at random.

  Returns {"share", "p", "n_heads" (in the set), "uniform" (the share if the change were spread evenly)}; share
  and p are NaN when nothing changed or the set is empty / everything.
  Raises ValueError when `heads` does not match the maps' shape.
  """
  delta = np.abs(np.asarray(after, np.float64) - np.asarray(before, np.float64))
  sel = np.asarray(heads) > 0
  if sel.shape != delta.shape:
    raise ValueError(f"heads {sel.shape} must match the importance maps {delta.shape}")
  n, total = int(sel.sum()), delta.sum()
  out = {"n_heads": n, "uniform": n / delta.size, "share": float("nan"), "p": float("nan")}
  if total <= 0 or n in (0, delta.size):
    return out
  res = stats.permutation_test((delta[sel], delta[~sel]), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                               permutation_type="independent", alternative="greater", vectorized=True,
                               n_resamples=n_resamples, random_state=np.random.default_rng(seed))
  return {**out, "share": float(delta[sel].sum() / total), "p": float(res.pvalue)}


def random_head_sets(n_layers: int, n_heads: int, k: int, n_sets: int, seed: int = 0) -> np.ndarray:
  """`n_sets` random sets of k distinct heads as `[n_sets, L, H]` float32 0/1 masks (seeded)."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n_sets, n_layers * n_heads), np.float32)
  for i in range(n_sets):
    out[i, rng.choice(n_layers * n_heads, k, replace=False)] = 1
  return out.reshape(n_sets, n_layers, n_heads)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def cmap_head_sets(params_a, params_b, cfg: ModelConfig, tokens, mask, head_sets, io, s, pos_mask=None,
                   chunk: int = 4) -> jax.Array:
  """CMAP (analysis.ioi.circuits.cross_model_patch) for many head sets in one program: model B's z substituted
  into model A at each set `head_sets` `[R, L, H]` (0/1) and `pos_mask` `[N, S]` positions (default all).
  Model B runs once. Returns `[R, N]` logit differences of the patched model A."""
  z_b = C.head_outputs(params_b, cfg, tokens, mask)
  pm = 1.0 if pos_mask is None else pos_mask.astype(jnp.float32)[None, :, :, None]

  def one(hs):
    out, _ = forward(params_a, tokens, cfg, attention_mask=mask, logits="last",
                     interventions=Interventions(head_mask=hs.astype(jnp.float32)[:, None, None, :] * pm,
                                                 head_value=z_b))
    return C.logit_diff(out, io, s)

  return jax.lax.map(one, head_sets, batch_size=chunk)


def rank_p(observed: float, null: np.ndarray) -> float:
  """One-sided empirical p-value of `observed` against a null sample (larger = more extreme):
  (1 + #{null >= observed}) / (1 + n) (Phipson & Smyth 2010; never 0)."""
  null = np.asarray(null, np.float64)
  return float((1 + np.sum(null >= observed)) / (1 + null.size))


def cmap_figure(plt, results: dict, top_k: int):
  """Histogram of CMAP's logit difference at random head sets (seeds pooled), the base circuit's per seed."""
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
  for ax, p in zip(axes, ("poison", "retrain")):
    ax.hist(np.concatenate([np.ravel(r[f"cmap_random_{p}"]) for r in results.values()]), bins=30, color="0.6",
            label=f"random {top_k}-head sets")
    for i, r in enumerate(results.values()):
      ax.axvline(r[f"cmap_circuit_{p}"], color=f"C{i}", lw=1.5, label="base circuit" if i == 0 else None)
      ax.axvline(r["base"]["logit_diff"], color=f"C{i}", ls=":", lw=1, label="base model" if i == 0 else None)
    ax.set(title=f"CMAP base -> {p} (END)", xlabel="patched logit diff", ylabel="head sets" if p == "poison" else None)
  axes[0].legend(frameon=False, fontsize=7)
  return fig


def localisation_reading(c, cross_seed: dict) -> list[str]:
  """The report's plain sentences: is the poisoning change more localised than the seed-noise changes, and does
  the permutation test separate them? c: the report's cells (analysis.ioi.report._Cells: summary `s` of
  (mean, sd, lo, hi), per-seed `results`, formatter `pm`); cross_seed: study.cross_seed_localisation."""
  poison, ref = c.s["localisation_poison"], c.s["localisation_base_clean"]
  noise = [x for x in cross_seed["top_k_share"] if x == x]
  if poison[0] != poison[0] or ref[0] != ref[0]:
    return ["Localisation: undefined (a change was zero)."]
  above = poison[2] > ref[3] and (not noise or poison[2] > max(noise))
  ps = [r[k] for r in c.results.values() for k in ("circuit_share_base_clean_p", "circuit_share_poison_p")]
  ps += [x for x in cross_seed["circuit_share_p"]]
  out = [f"Reading: the poisoning change's top-k share, {c.pm('localisation_poison')}, "
         + ("lies above" if above else "does NOT lie above")
         + f" the seed-noise references (base -> clean {c.pm('localisation_base_clean')}"
         + (f"; clean -> clean of another seed up to {max(noise):.3f}" if noise else "") + "), so "
         + ("the poisoning change is more localised than seed noise." if above else
            "there is no evidence that poisoning is more localised than any fine-tuning change.")]
  if ps and max(ps) <= 0.05:
    out[0] += (" The permutation test rejects for every change, the seed-noise ones included: it shows that changes "
               "concentrate in the heads that matter, not that poisoning is special.")
  return out
