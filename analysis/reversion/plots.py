"""Figures of the reversion study (matplotlib, Agg): alignment heatmaps at the measured steps, alignment /
harmfulness curves with the isotropic null band and the covariance-shaped null, and the per-layer profile of v_rev
and the final alignment."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.stats import t_interval  # noqa: E402

ARM_COLORS = {"baseline": "C0", "block": "C2", "push": "C3", "project": "C4", "control": "C7"}
SPARE_COLORS = ("C1", "C5", "C6", "C8", "C9", "k")


def arm_colors(arms) -> dict[str, str]:
  """Matplotlib colour per arm name: the fixed ARM_COLORS for the named arms, and for any other arm (the lambda
  sweep's `block_lam0.3`, ...) the next of SPARE_COLORS in the order given, so no two arms of one figure share a
  colour (up to len(SPARE_COLORS) extra arms; past that the spares repeat)."""
  extra = [a for a in arms if a not in ARM_COLORS]
  return {a: ARM_COLORS.get(a) or SPARE_COLORS[extra.index(a) % len(SPARE_COLORS)] for a in arms}


def alignment_heatmaps(align: dict[str, np.ndarray], title: str):
  """One panel per arm: seed-mean alignment a_t(l), `align[arm]` `[seeds, T, L]` (decoder-layer outputs 1..L)
  -> image [step, layer], RdBu_r on [-1, 1]. Returns the Figure."""
  arms = list(align)
  fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms) + 0.8, 3.4), squeeze=False,
                           constrained_layout=True)
  im = None
  for ax, arm in zip(axes[0], arms):
    a = np.asarray(align[arm]).mean(axis=0)                                # [T, L]
    steps = np.flatnonzero(np.isfinite(a).all(axis=1))                     # the measured steps (0-based)
    a, L = a[steps], a.shape[1]
    im = ax.imshow(a, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1,
                   extent=(0.5, L + 0.5, -0.5, len(steps) - 0.5), interpolation="nearest")
    ax.set_yticks(np.arange(len(steps)), [str(t + 1) for t in steps])
    ax.set(title=arm, xlabel="layer", ylabel="after benign step" if ax is axes[0, 0] else None)
  fig.colorbar(im, ax=axes[0, -1], label="cos(drift, v_rev)")
  fig.suptitle(title)
  return fig


def _mean_ci(a) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per column of `[seeds, n]`: mean, 95% t interval low and high (analysis.stats.t_interval; NaN with 1 seed)."""
  t = [t_interval(col) for col in np.asarray(a, np.float64).T]
  return tuple(np.array([r[k] for r in t]) for k in ("mean", "ci_low", "ci_high"))


def _yerr(m, lo, hi):
  """matplotlib's asymmetric yerr from an interval, None (no bars) when it is undefined."""
  return np.stack([m - lo, hi - m]) if np.isfinite(lo).all() else None


def curves(steps_all: np.ndarray, align_all: dict[str, np.ndarray], null_p99: float, eval_steps: np.ndarray,
           harm: dict[str, np.ndarray], harm_label: str, title: str, margin: dict[str, np.ndarray] | None = None,
           cov_p99: float | None = None):
  """Left: all-layer alignment on set B at the measured steps (mean and 95% t interval over seeds, ddof = 1; NaN =
  unmeasured) per arm, with the isotropic null's +/- p99 band and the covariance-shaped null's p99 (dashed,
  `cov_p99`). Middle: harmfulness at the evaluation steps per arm (mean, 95% t interval). Right (when `margin` is
  given): the compliance margin (nats / token) at the evaluation steps. align_all[arm] `[seeds, T]`, harm[arm] and
  margin[arm] `[seeds, E]` (harm as fractions). Returns the Figure."""
  fig, ax = plt.subplots(1, 3 if margin else 2, figsize=(15 if margin else 10, 3.6), constrained_layout=True)
  colors = arm_colors(list(align_all) + [a for a in (margin or {}) if a not in align_all])
  for arm, a in (margin or {}).items():
    m, lo, hi = _mean_ci(a)
    ax[2].errorbar(eval_steps, m, yerr=_yerr(m, lo, hi), color=colors[arm], marker="o", ms=4, capsize=3,
                   label=arm)
  if margin:
    ax[2].axhline(0, color="0.3", lw=0.6)
    ax[2].set(xlabel="benign fine-tuning step", ylabel="NLL(refusal) - NLL(compliant), nats / token",
              title="compliance margin (log-prob)")
    ax[2].legend(frameon=False, fontsize=8)
  for arm, a in align_all.items():
    a = np.asarray(a)
    k = np.isfinite(a).all(axis=0)
    m, lo, hi = _mean_ci(a[:, k])
    c = colors[arm]
    ax[0].plot(np.asarray(steps_all)[k], m, color=c, lw=1.6, marker="o", ms=3, label=arm)
    if np.isfinite(lo).all():
      ax[0].fill_between(np.asarray(steps_all)[k], lo, hi, color=c, alpha=0.2, lw=0)
    m, lo, hi = _mean_ci(100 * np.asarray(harm[arm]))
    ax[1].errorbar(eval_steps, m, yerr=_yerr(m, lo, hi), color=c, marker="o", ms=4, capsize=3, label=arm)
  ax[0].axhspan(-null_p99, null_p99, color="0.6", alpha=0.35, lw=0, label="isotropic null (±p99)")
  if cov_p99 is not None:
    ax[0].axhline(cov_p99, color="0.2", ls="--", lw=1, label="covariance-shaped null p99")
  ax[0].axhline(0, color="0.3", lw=0.6)
  ax[0].set(xlabel="benign fine-tuning step", ylabel="cos(drift on B, v_rev), layers 1..L", ylim=(-1, 1),
            title="alignment with the reversion direction (set B)")
  ax[0].legend(frameon=False, fontsize=8)
  ax[1].set(xlabel="benign fine-tuning step", ylabel=f"harmfulness (%)  [{harm_label}]", ylim=(-3, 103),
            title="set C harmful prompts not refused")
  ax[1].legend(frameon=False, fontsize=8)
  for a in ax:
    a.grid(alpha=0.3)
  fig.suptitle(title)
  return fig


def layer_profile(v_rev_norm: np.ndarray, final_align: dict[str, np.ndarray], null_layer_p99: float, title: str,
                  cov_layer_p99: np.ndarray | None = None):
  """Left: ||v_rev(l)|| per decoder layer. Right: final-step alignment per layer (seed mean) per arm with the
  per-layer isotropic null p99 band and the covariance-shaped null's p99 per layer (dashed; `cov_layer_p99` `[L]`,
  NaN where v_rev(l) = 0). v_rev_norm `[L+1]` (boundary 0 = embeddings), final_align[arm] `[seeds, L]`.
  Returns the Figure."""
  L = len(v_rev_norm) - 1
  x = np.arange(1, L + 1)
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), constrained_layout=True)
  ax[0].plot(x, v_rev_norm[1:], "o-", ms=3, color="0.2")
  ax[0].set(xlabel="layer", ylabel="||v_rev|| (L2)", title="reversion direction: size by depth")
  colors = arm_colors(list(final_align))
  for arm, a in final_align.items():
    ax[1].plot(x, np.asarray(a).mean(0), "o-", ms=3, color=colors[arm], label=arm)
  ax[1].axhspan(-null_layer_p99, null_layer_p99, color="0.6", alpha=0.35, lw=0, label="isotropic null ±p99")
  if cov_layer_p99 is not None:
    ax[1].plot(x, cov_layer_p99, ls="--", color="0.2", lw=1, label="covariance-shaped null p99")
  ax[1].set(xlabel="layer", ylabel="cos(d_T, v_rev)", ylim=(-1, 1), title="final alignment by depth")
  ax[1].legend(frameon=False, fontsize=8)
  for a in ax:
    a.grid(alpha=0.3)
  fig.suptitle(title)
  return fig
