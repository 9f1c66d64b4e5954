"""The training engine: mesh and shardings, optimizer, ONE jitted train step, orbax checkpoints, the loop.

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

Train state (a plain dict pytree, what orbax saves): step (int32), trainable (LoRA factors or full-fine-tuning
tensors, float32 master weights by default), opt_state (optax), rng (uint32[2] PRNGKey, folded with the step for
any randomness; the objectives here are deterministic). Data order is a function of (seed, step)
(train.data.batch_indices), so restoring a checkpoint continues exactly.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.sharding import BATCH_AXES, MESH_AXES, lora_specs, make_mesh, named, param_specs  # noqa: F401
from models.transformer import forward
from train import losses


class TrainingDivergedError(FloatingPointError):
  """The loss, gradient norm or updated parameters became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------- devices
def maybe_initialize_distributed(enabled: bool | None = None, *, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Call `jax.distributed.initialize` (multi-host) once, before any device is used.

  Args:
    enabled: True: initialise; False: do nothing; None: initialise iff a coordinator address is known (argument
      or JAX_COORDINATOR_ADDRESS).
    coordinator_address: "host:port" of process 0 (default env JAX_COORDINATOR_ADDRESS).
    num_processes, process_id: default env JAX_NUM_PROCESSES / JAX_PROCESS_ID; negative or None = unset.
  With nothing set, `jax.distributed.initialize()` auto-detects the cluster (Cloud TPU VM pods, SLURM, Open MPI;
  jax.distributed docs). Returns True iff this process runs distributed afterwards.
  Raises:
    ValueError: JAX_NUM_PROCESSES / JAX_PROCESS_ID is set but not an integer (the message names it). jax raises
      when an explicit coordinator lacks num_processes / process_id outside an auto-detected cluster.
  """
  def env_int(name, value):
    if value is not None and int(value) >= 0:
      return int(value)
    raw = os.environ.get(name)
    if raw in (None, ""):
      return None
    try:
      return int(raw)
    except ValueError as e:
      raise ValueError(f"environment variable {name}={raw!r} is not an integer") from e
  addr = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if enabled is None:
    enabled = bool(addr)
  if not enabled:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=addr, num_processes=env_int("JAX_NUM_PROCESSES", num_processes),
                             process_id=env_int("JAX_PROCESS_ID", process_id))
  return True


def param_sharding(mesh: Mesh, tree: Any, cfg: ModelConfig | None = None) -> Any:
  """NamedShardings for frozen weights (or full-fine-tuning trainables) from the plan of models.sharding:
  FSDP on "fsdp", Megatron column / row splits on "tensor", the leading layer axis of `layers/*` never split
  (it is scanned), norms and o-bias replicated. With `cfg`, attention tensors are split over "tensor" only in
  whole heads. Raises ValueError for a leaf name the plan does not know."""
  return named(mesh, param_specs(mesh, cfg, tree)[0])


def state_specs(mesh: Mesh | dict[str, int], state: dict[str, Any], tx: optax.GradientTransformation,
                cfg: ModelConfig | None = None, mode: str = "lora") -> tuple[dict[str, Any], list[str]]:
  """PartitionSpecs for a train state `{step, trainable, opt_state, rng}` (arrays or ShapeDtypeStructs).

  trainable: LoRA factors (mode "lora", `models.sharding.lora_specs`) or full-fine-tuning tensors (mode "full",
  the frozen tensor's spec). opt_state: every parameter-shaped moment (AdamW mu / nu, ...) takes its parameter's
  spec via `optax.tree_map_params`; counters and other non-parameter leaves are replicated, as are step and rng.
  mesh may be a Mesh or `{axis: size}` (plans without devices). Returns (specs, divisibility notes).
  Raises ValueError for an unknown mode.
  """
  if mode == "lora":
    tr, notes = lora_specs(mesh, state["trainable"], cfg)
  elif mode == "full":
    tr, notes = param_specs(mesh, cfg, state["trainable"])
  else:
    raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
  opt = optax.tree_map_params(tx, lambda _, spec: spec, state["opt_state"], tr, transform_non_params=lambda _: P(),
                              is_leaf=lambda x: isinstance(x, P))
  return {"step": P(), "trainable": tr, "opt_state": opt, "rng": P()}, notes


def state_sharding(mesh: Mesh, state: dict[str, Any], tx: optax.GradientTransformation,
                   cfg: ModelConfig | None = None, mode: str = "lora") -> dict[str, Any]:
  """NamedShardings on `mesh` for a train state (see `state_specs`)."""
  return named(mesh, state_specs(mesh, state, tx, cfg, mode)[0])


def put_tree(tree: Any, shardings: Any) -> Any:
  """Place a pytree on `shardings` (same structure), on one host or many: leaves that are host data or
  fully addressable arrays go through `jax.make_array_from_callback` when the sharding spans other processes
  (every process must pass the same values), so each process materialises only its own shards; global arrays
  are resharded with `jax.device_put`."""
  def one(x, sh):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sh)
    if sh.is_fully_addressable:
      return jax.device_put(x, sh)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
  return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
  """numpy copies of every leaf, gathering shards held by other processes
  (`jax.experimental.multihost_utils.process_allgather`) where an array is not fully addressable."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def replicated(mesh: Mesh, tree: Any) -> Any:
  """Fully replicated NamedShardings for every leaf of `tree`."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """Sorted global row indices of a batch axis of `batch_size` split over (data, fsdp) that this process's
  devices hold (all rows on one host). Raises ValueError if data * fsdp does not divide batch_size."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"micro-batch size {batch_size} is not divisible by data x fsdp = {n}")
  sh = NamedSharding(mesh, P(BATCH_AXES))
  rows: set[int] = set()
  for idx in sh.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*idx[0].indices(batch_size)))
  return np.asarray(sorted(rows), np.int64)


