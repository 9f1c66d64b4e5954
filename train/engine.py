"""The training engine: optimizer, the sharded gradient-accumulating train step, the loop (devices and shardings:
train/mesh.py, re-exported here; the state format and update: train/step.py; orbax checkpoints:
train/checkpoint.py).

Parallelism (no pmap): a `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor") over all devices (all hosts
after `jax.distributed.initialize`), built by `models.sharding.make_mesh` (re-exported here). The batch axis is
split over (data, fsdp); frozen base weights, trainables (LoRA factors or full-fine-tuning tensors) and every
optimizer moment follow the plan of models.sharding (FSDP over "fsdp", Megatron column / row splits over
"tensor"; `param_sharding`, `state_sharding`). The step is traced with the mesh active, so the forward pass's
activation constraints apply. `jax.jit` + GSPMD insert all collectives. Losses are (sum / global weight) with
the weight computed from the masks of the whole global batch, so the loss and gradient do not depend on the mesh
or the gradient-accumulation split (tests/test_train.py checks 8 vs 1 device, tests/test_sharding.py three
(data, fsdp, tensor) meshes).

Multi-host: `maybe_initialize_distributed` (coordinator / process count / id from arguments or JAX_* env, or
auto-detected on Cloud TPU and SLURM); each process loads only the rows of the global batch its devices hold
(`process_rows`, `put_batch(batch_size=...)`); every process calls `Checkpointer.save` (orbax writes each
host's shards; the directory must be shared, e.g. gs://...); `to_host` gathers sharded results.

Train state: train.step's format {step, trainable, opt_state, rng} (`init_state`, re-exported here); the update
and the SFT task loss are train.step's, shared with the reversion arms' scanned step (train.scan).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tqdm import tqdm

from models.config import ModelConfig
from models.lora import adapt
from models.sharding import BATCH_AXES, MESH_AXES, make_mesh
from models.transformer import forward
from train import losses
from train.checkpoint import Checkpointer
from train.guard import DivergenceGuard, TrainingDivergedError
from train.mesh import (maybe_initialize_distributed, param_sharding, process_rows, put_batch, put_tree, replicated,
                        state_sharding, state_specs, to_host)
from train.step import apply_gradients, init_state, sft_loss

__all__ = [  # the engine's own names, and those it re-exports (train.mesh, train.step, models.sharding)
    "TrainingDivergedError", "make_optimizer", "StepConfig", "assemble", "batch_weights", "objective",
    "make_train_step", "fit", "init_state", "make_mesh", "MESH_AXES", "maybe_initialize_distributed",
    "param_sharding", "process_rows", "put_batch", "put_tree", "replicated", "state_sharding", "state_specs",
    "to_host"]


# ------------------------------------------------------------------------------------------- optimizer
def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0, end_lr_frac: float = 0.0,
                   weight_decay: float = 0.0, clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (Loshchilov & Hutter 2019, optax.adamw) after global-norm clipping, with linear warmup from 0 to
  `lr` over `warmup_steps` then cosine decay to `lr * end_lr_frac` at `total_steps` (optax.
  warmup_cosine_decay_schedule). Returns (transformation, schedule)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1),
                                             end_value=lr * end_lr_frac)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), sched


# ------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static description of the objective (hashable).

  mode: "lora" (trainable = `{target: {"a", "b"}}`, applied as `models.lora.adapt`) or "full" (trainable =
    `{"layers": {name: [L, ...]}, <global name>: ...}` overriding the frozen tensors).
  objective: "sft" (masked next-token cross-entropy) or "lorra" (representation matching at `lorra_layers`
    toward frozen + lorra_alpha * reading vector on the batch, plus `retain_weight` x distance to the frozen
    activations on the retain batch).
  lora_scale: alpha / r (or alpha / sqrt(r)).
  compute_dtype: activation / frozen-weight dtype ("float32" or "bfloat16"); trainables stay in their dtype
    (float32 master weights) and are cast at use.
  remat: recompute each decoder layer in the backward pass (`forward(remat=True)`): activation memory drops
    to one `[B, S, D]` residual per layer plus one layer's working set (train.plan prints both).
  n_targets: SFT only: the LM head runs at this many scored positions per row (train.losses.sft_rows; set it to
    `losses.max_targets` of the data set, as train.loop does); 0 = at every position.
  lora_from: LoRA only: the first adapted layer (min of LoraSpec.layers; the factors below it are zero):
    forward(adapters_from=...) runs no backward pass through the layers below it. 0 = every layer.
  """
  mode: str = "lora"
  objective: str = "sft"
  lora_scale: float = 1.0
  compute_dtype: str = "float32"
  lorra_layers: tuple[int, ...] = ()
  lorra_alpha: float = 1.0
  retain_weight: float = 1.0
  squared_distance: bool = False
  remat: bool = False
  n_targets: int = 0
  lora_from: int = 0


