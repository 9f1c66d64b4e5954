"""The training engine: mesh and shardings, optimizer, ONE jitted train step, orbax checkpoints, the loop.

Parallelism (no pmap): a `jax.sharding.Mesh` with axes ("data", "fsdp") over all devices (all hosts after
`jax.distributed.initialize`). The batch axis is split over both axes; the frozen base weights are split over
"fsdp" along their largest divisible non-layer axis (replicated when fsdp = 1); trainable LoRA factors and the
optimizer state are replicated. `jax.jit` + GSPMD insert the gradient all-reduce. Losses are (sum / global
weight) with the weight computed from the masks of the whole global batch, so the loss and gradient do not
depend on the number of devices or the gradient-accumulation split (tests/test_train.py checks 8 vs 1 device).

Train state (a plain dict pytree, what orbax saves): step (int32), trainable (LoRA factors or full-fine-tuning
tensors, float32 master weights by default), opt_state (optax), rng (uint32[2] PRNGKey, folded with the step for
any randomness; the objectives here are deterministic). Data order is a function of (seed, step)
(train.data.batch_indices), so restoring a checkpoint continues exactly.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.transformer import forward
from train import losses

BATCH_AXES = ("data", "fsdp")


class TrainingDivergedError(FloatingPointError):
  """The loss, gradient norm or updated parameters became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------- devices
def maybe_initialize_distributed(enabled: bool | None = None) -> None:
  """Call `jax.distributed.initialize()` (multi-host) when `enabled`, or when None and the environment names a
  coordinator (JAX_COORDINATOR_ADDRESS) or a cluster JAX auto-detects (SLURM / Cloud TPU / MPI env)."""
  if enabled is None:
    enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
  if enabled:
    jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh `[data, fsdp]` over `devices` (default all global devices); data = n_devices / fsdp.

  Raises ValueError if fsdp does not divide the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the device count {len(devices)}")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def param_sharding(mesh: Mesh, tree: Any, stacked_prefix: str = "layers") -> Any:
  """NamedShardings for frozen weights: the largest axis divisible by the fsdp size is split over "fsdp" (the
  leading layer axis of `layers/*` is never split: it is scanned); everything else replicated."""
  n = mesh.shape["fsdp"]

  def one(path, x):
    names = [getattr(p, "key", None) for p in path]
    if n == 1 or x.ndim == 0:
      return NamedSharding(mesh, P())
    first = 1 if stacked_prefix in names else 0
    axes = [a for a in range(first, x.ndim) if x.shape[a] % n == 0]
    if not axes:
      return NamedSharding(mesh, P())
    a = max(axes, key=lambda a: x.shape[a])
    spec = [None] * x.ndim
    spec[a] = "fsdp"
    return NamedSharding(mesh, P(*spec))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh, tree: Any) -> Any:
  """Fully replicated NamedShardings for every leaf of `tree`."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def put_batch(mesh: Mesh, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Global device arrays from a host batch `{name: [accum, B, ...]}`, B split over ("data", "fsdp").

  Every process passes the same global host batch (it is a pure function of seed and step); each device gets
  its slice via `jax.make_array_from_callback`, which works on one host and on many.

  Raises ValueError if B is not divisible by the number of devices.
  """
  n = mesh.size
  out = {}
  for k, v in host.items():
    if v.shape[1] % n:
      raise ValueError(f"batch {k!r}: micro-batch size {v.shape[1]} is not divisible by {n} devices")
    sh = NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (v.ndim - 2))))
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out


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

  mode: "lora" (trainable = `{target: {"a", "b"}}`, passed as `forward(lora=...)`) or "full" (trainable =
    `{"layers": {name: [L, ...]}, <global name>: ...}` overriding the frozen tensors).
  objective: "sft" (masked next-token cross-entropy) or "lorra" (representation matching at `lorra_layers`
    toward frozen + lorra_alpha * reading vector on the batch, plus `retain_weight` x distance to the frozen
    activations on the retain batch).
  lora_scale: alpha / r (or alpha / sqrt(r)).
  compute_dtype: activation / frozen-weight dtype ("float32" or "bfloat16"); trainables stay in their dtype
    (float32 master weights) and are cast at use.
  """
  mode: str = "lora"
  objective: str = "sft"
  lora_scale: float = 1.0
  compute_dtype: str = "float32"
  lorra_layers: tuple[int, ...] = ()
  lorra_alpha: float = 1.0
  retain_weight: float = 1.0
  squared_distance: bool = False


def assemble(trainable: Any, frozen: dict[str, Any], sc: StepConfig) -> tuple[dict[str, Any], dict | None]:
  """(params, lora) for `models.transformer.forward` from the trainable and frozen trees."""
  if sc.mode == "lora":
    return frozen, trainable
  dt = jnp.dtype(sc.compute_dtype)
  params = dict(frozen)
  params["layers"] = dict(frozen["layers"])
  for k, v in trainable.items():
    if k == "layers":
      params["layers"].update({n: w.astype(dt) for n, w in v.items()})
    else:
      params[k] = v.astype(dt)
  return params, None


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
  params, lora = assemble(trainable, frozen, sc)
  kw = dict(lora=lora, lora_scale=sc.lora_scale)
  if sc.objective == "sft":
    logits, _ = forward(params, mb["tokens"], cfg, attention_mask=mb["mask"], **kw)
    return losses.sft_loss_sum(logits, mb["tokens"], mb["loss_mask"]) / jnp.maximum(weights["main"], 1.0)
  idx = jnp.asarray(sc.lorra_layers) + 1

  def resid(p, toks, mask, lora_kw):
    _, acts = forward(p, toks, cfg, attention_mask=mask, capture=("resid",), logits="none", **lora_kw)
    return acts["resid"]
  frozen_kw = dict(lora=None)
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


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  """Fresh train state {step, trainable, opt_state, rng}."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
          "rng": jax.random.PRNGKey(seed)}