def put_batch(mesh: Mesh, host: dict[str, np.ndarray], batch_size: int | None = None) -> dict[str, jax.Array]:
  """Global device arrays `{name: [accum, B, ...]}`, B split over ("data", "fsdp"), replicated over tensor.

  Args:
    host: `{name: [accum, R, ...]}` host arrays. With `batch_size` None they are the whole global batch
      (R = B); with `batch_size` = B they are only this process's rows, `process_rows(mesh, B)` in that order,
      so a multi-host run never builds the rows other hosts hold.
  Each device gets its slice via `jax.make_array_from_callback`, which copies only addressable shards.

  Raises ValueError if B is not divisible by data x fsdp, or R does not match the rows this process needs.
  """
  out = {}
  for k, v in host.items():
    B = v.shape[1] if batch_size is None else int(batch_size)
    local = process_rows(mesh, B)                      # also checks that data x fsdp divides B
    rows = local if batch_size is not None else np.arange(B)
    if v.shape[1] != len(rows):
      raise ValueError(f"batch {k!r} holds {v.shape[1]} rows; this process's devices need {len(rows)} of {B}")
    first = {int(r): i for i, r in enumerate(rows)}
    sh = NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (v.ndim - 2))))

    def cb(idx, v=v, first=first, B=B):
      lo, hi, _ = idx[1].indices(B)
      return v[(idx[0], slice(first[lo], first[lo] + hi - lo)) + tuple(idx[2:])]
    out[k] = jax.make_array_from_callback((v.shape[0], B) + v.shape[2:], sh, cb)
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
  remat: recompute each decoder layer in the backward pass (`forward(remat=True)`): activation memory drops
    to one `[B, S, D]` residual per layer plus one layer's working set (train.plan prints both).
  n_targets: SFT only: the LM head runs at this many scored positions per row (train.losses.sft_rows; set it to
    `losses.max_targets` of the data set, as train.loop does); 0 = at every position.
  lora_from: LoRA only: the first adapted layer (min of LoraSpec.layers; the factors below it are zero):
    forward(lora_from=...) runs no backward pass through the layers below it. 0 = every layer.
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
  kw = dict(lora=lora, lora_scale=sc.lora_scale, remat=sc.remat, lora_from=sc.lora_from)
  if sc.objective == "sft":
    rows = losses.sft_rows(params, cfg, mb["tokens"], mb["mask"], mb["loss_mask"], sc.n_targets, **kw)
    return jnp.sum(rows) / jnp.maximum(weights["main"], 1.0)
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

  Shardings: `jax.jit(in_shardings=(state_sharding, frozen_sharding, batch over (data, fsdp), reading
  unspecified), out_shardings=(state_sharding, replicated))`; the body is traced with `mesh` active
  (`jax.sharding.use_abstract_mesh`), so the forward pass's activation constraints apply, and the gradient
  accumulators are constrained to the trainables' shardings (reduce-scattered, never replicated). Lower it for
  an 8B model without weights: `step.lower(*ShapeDtypeStructs with these shardings).compile()`.
  """
  tr_sh = state_sharding.get("trainable") if isinstance(state_sharding, dict) else None

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
  batch_sh = NamedSharding(mesh, P(None, BATCH_AXES, None))
  return jax.jit(step, in_shardings=(state_sharding, frozen_sharding, batch_sh, None),
                 out_shardings=(state_sharding, rep))


# ------------------------------------------------------------------------------------------- checkpoints
class Checkpointer:
  """orbax-checkpoint CheckpointManager over `<workdir>/checkpoints`: items "state" (the train-state pytree)
  and "meta" (JSON: the run config, LoRA rank/alpha/targets/layers). Saves are synchronous and atomic (orbax
  writes a temporary directory and renames it); the newest `max_to_keep` are kept.

  Multi-host: every process constructs it and calls `save` / `restore` with the same arguments (orbax
  synchronises the processes; each writes the shards its devices hold, process 0 the metadata and "meta"), so
  `directory` must be one path all hosts share (a gs:// bucket on Cloud TPU, a shared filesystem on GPU
  clusters); URLs are kept as given."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = directory if "://" in directory else os.path.abspath(directory)   # gs://... kept
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
        micro_batch: int, total_steps: int, stop_after: int | None = None, ckpt: Checkpointer | None = None,
        save_every: int = 0,
        meta: dict[str, Any] | None = None, log: Callable | None = None, log_every: int = 1,
        tokens_per_step: Callable | None = None, progress: bool = True) -> tuple[Any, list[dict]]:
  """Run steps `state["step"] .. total_steps - 1` (or stop after step `stop_after`).

  `get_host_batch(step, rows)` returns `{name: [accum, len(rows), ...]}` host arrays holding only the rows
  `rows = process_rows(mesh, micro_batch)` of the global micro-batch (all rows on one host), so each process
  builds only what its devices hold.
  Checkpoints after every `save_every`-th step and at the end / stop. A non-finite loss, gradient or update
  raises TrainingDivergedError naming the step; the offending update is discarded, so the newest checkpoint
  is the last good state. `log(step, **metrics)` receives loss, grad_norm, lr, tokens_per_s (this process's
  tokens; tokens_per_step(host) sees only its rows).
  Returns (final state, list of per-step metric dicts).
  """
  from tqdm import tqdm
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
