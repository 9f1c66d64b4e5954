"""Steered greedy generation: rho-eval's generation readout of bias / sycophancy under steering, every
configuration (layer, added vector) in one compiled program (probes.rho_eval_scores' `interventions` is the
single-configuration form)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.generate import generate
from models.interventions import resid_add_at
from probes import tasks as tasks_lib

def gen_bytes_per_config(cfg: ModelConfig, task: tasks_lib.GenTask, max_new_tokens: int,
                         dtype_bytes: int = 4) -> int:
  """Rough peak working memory of one steered generation of `task` (bytes): the prefill's residual, block and
  attention temporaries B*S*(8 D + 3 F) + 2 B*H*S*S, plus the KV cache 2 L*B*(S+N)*KV*hd."""
  B, S = task.tokens.shape
  kv = 2 * cfg.n_layers * B * (S + max_new_tokens) * cfg.n_kv_heads * cfg.head_dim
  return (B * S * (8 * cfg.d_model + 3 * cfg.d_ff) + 2 * B * cfg.n_heads * S * S + kv) * dtype_bytes


def grid_configs(directions: jax.Array, layers: Sequence[int], alphas: Sequence[float]) -> tuple[np.ndarray,
                                                                                                 jax.Array]:
  """Flatten a sweep grid into per-configuration (layer, added vector), row-major over (layer, alpha, direction).

  Args:
    directions: `[L', M, D]` (from `sweep_directions`). layers: the L' layer indices. alphas: the A coefficients.
  Returns:
    (`[L' * A * M]` int32 layer per configuration, `[L' * A * M, D]` float32 alpha * direction); reshape scores to
    `[L', A, M]` to undo the flattening.
  """
  directions = jnp.asarray(directions, jnp.float32)
  li, ai, di = (x.ravel() for x in np.meshgrid(np.arange(len(layers)), np.arange(len(alphas)),
                                               np.arange(directions.shape[1]), indexing="ij"))
  vecs = jnp.asarray(alphas, jnp.float32)[ai][:, None] * directions[li, di]
  return np.asarray(layers, np.int32)[li], vecs


def steered_generations(params, cfg: ModelConfig, task: tasks_lib.GenTask, layers: Sequence[int],
                        vectors: jax.Array, *, max_new_tokens: int = tasks_lib.GEN_TOKENS,
                        eos_ids: Sequence[int] = (), pad_id: int = 0, memory_gib: float = 4.0,
                        progress=None) -> np.ndarray:
  """Greedy generations of one task's prompts under C steering configurations, as one jitted program.

  Configuration c adds `vectors[c]` to the residual stream at the output of layer `layers[c]` at every position,
  prompt and generated tokens alike (rho-eval `SteeringHook` stays registered during `model.generate`), via
  `models.generate.generate(interventions=Interventions(resid_add=onehot(l)[:, None, None, None] * v))`,
  `lax.map`ped over the configurations in vmapped chunks sized by `memory_gib`. A zero vector is the unsteered
  model exactly (h + 0 = h). Decoding is greedy, `max_new_tokens` steps (rho-eval: 5), stopping rows at
  `eos_ids` (later slots hold `pad_id`).

  Args:
    params, cfg: the model.
    task: prompts (probes.tasks.GenTask).
    layers: `[C]` steered layer per configuration (0-based).
    vectors: `[C, D]` float, the added vector (alpha already applied).
    progress: optional callable(n) called from inside the program as chunks finish.
  Returns:
    `[C, B, max_new_tokens]` int32 numpy generated ids.
  Raises:
    ValueError: a layer out of range, or layers / vectors of different lengths.
  """
  layers = np.asarray([int(l) for l in layers], np.int32)
  vectors = jnp.asarray(vectors, jnp.float32)
  if vectors.ndim != 2 or vectors.shape[0] != len(layers) or vectors.shape[1] != cfg.d_model:
    raise ValueError(f"vectors {vectors.shape} must be [{len(layers)}, {cfg.d_model}] (one per layer)")
  if np.any((layers < 0) | (layers >= cfg.n_layers)):
    raise ValueError(f"layers {layers.tolist()} out of range for {cfg.n_layers} layers")
  per = gen_bytes_per_config(cfg, task, max_new_tokens)
  chunk = int(max(1, min(len(layers), math.floor(memory_gib * 2 ** 30 / per))))
  eos = tuple(sorted(int(e) for e in eos_ids))
  tokens, mask = jnp.asarray(task.tokens), jnp.asarray(task.mask)

  @jax.jit
  def program(params, layers, vectors):
    def one(x):
      l, v = x
      iv = resid_add_at(cfg.n_layers, l, v)
      out = generate(params, cfg, tokens, mask, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=int(pad_id),
                     interventions=iv)
      if progress is not None:
        jax.debug.callback(lambda l: progress(int(np.size(l))), l)   # once per row, or per chunk with [chunk]
      return out
    return jax.lax.map(one, (layers, vectors), batch_size=chunk)

  return np.asarray(program(params, jnp.asarray(layers), vectors))
