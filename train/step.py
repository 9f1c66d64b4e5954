"""The one train-state format and the parts of a train step that every fine-tuning program shares.

State (a plain dict pytree, what orbax saves): step (int32), trainable (LoRA factors `{target: {"a", "b"}}` or
full-fine-tuning tensors, float32 master weights by default), opt_state (optax), rng (uint32[2] PRNGKey, for any
randomness folded with the step; the objectives here are deterministic). Data order is a function of (seed, step)
(train.data.batch_indices), so restoring a checkpoint continues exactly.

Two programs step this state: train.engine.make_train_step (the sharded, gradient-accumulating step of SFT and
LoRRA runs: train.loop.train_loop, so also the reversion safety phase and the IOI phases) and train.scan.make_step
(the reversion arms' step, scanned over steps and vmapped over runs). Both take their SFT task loss from
`sft_loss` and update with `apply_gradients`: gradients -> global norm -> optax update -> optional update mask ->
apply -> finite flag.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from models.config import ModelConfig
from train import losses


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  """Fresh train state {step, trainable, opt_state, rng} (rng = PRNGKey(seed))."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
          "rng": jax.random.PRNGKey(seed)}


def stack_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """Stack per-run states along a new leading run axis (train.scan.make_program's `[R, ...]`)."""
  return jax.tree.map(lambda *x: jnp.stack(x), *states)


def unstack_state(tree: Any, i: int) -> Any:
  """Run i of a tree with a leading run axis (the inverse of `stack_states` for one run)."""
  return jax.tree.map(lambda x: x[i], tree)


def sft_loss(params: dict[str, Any], cfg: ModelConfig, batch: dict[str, jax.Array], weight: jax.Array,
             n_targets: int = 0, **forward_kw) -> jax.Array:
  """The SFT task loss: masked next-token cross-entropy summed over `batch` / max(weight, 1).

  batch: tokens / mask `[B, S]` int32, loss_mask `[B, S]` float32 (right-padded rows). weight: the number of
  scored targets of the whole (accumulated, global) batch (`losses.sft_weight`), so micro-batch shares add up to
  the global mean. n_targets: train.losses.sft_rows's k. forward_kw: remat, adapters_from (params may be
  adapted, models.lora.adapt).
  """
  rows = losses.sft_rows(params, cfg, batch["tokens"], batch["mask"], batch["loss_mask"], n_targets, **forward_kw)
  return jnp.sum(rows) / jnp.maximum(weight, 1.0)


def apply_gradients(state: dict[str, Any], grads: Any, tx: optax.GradientTransformation,
                    update_mask: Any = None) -> tuple[dict[str, Any], jax.Array, jax.Array]:
  """One optimizer update of a train state.

  grads: like state["trainable"] (cast to each trainable's dtype first). update_mask: None, or a pytree like the
  trainables of 0/1 arrays (broadcastable) multiplying the optimizer updates (keeps layers outside a LoRA window
  exactly zero). Returns (new state with step + 1, global norm of the gradients before any clipping, finite:
  True iff that norm and every updated trainable are finite).
  """
  trainable = state["trainable"]
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
  gnorm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], trainable)
  if update_mask is not None:
    updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, update_mask)
  trainable = optax.apply_updates(trainable, updates)
  finite = jnp.isfinite(gnorm) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trainable)]))
  new = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
  return new, gnorm, finite