def assemble(trainable: Any, frozen: dict[str, Any], sc: StepConfig) -> dict[str, Any]:
  """The model's params for `models.transformer.forward` from the trainable and frozen trees: the frozen ones
  with LoRA adapters (models.lora.adapt) or with the trained weights substituted (full fine-tuning)."""
  if sc.mode == "lora":
    return adapt(frozen, trainable, sc.lora_scale)
  dt = jnp.dtype(sc.compute_dtype)
  params = dict(frozen)
  params["layers"] = dict(frozen["layers"])
  for k, v in trainable.items():
    if k == "layers":
      params["layers"].update({n: w.astype(dt) for n, w in v.items()})
    else:
      params[k] = v.astype(dt)
  return params


def batch_weights(batch: dict[str, jax.Array], sc: StepConfig) -> dict[str, jax.Array]:
  """Global normalisers of the objective's sums (token counts over the whole accumulated global batch)."""
  if sc.objective == "sft":
    return {"main": losses.sft_weight(batch["loss_mask"])}
  n = max(len(sc.lorra_layers), 1)
  w = {"main": n * jnp.sum(batch["loss_mask"].astype(jnp.float32))}
  if "retain_tokens" in batch:
    w["retain"] = n * jnp.sum(batch["retain_mask"].astype(jnp.float32))
  return w


def objective(trainable: Any, frozen: dict[str, Any], mb: dict[str, jax.Array], weights: dict[str, jax.Array],
              reading: jax.Array | None, cfg: ModelConfig, sc: StepConfig) -> jax.Array:
  """This micro-batch's share of the loss: sum over its tokens / global weight (see module docstring).

  mb: "tokens", "mask" `[B, S]` int32, "loss_mask" `[B, S]` float32 (SFT targets, or the LoRRA positions);
  for LoRRA optionally "retain_tokens", "retain_mask" `[B, S']`. reading: `[L, D]` (LoRRA only).
  """
  params = assemble(trainable, frozen, sc)
  kw = dict(remat=sc.remat, adapters_from=sc.lora_from)
  if sc.objective == "sft":
    return sft_loss(params, cfg, mb, weights["main"], sc.n_targets, **kw)
  idx = jnp.asarray(sc.lorra_layers)

  def resid(p, toks, mask, fkw):
    _, acts = forward(p, toks, cfg, attention_mask=mask, capture=("resid_post",), logits="none", **fkw)
    return acts["resid_post"]
  frozen_kw = {}
  ref = jax.lax.stop_gradient(resid(frozen, mb["tokens"], mb["mask"], frozen_kw))
  tgt = losses.lorra_targets(ref, reading, sc.lorra_alpha, sc.lorra_layers)
  cur = resid(params, mb["tokens"], mb["mask"], kw)[idx]
  loss = losses.representation_loss_sum(cur, tgt, mb["loss_mask"], squared=sc.squared_distance)
  loss = loss / jnp.maximum(weights["main"], 1.0)
  if "retain_tokens" in mb and sc.retain_weight:
    rref = jax.lax.stop_gradient(resid(frozen, mb["retain_tokens"], mb["retain_mask"], frozen_kw))[idx]
    rcur = resid(params, mb["retain_tokens"], mb["retain_mask"], kw)[idx]
    r = losses.representation_loss_sum(rcur, rref, mb["retain_mask"], squared=sc.squared_distance)
    loss = loss + sc.retain_weight * r / jnp.maximum(weights["retain"], 1.0)
  return loss


def make_train_step(cfg: ModelConfig, sc: StepConfig, tx: optax.GradientTransformation, schedule: Callable,
                    update_mask: Any, mesh: Mesh, state_sh: Any, frozen_sh: Any) -> Callable:
  """The jitted train step `step(state, frozen, batch, reading) -> (state, metrics)`.

  batch: `{name: [accum, B, S]}` (put_batch); the accum axis is a `lax.scan` (gradient accumulation inside the
  one compiled program). update_mask: pytree like `trainable` of 0/1 arrays (broadcastable) multiplying the
  optimizer updates, which keeps layers outside the LoRA window exactly zero (the update is train.step's
  `apply_gradients`). metrics: loss (the objective's mean over the global batch), grad_norm (before clipping),
  lr, finite (1.0 iff loss, gradient and updated parameters are all finite).

  Shardings: `jax.jit(in_shardings=(state_sh, frozen_sh, batch over (data, fsdp), reading unspecified),
  out_shardings=(state_sh, replicated))` (state_sh from `state_sharding`, frozen_sh from `param_sharding`); the
  body is traced with `mesh` active (`jax.sharding.use_abstract_mesh`), so the forward pass's activation
  constraints apply, and the gradient accumulators are constrained to the trainables' shardings
  (reduce-scattered, never replicated). Lower it for an 8B model without weights:
  `step.lower(*ShapeDtypeStructs with these shardings).compile()`.
  """
  tr_sh = state_sh.get("trainable") if isinstance(state_sh, dict) else None

  def step(state, frozen, batch, reading):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _step(state, frozen, batch, reading)

  def _step(state, frozen, batch, reading):
    weights = batch_weights(batch, sc)
    grad_fn = jax.value_and_grad(objective)

    def micro(carry, mb):
      g_acc, l_acc = carry
      l, g = grad_fn(state["trainable"], frozen, mb, weights, reading, cfg, sc)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      if tr_sh is not None:
        g_acc = jax.lax.with_sharding_constraint(g_acc, tr_sh)
      return (g_acc, l_acc + l), None
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
    (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), batch)
    new, gnorm, finite = apply_gradients(state, grads, tx, update_mask)
    metrics = {"loss": loss, "grad_norm": gnorm, "lr": schedule(state["step"]),
               "finite": (jnp.isfinite(loss) & finite).astype(jnp.float32)}
    return new, metrics

  rep = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P(None, BATCH_AXES, None))
  return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh, None), out_shardings=(state_sh, rep))


