"""Figures of the steering and probe sweeps (matplotlib, Agg backend)."""
from __future__ import annotations

from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402


def _vlim(x: np.ndarray) -> float:
  v = float(np.nanmax(np.abs(x))) if np.size(x) else 1.0
  return v if v > 0 else 1.0


def behavior_depth_heatmap(an: dict, behaviors: Sequence[str], alphas: Sequence[float], title: str):
  """One panel per alpha: delta (steered - baseline) as behavior x depth, RdYlGn centred at 0.

  Cells outside the random-direction control band get a dot, kill-zone cells a black frame. Returns the Figure.
  """
  delta, depth = an["delta"], an["depth_pct"]
  vmax = _vlim(delta)
  norm = mcolors.TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
  fig, axes = plt.subplots(len(alphas), 1, figsize=(max(6, 0.42 * len(depth) + 2.5), 1.0 + 1.35 * len(alphas)),
                           constrained_layout=True, squeeze=False)
  for a, alpha in enumerate(alphas):
    ax = axes[a, 0]
    im = ax.imshow(delta[:, :, a], cmap="RdYlGn", norm=norm, aspect="auto")
    for t in range(len(behaviors)):
      for i in range(len(depth)):
        if an["killed"][t, i, a]:
          ax.add_patch(plt.Rectangle((i - 0.5, t - 0.5), 1, 1, fill=False, lw=1.6, ec="black"))
        elif an["outside"][t, i, a]:
          ax.plot(i, t, "k.", ms=4)
    ax.set_yticks(range(len(behaviors)), behaviors)
    ax.set_xticks(range(len(depth)), [f"{d:.0f}" for d in depth], fontsize=7)
    ax.set_title(f"alpha = {alpha:+g}", fontsize=9, loc="left")
    if a == len(alphas) - 1:
      ax.set_xlabel("steered layer depth (% of layers)")
  fig.colorbar(im, ax=axes[:, 0], label="score change vs baseline", shrink=0.8)
  fig.suptitle(title + "\n(dot: outside the random-direction control band; frame: kill zone)", fontsize=10)
  return fig


def alpha_depth_heatmaps(an: dict, behaviors: Sequence[str], alphas: Sequence[float], title: str):
  """One panel per behavior: delta as alpha x depth (RdYlGn), with the z-score against the control annotated."""
  delta, depth, z = an["delta"], an["depth_pct"], an["z"]
  fig, axes = plt.subplots(len(behaviors), 1, figsize=(max(6, 0.42 * len(depth) + 2.5), 1.2 + 1.1 * len(alphas)
                                                         * len(behaviors) / 2), constrained_layout=True,
                           squeeze=False)
  for t, b in enumerate(behaviors):
    ax = axes[t, 0]
    vmax = _vlim(delta[t])
    im = ax.imshow(delta[t].T, cmap="RdYlGn", norm=mcolors.TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax),
                   aspect="auto")
    for i in range(len(depth)):
      for a in range(len(alphas)):
        if an["outside"][t, i, a]:
          ax.text(i, a, f"{z[t, i, a]:.0f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(alphas)), [f"{x:+g}" for x in alphas])
    ax.set_ylabel("alpha")
    ax.set_xticks(range(len(depth)), [f"{d:.0f}" for d in depth], fontsize=7)
    ax.set_title(b, fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, label="delta", shrink=0.9)
  axes[-1, 0].set_xlabel("steered layer depth (% of layers)")
  fig.suptitle(title + "\n(numbers: z vs random directions, shown outside the control band)", fontsize=10)
  return fig


def delta_with_band(an: dict, behaviors: Sequence[str], alphas: Sequence[float], title: str):
  """One panel per behavior: delta vs depth for each alpha, with the control band shaded in the same colour."""
  depth = an["depth_pct"]
  fig, axes = plt.subplots(1, len(behaviors), figsize=(3.2 * len(behaviors), 3.2), constrained_layout=True,
                           squeeze=False, sharey=False)
  cmap = plt.get_cmap("coolwarm")
  for t, b in enumerate(behaviors):
    ax = axes[0, t]
    for a, alpha in enumerate(alphas):
      col = cmap(a / max(1, len(alphas) - 1))
      ax.fill_between(depth, an["band_lo"][t, :, a], an["band_hi"][t, :, a], color=col, alpha=0.15, lw=0)
      ax.plot(depth, an["delta"][t, :, a], "o-", ms=3, color=col, label=f"{alpha:+g}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set(title=b, xlabel="steered layer depth (%)")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("score change vs baseline")
  axes[0, -1].legend(title="alpha", frameon=False, fontsize=7)
  fig.suptitle(title + " (shaded: random-direction control band)", fontsize=10)
  return fig


def probe_accuracy(results: dict, n_layers: int, title: str):
  """Held-out accuracy and AUC of the linear probes by depth (mean +/- sd over split seeds), one line per task."""
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
  for name, r in results.items():
    depth = 100 * np.arange(len(r["acc_mean"])) / n_layers
    ax[0].plot(depth, r["acc_mean"], "o-", ms=3, label=name)
    ax[0].fill_between(depth, r["acc_mean"] - r["acc_std"], r["acc_mean"] + r["acc_std"], alpha=0.2)
    ax[1].plot(depth, r["auc_mean"], "o-", ms=3, label=name)
  ax[0].set(ylabel="held-out accuracy", ylim=(0.3, 1.02))
  ax[1].set(ylabel="held-out ROC AUC", ylim=(0.3, 1.02))
  for a in ax:
    a.axhline(0.5, color="k", lw=0.6, ls="--")
    a.set_xlabel("residual boundary depth (% of layers; 0 = embeddings)")
    a.grid(alpha=0.3)
    a.legend(frameon=False, fontsize=8)
  fig.suptitle(title, fontsize=10)
  return fig
