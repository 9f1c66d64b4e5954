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


def screen_depth(scr: dict, n_layers: int, title: str):
  """One panel per behavior: d score / d alpha of its own vector by depth (line) inside the 2.5-97.5% band of the
  controls' slopes (shaded); layers with q < 0.05 marked. Returns the Figure."""
  rows = scr["behaviors"]
  fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 2.8), constrained_layout=True, squeeze=False)
  depth = 100 * np.arange(n_layers) / n_layers
  for ax, (b, r) in zip(axes[0], rows.items()):
    ax.fill_between(depth, r["band_lo"], r["band_hi"], color="0.8", label="controls 2.5-97.5%")
    ax.plot(depth, r["slope"], "o-", ms=3, color="C3", label="own vector")
    sig = np.asarray(r["q"]) < 0.05
    ax.plot(depth[sig], np.asarray(r["slope"])[sig], "k*", ms=8, label="q < 0.05")
    ax.axhline(0, color="k", lw=0.6)
    ax.set(title=b, xlabel="depth (% of layers)")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("d score / d alpha")
  axes[0, 0].legend(frameon=False, fontsize=7)
  fig.suptitle(title, fontsize=10)
  return fig


def cross_matrix(mat: dict, n_layers: int, title: str):
  """One panel per source vector: target behavior x depth heatmap of the first-order z against the target's
  controls (RdBu, centred at 0); cells with q < 0.05 dotted. Returns the Figure."""
  z = np.asarray(mat["z"], np.float64)
  vmax = _vlim(np.nan_to_num(z))
  norm = mcolors.TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
  fig, axes = plt.subplots(len(mat["sources"]), 1, figsize=(max(6, 0.25 * n_layers + 2.5),
                                                            1.0 + 1.3 * len(mat["sources"])),
                           constrained_layout=True, squeeze=False)
  for i, s in enumerate(mat["sources"]):
    ax = axes[i, 0]
    im = ax.imshow(z[i], cmap="RdBu", norm=norm, aspect="auto")
    ti, li = np.nonzero(np.asarray(mat["q"][i]) < 0.05)
    ax.plot(li, ti, "k.", ms=3)
    ax.set_yticks(range(len(mat["targets"])), mat["targets"], fontsize=7)
    ax.set_title(f"{s} vector", fontsize=9, loc="left")
  axes[-1, 0].set_xlabel("layer")
  fig.colorbar(im, ax=axes[:, 0], shrink=0.6, label="z vs controls")
  fig.suptitle(title, fontsize=10)
  return fig


def exact_cells(cells: Sequence[dict], title: str):
  """Forest plot of the exact cells: the own vector's delta with its 95% CI beside each control kind's mean +/- 2
  sd; killed cells in bold red. Returns the Figure."""
  kinds = sorted({k[len("ctrl_mean_"):] for c in cells for k in c if k.startswith("ctrl_mean_")})
  fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(cells)), constrained_layout=True)
  for y, c in enumerate(cells):
    for off, k in zip(np.linspace(-0.25, 0.25, max(len(kinds), 1)), kinds):
      ax.errorbar(c[f"ctrl_mean_{k}"], y + off, xerr=2 * c[f"ctrl_sd_{k}"], fmt="|", color=f"C{kinds.index(k)}",
                  alpha=0.6, label=f"{k} controls (mean +/- 2 sd)" if y == 0 else None)
    ax.errorbar(c["delta"], y, xerr=[[c["delta"] - c["ci_low"]], [c["ci_high"] - c["delta"]]], fmt="o",
                color="C3" if c["killed"] else "k", ms=4, label="own vector (95% CI)" if y == 0 else None)
  ax.axvline(0, color="k", lw=0.6)
  ax.set_yticks(range(len(cells)), [f"{c['behavior']} L{c['layer']} a{c['alpha']:+g}" for c in cells], fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("delta of the mean per-probe score (steered - unsteered)")
  ax.legend(frameon=False, fontsize=7, loc="best")
  ax.set_title(title, fontsize=10)
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


def layer_map(m: dict):
  """The layer map's heatmap (probes.layer_map): behavior x decoder layer, colour = the screen's z against
  covariance-shaped controls (signed; the colour scale spans +/- max |z|, at least 3, at most 6), q < q_level
  windows outlined, exact cells marked (x, or a filled square for a kill zone); with a "logit_lens" entry, a second
  panel: the share of harmful / benign prompts whose own first response token is already top-1 at resid_post of
  each layer (probes.lens), the refusal windows shaded. Returns the Figure."""
  bs = list(m["behaviors"])
  L = m["model"]["n_layers"]
  lens = m.get("logit_lens")
  z = np.nan_to_num(np.array([m["behaviors"][b]["layers"]["z"] for b in bs], np.float64), nan=0.0)   # null: 0
  fig, axes = plt.subplots(2 if lens else 1, 1, figsize=(max(6.0, 0.28 * L + 2), 0.55 * len(bs) + 1.6
                                                          + (2.4 if lens else 0)), constrained_layout=True,
                           squeeze=False, height_ratios=[0.55 * len(bs) + 1, 2.2] if lens else None)
  ax = axes[0, 0]
  v = float(np.clip(np.abs(z).max(initial=0.0), 3.0, 6.0))
  im = ax.imshow(np.clip(z, -v, v), cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto", interpolation="nearest")
  for i, b in enumerate(bs):
    for w in m["behaviors"][b]["windows"]:
      ax.add_patch(plt.Rectangle((w["start"] - 0.5, i - 0.45), w["end"] - w["start"] + 1, 0.9, fill=False,
                                 lw=1.6, ec="k"))
    for c in m["behaviors"][b]["exact_cells"]:
      ax.plot(c["layer"], i, "ks" if c.get("killed") else "kx", ms=5)
  ax.set(yticks=range(len(bs)), yticklabels=bs, xlabel="decoder layer", xlim=(-0.5, L - 0.5),
         title=f"{m['model']['name']}: layer map (boxes: q < {m['test']['q_level']}; x: exact cells)")
  ax.set_xticks(range(0, L, max(1, L // 15)))
  fig.colorbar(im, ax=ax, label="z vs covariance-shaped controls")
  if lens:
    _lens_panel(axes[1, 0], lens, m["behaviors"].get("refusal", {}).get("windows", []), L)
  return fig


def _lens_panel(ax, lens: dict, windows, L: int) -> None:
  """Logit-lens top-1 share by decoder layer (boundary l + 1 = resid_post[l]) for harmful and benign prompts."""
  for w in windows:
    ax.axvspan(w["start"] - 0.5, w["end"] + 0.5, color="C3", alpha=0.12, lw=0)
  for k, c in (("harmful", "C3"), ("benign", "C0")):
    ax.plot(np.arange(L), lens[k]["top1_share"][1:], "o-", ms=3, color=c, label=f"{k} (n = {lens[k]['n']})")
  ax.axhline(0.5, color="0.4", lw=0.6, ls="--")
  ax.set(xlim=(-0.5, L - 0.5), ylim=(-0.03, 1.03), xlabel="decoder layer (resid_post)",
         ylabel="own first token top-1")
  ax.set_xticks(range(0, L, max(1, L // 15)))
  ax.legend(frameon=False, fontsize=7, title="logit lens (shaded: refusal window)", title_fontsize=7)
  ax.grid(alpha=0.3)
