"""The sweep's exact test at large alpha: each behavior's own CAA vector and controls of three kinds, steered at
the configured cells (layer x alpha), scored per probe, tested cell by cell (probes.killtest).

Per behavior b, layer l in `exact_layers` and alpha in `exact_alphas`, the directions are b's own CAA vector v_b(l)
(resid_post, from b's unscored contrast pairs) and, each rescaled to ||v_b(l)|| (probes.controls):
`controls.covariance` draws from N(0, Sigma_l) of b's contrast texts' activations, `controls.shuffled` CAA vectors
of b's pairs under random relabelling, `controls.isotropic` isotropic directions. One compiled program scores the
first `exact_probes` scored probes of every behavior under every (layer, alpha, direction), each behavior with its
own directions (probes.steering.steering_sweep, per_probe=True). probes.killtest then gives per cell the paired
bootstrap CI of the mean per-probe delta, a p-value against each control kind and Benjamini-Hochberg q-values across
layers x alphas x behaviors per kind. Kill zones are called on the covariance-shaped controls (the strongest null):
q < q_level, delta <= -kill_threshold and a dose-response (the drop holds at the next smaller alpha, or at alpha -> 0
through the first-order screen's slope where the grid has no smaller alpha).

Alpha is in units of ||v_b(l)|| (rho-eval's convention); `alpha_rel` restates it in units of the mean last-token
residual norm at that layer (alpha * ||v_b(l)|| / mean ||h_l||), since ||v_l|| grows with depth.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from probes import controls, killtest, steering
from probes import tasks as tasks_lib

KINDS = ("covariance", "shuffled", "isotropic")
PRIMARY = "covariance"


def exact_directions(key: jax.Array, vec: jax.Array, acts: jax.Array, pos: jax.Array, neg: jax.Array,
                     layers: Sequence[int], counts: dict[str, int]) -> tuple[jax.Array, dict[str, slice]]:
  """One behavior's directions at the exact layers: `[L', 1 + sum(counts), D]` float32, index 0 its own vector,
  then counts[kind] controls of each kind in KINDS order, all rescaled to ||v(l)||; and {kind: slice}.

  vec `[L, D]` (resid_post), acts `[L, 2N, D]` its contrast texts, pos / neg `[L, N, D]` the pairs' halves.
  """
  idx = jnp.asarray(layers)
  v = jnp.asarray(vec, jnp.float32)[idx]
  norms = jnp.linalg.norm(v, axis=-1)
  parts, slices, start = [v[:, None]], {}, 1
  for kind, k in zip(KINDS, jax.random.split(key, len(KINDS))):
    n = int(counts.get(kind, 0))
    if n:
      parts.append(controls.controls(kind, k, norms, n, acts=acts[idx], pos=pos[idx], neg=neg[idx]))
    slices[kind] = slice(start, start + n)
    start += n
  return jnp.concatenate(parts, axis=1), slices


def run_exact(model, config, vectors: dict[str, dict], probes: dict[str, list], slope0: dict[str, np.ndarray] | None,
              resid_norm: np.ndarray, timing: dict, mesh=None, cache=None) -> dict[str, Any]:
  """The exact test (module docstring); records timing["exact_layer_<l>_s"] (each layer's program; the first layer
  computed also pays the unsteered prefix pass and the compilation, which later layers reuse), timing["exact_s"]
  (those, plus building the directions and buckets and the statistics; on a resumed run the restored layers' times
  are those of the run that computed them), "exact_configs" and "exact_tokens_per_config".

  Args:
    model: probes.sweep.Model. config: SweepConfig (exact_layers, exact_alphas, exact_controls, exact_buckets,
      max_tokens, kill_threshold, q_level, n_boot, method, memory_gib).
    vectors: per behavior {"vec" `[L, D]`, "acts" `[L, 2N, D]`, "pos", "neg" `[L, N, D]`}.
    probes: per tested behavior, its exact probes (the first exact_probes scored ones). Each behavior's probes
      are scored in `exact_buckets` length buckets (probes.tasks.length_buckets), every bucket a task of the one
      program with its behavior's directions.
    slope0: per behavior the first-order screen's slope `[L]` (dose-response reference at the smallest alpha), or
      None. resid_norm: `[L]` mean last-token residual norm at resid_post[l]. mesh: optional (data, fsdp, tensor)
      mesh for the program (probes.steering.steering_sweep).
    cache: optional callable(k, name, fn) -> fn() or its saved result (train.checkpoint.cached_stage): the k-th
      exact layer's program result, so a stopped run resumes layer by layer. Every layer runs the same compiled
      program over its alphas x directions (the layer index is its argument) on one unsteered prefix pass.
  Returns:
    {"behaviors", "layers", "alphas", "n_probes" `[T]`, "controls_per_cell" {kind: K}, "primary": PRIMARY,
    "alpha_rel" `[T, L', A]`, "base" / "steered" (per-probe scores, per behavior `[N]` / `[L', A, N]`),
    "tests": {kind: probes.killtest.kill_zone_test's dict (CIs on the primary only)}, "kill_zones" (primary's)}.
  Raises:
    ValueError: an exact layer out of range.
  """
  t_pre = time.time()
  layers, alphas = [int(l) for l in config.exact_layers], [float(a) for a in config.exact_alphas]
  if any(not 0 <= l < model.cfg.n_layers for l in layers):
    raise ValueError(f"exact_layers {layers} out of range for {model.cfg.n_layers} layers")
  names = list(probes)
  dirs, slices, tasks, owner = _bucketed(model, config, vectors, probes, layers)
  n_cfg = len(layers) * len(alphas) * dirs.shape[2]
  cache = cache or (lambda k, name, fn: fn())
  t_pre = time.time() - t_pre
  prefix = {}                                         # the unsteered pass, run once for every layer computed
  with tqdm(total=n_cfg, desc="exact test", unit="config") as bar:
    def one_layer(i: int, l: int) -> dict:
      ts = time.time()
      r = steering.steering_sweep(model.params, model.cfg, tasks, dirs[i:i + 1], [l], alphas, method=config.method,
                                  memory_gib=config.memory_gib, progress=bar.update, per_probe=True, mesh=mesh,
                                  prefix=prefix.get("pass"), prefix_layers=layers)
      prefix["pass"] = r.pop("prefix")
      timing[f"exact_layer_{l}_s"] = time.time() - ts
      return r
    per_layer = []
    for i, l in enumerate(layers):
      per_layer.append(cache(i, f"exact layer {l}", functools.partial(one_layer, i, l)))
      bar.update(len(alphas) * dirs.shape[2] * (i + 1) - bar.n)          # a restored layer ran no program
  t_layers = sum(timing[f"exact_layer_{l}_s"] for l in layers)
  res = {"baseline": per_layer[0]["baseline"],
         "scores": [np.concatenate(x, axis=0) for x in zip(*(r["scores"] for r in per_layer))]}
  t_post = time.time()
  base, scores = _unbucket(res, owner, [len(probes[b]) for b in names])
  steered = [s[:, :, 0] for s in scores]
  s0 = None if slope0 is None else [np.asarray(slope0[b])[layers] for b in names]
  tests = {}
  for kind in KINDS:
    if slices[kind].stop == slices[kind].start:
      continue
    tests[kind] = killtest.kill_zone_test(base, steered, [s[:, :, slices[kind]] for s in scores], names, layers,
                                          alphas, threshold=config.kill_threshold, q_level=config.q_level,
                                          n_boot=config.n_boot if kind == PRIMARY else 0, seed=config.seed,
                                          slope0=s0)
  vnorm = np.stack([np.linalg.norm(np.asarray(vectors[b]["vec"])[layers], axis=-1) for b in names])   # [T, L']
  alpha_rel = np.asarray(alphas)[None, None, :] * (vnorm / np.asarray(resid_norm)[layers])[..., None]
  timing["exact_s"] = t_pre + t_layers + time.time() - t_post
  timing["exact_configs"] = n_cfg
  timing["exact_tokens_per_config"] = sum(t.n_tokens for t in tasks)
  primary = tests.get(PRIMARY)
  return {"behaviors": names, "layers": layers, "alphas": alphas, "n_probes": [len(probes[b]) for b in names],
          "controls_per_cell": {k: slices[k].stop - slices[k].start for k in KINDS}, "primary": PRIMARY,
          "alpha_rel": alpha_rel, "vector_norm": vnorm, "base": base, "steered": steered, "tests": tests,
          "kill_zones": primary["kill_zones"] if primary else []}


def _bucketed(model, config, vectors: dict[str, dict], probes: dict[str, list], layers: list[int]):
  """Each behavior's directions (exact_directions) and its probes' length buckets as tasks: (directions
  `[L', tasks, M, D]`, {kind: slice}, tasks, owner: per task (behavior index, its probe indices))."""
  key = jax.random.PRNGKey(config.seed + 29)
  dirs, slices, tasks, owner = [], {}, [], []
  for t, (b, k) in enumerate(zip(probes, jax.random.split(key, len(probes)))):
    v = vectors[b]
    d, slices = exact_directions(k, v["vec"], v["acts"], v["pos"], v["neg"], layers, dict(config.exact_controls))
    for idx, task in tasks_lib.length_buckets(b, model.tok, probes[b], config.max_tokens[b], config.exact_buckets):
      dirs.append(d)
      tasks.append(task)
      owner.append((t, idx))
  return jnp.stack(dirs, axis=1), slices, tasks, owner


def _unbucket(res: dict, owner: list[tuple[int, np.ndarray]], sizes: list[int]) -> tuple[list, list]:
  """Per behavior base `[N]` and scores `[L', A, M, N]` from the buckets' per-probe results (owner: per task,
  (behavior index, its probe indices))."""
  base = [np.zeros(n) for n in sizes]
  scores = [None] * len(sizes)
  for (t, idx), b, s in zip(owner, res["baseline"], res["scores"]):
    if scores[t] is None:
      scores[t] = np.zeros(s.shape[:-1] + (sizes[t],))
    base[t][idx] = b
    scores[t][..., idx] = s
  return base, scores