def make_train_step(cfg: ModelConfig, sc: StepConfig, tx: optax.GradientTransformation, schedule: Callable,
                    update_mask: Any, mesh: Mesh, state_sharding: Any, frozen_sharding: Any) -> Callable:
  """The jitted train step `step(state, frozen, batch, reading) -> (state, metrics)`.

  batch: `{name: [accum, B, S]}` (put_batch); the accum axis is a `lax.scan` (gradient accumulation inside the
  one compiled program). update_mask: pytree like `trainable` of 0/1 arrays (broadcastable) multiplying the
  optimizer updates, which keeps layers outside the LoRA window exactly zero. metrics: loss (the objective's
  mean over the global batch), grad_norm (before clipping), lr, finite (1.0 iff loss, gradient and updated
  parameters are all finite).
  """
  def step(state, frozen, batch, reading):
    weights = batch_weights(batch, sc)
    grad_fn = jax.value_and_grad(objective)

    def micro(carry, mb):
      g_acc, l_acc = carry
      l, g = grad_fn(state["trainable"], frozen, mb, weights, reading, cfg, sc)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), None
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
    (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["trainable"])
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, update_mask)
    trainable = optax.apply_updates(state["trainable"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trainable)]))
    new = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": gnorm, "lr": schedule(state["step"]),
               "finite": finite.astype(jnp.float32)}
    return new, metrics

  rep = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_sharding, frozen_sharding, None, None),
                 out_shardings=(state_sharding, rep))


# ------------------------------------------------------------------------------------------- checkpoints
class Checkpointer:
  """orbax-checkpoint CheckpointManager over `<workdir>/checkpoints`: items "state" (the train-state pytree)
  and "meta" (JSON: the run config, LoRA rank/alpha/targets/layers). Saves are synchronous and atomic (orbax
  writes a temporary directory and renames it); the newest `max_to_keep` are kept."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Save `state` and `meta` at `step` (no-op if that step is already saved)."""
    if step in self.manager.all_steps():
      return
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, like: Any = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) saved at `step`, laid out like the pytree `like` (same structure, shardings, dtypes);
    with like=None, as saved (plain nested containers of host-default arrays)."""
    ocp = self._ocp
    abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self) -> None:
    self.manager.close()


# ------------------------------------------------------------------------------------------- the loop
def fit(step_fn: Callable, state: Any, frozen: Any, reading: Any, *, mesh: Mesh, get_host_batch: Callable,
        total_steps: int, stop_after: int | None = None, ckpt: Checkpointer | None = None, save_every: int = 0,
        meta: dict[str, Any] | None = None, log: Callable | None = None, log_every: int = 1,
        tokens_per_step: Callable | None = None, progress: bool = True) -> tuple[Any, list[dict]]:
  """Run steps `state["step"] .. total_steps - 1` (or stop after step `stop_after`).

  Checkpoints after every `save_every`-th step and at the end / stop. A non-finite loss, gradient or update
  raises TrainingDivergedError naming the step; the offending update is discarded, so the newest checkpoint
  is the last good state. `log(step, **metrics)` receives loss, grad_norm, lr, tokens_per_s.
  Returns (final state, list of per-step metric dicts).
  """
  from tqdm import tqdm
  start = int(state["step"])
  end = total_steps if stop_after is None else min(total_steps, stop_after)
  history = []
  bar = tqdm(total=end - start, initial=0, desc="train", disable=not progress, dynamic_ncols=True)
  t_prev = time.perf_counter()
  for s in range(start, end):
    host = get_host_batch(s)
    batch = put_batch(mesh, host)
    new_state, m = step_fn(state, frozen, batch, reading)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if m.pop("finite") != 1.0:
      bar.close()
      last = ckpt.latest_step() if ckpt is not None else None
      raise TrainingDivergedError(
          f"step {s}: non-finite loss/gradient/update (loss={m['loss']}, grad_norm={m['grad_norm']}); "
          f"stopped. Last good checkpoint: {'none' if last is None else f'step {last} in {ckpt.directory}'}")
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
    if ckpt is not None and ((save_every and done % save_every == 0) or done == end):
      ckpt.save(done, state, meta or {})
  bar.close()
  return state, history