# ------------------------------------------------------------------------------------------- the loop
def fit(step_fn: Callable, state: Any, frozen: Any, reading: Any, *, mesh: Mesh, get_host_batch: Callable,
        micro_batch: int, total_steps: int, stop_after: int | None = None, ckpt: Checkpointer | None = None,
        save_every: int = 0,
        meta: dict[str, Any] | None = None, log: Callable | None = None, log_every: int = 1,
        tokens_per_step: Callable | None = None, progress: bool = True,
        guard: DivergenceGuard | None = None) -> tuple[Any, list[dict]]:
  """Run steps `state["step"] .. total_steps - 1` (or stop after step `stop_after`).

  `get_host_batch(step, rows)` returns `{name: [accum, len(rows), ...]}` host arrays holding only the rows
  `rows = process_rows(mesh, micro_batch)` of the global micro-batch (all rows on one host), so each process
  builds only what its devices hold.
  Checkpoints after every `save_every`-th step and at the end / stop. A non-finite loss, gradient or update
  raises TrainingDivergedError naming the step; the offending update is discarded, so the newest checkpoint
  is the last good state. `guard` (train.guard.DivergenceGuard) stops a finite divergence the same way: no
  checkpoint is written while its streak runs, and its reference loss is kept in `meta["first_loss"]` (pass a
  guard whose reference is that value when resuming). `log(step, **metrics)` receives loss, grad_norm, lr,
  tokens_per_s (this process's tokens; tokens_per_step(host) sees only its rows).
  Returns (final state, list of per-step metric dicts).
  """
  meta = dict(meta or {})
  start = int(state["step"])
  end = total_steps if stop_after is None else min(total_steps, stop_after)
  history = []
  bar = tqdm(total=end - start, initial=0, desc="train", disable=not progress, dynamic_ncols=True)
  t_prev = time.perf_counter()
  rows = process_rows(mesh, micro_batch)
  for s in range(start, end):
    host = get_host_batch(s, rows)
    batch = put_batch(mesh, host, micro_batch)
    new_state, m = step_fn(state, frozen, batch, reading)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    try:
      if m.pop("finite") != 1.0:
        raise TrainingDivergedError(f"step {s}: non-finite loss/gradient/update (loss={m['loss']}, "
                                    f"grad_norm={m['grad_norm']}); stopped")
      if guard is not None:
        guard.update(s, m["loss"], m["grad_norm"])
        meta["first_loss"] = guard.reference
    except TrainingDivergedError as e:
      bar.close()
      if ckpt is not None and guard is not None and guard.streak >= guard.patience:
        ckpt.discard_from(guard.streak_start)        # the states from the streak's first step on are bad
      last = ckpt.latest_step() if ckpt is not None else None
      raise TrainingDivergedError(f"{e}. Last good checkpoint: "
                                  f"{'none' if last is None else f'step {last} in {ckpt.directory}'}") from None
    state = new_state
    now = time.perf_counter()
    ntok = float(tokens_per_step(host)) if tokens_per_step is not None else 0.0
    m["tokens_per_s"] = ntok / max(now - t_prev, 1e-9)
    t_prev = now
    m["step"] = s
    history.append(m)
    if log is not None and (s % log_every == 0 or s == end - 1):
      log(s, **{k: v for k, v in m.items() if k != "step"})
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
    bar.update(1)
    done = s + 1
    suspect = guard is not None and guard.suspect     # inside a divergence streak: keep the last good one
    if ckpt is not None and ((save_every and done % save_every == 0 and not suspect) or done == end):
      ckpt.save(done, state, meta)
  bar.close()
  return state, history
