"""Paper-style figures (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def depth_profile(stats: dict, sep: dict, n_layers: int, title: str):
  """Four panels against depth (% of layers): residual norms, per-layer update, massive activations and the
  harmful/benign separation. `stats` from analysis.residual_stats.residual_stats, `sep` from
  mean_difference_separation. Returns the Figure."""
  depth_b = 100 * np.arange(n_layers + 1) / n_layers
  depth_l = 100 * (np.arange(n_layers) + 1) / n_layers
  fig, ax = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
  ax[0, 0].plot(depth_b, stats["norm_mean"], "o-", ms=3, label="all tokens")
  ax[0, 0].plot(depth_b, stats["norm_last"], "s-", ms=3, label="last prompt token")
  ax[0, 0].set(ylabel="||h|| (L2)", title="residual norm", yscale="log")
  ax[0, 0].legend(frameon=False)
  ax[0, 1].plot(depth_l, stats["update_ratio"], "o-", ms=3, color="C2", label="||Δh|| / ||h||")
  ax[0, 1].plot(depth_l, 1 - stats["cos_next"], "s-", ms=3, color="C3", label="1 - cos(h_l, h_l+1)")
  ax[0, 1].set(title="how much each layer writes", yscale="log")
  ax[0, 1].legend(frameon=False)
  ax[1, 0].plot(depth_b, stats["max_abs"], "o-", ms=3, color="C4")
  ax[1, 0].set(ylabel="max |h_i|", title="largest activation", yscale="log")
  ax[1, 1].plot(depth_b, sep["d_prime"], "o-", ms=3, color="C1")
  ax[1, 1].set(ylabel="d'", title="harmful vs benign (last token, mean-difference axis)")
  for a in ax.flat:
    a.set_xlabel("depth (% of layers)")
    a.grid(alpha=0.3)
  fig.suptitle(title)
  return fig


def head_heatmaps(maps: dict, title: str, cmap: str = "RdBu_r"):
  """One `[layer, head]` heatmap per entry of `maps` (name -> `[L, H]` array), a shared symmetric color scale
  and colorbar. Returns the Figure."""
  names = list(maps)
  vmax = max(float(np.nanmax(np.abs(m))) for m in maps.values()) or 1.0
  L, H = np.asarray(maps[names[0]]).shape
  fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 0.25 * H * len(names), 0.18 * L + 1.6),
                           constrained_layout=True, squeeze=False)
  for ax, name in zip(axes[0], names):
    im = ax.imshow(np.asarray(maps[name]), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
    ax.set(title=name, xlabel="head", ylabel="layer" if ax is axes[0, 0] else None)
  fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="Δ logit diff")
  fig.suptitle(title)
  return fig


def logit_lens_figure(logprobs, labels, title: str):
  """Logit lens against depth: one line per target (labels[k]) of the mean over prompts of its log-probability at
  each residual boundary (models.readout.logit_lens "logprobs" `[L+1, B, K]`), with the prompts' 25-75% band.
  Returns the Figure."""
  lp = np.asarray(logprobs)
  x = np.arange(lp.shape[0])
  fig, ax = plt.subplots(figsize=(6.0, 3.4), constrained_layout=True)
  for k, name in enumerate(labels):
    ax.plot(x, lp[:, :, k].mean(1), label=name)
    ax.fill_between(x, np.percentile(lp[:, :, k], 25, axis=1), np.percentile(lp[:, :, k], 75, axis=1), alpha=0.2)
  ax.set(xlabel="residual boundary (0 = embeddings, l = output of layer l)", ylabel="log p (final norm + LM head)",
         title=title)
  ax.legend(frameon=False)
  return fig


def monitor_figure(steps, alignment, iso_p99: float, cov_p99: float):
  """The reversion monitor (analysis.monitor): all-layer alignment with v_rev against the checkpoint step, with the
  isotropic and covariance-shaped nulls' p99 as horizontal lines. Returns the Figure."""
  fig, ax = plt.subplots(figsize=(6.0, 3.4), constrained_layout=True)
  ax.plot(steps, alignment, "o-", label="alignment with v_rev (set B)")
  ax.axhline(iso_p99, color="0.6", ls=":", label=f"isotropic p99 {iso_p99:.3f}")
  ax.axhline(cov_p99, color="C3", ls="--", label=f"covariance-shaped p99 {cov_p99:.3f}")
  ax.set(xlabel="checkpoint step", ylabel="cos(drift, v_rev)", title="Reversion monitor")
  ax.legend(frameon=False, fontsize=8)
  return fig
