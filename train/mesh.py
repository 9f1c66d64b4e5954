"""Devices and shardings of training: multi-host start-up, the (data, fsdp, tensor) mesh's shardings of weights,
trainables and optimizer state, and host <-> device transfers of pytrees and batches (no pmap).

The mesh itself is models.sharding.make_mesh; the sharding plan (FSDP over "fsdp", Megatron column / row splits
over "tensor") is models.sharding's. train.engine re-exports these names.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.sharding import BATCH_AXES, lora_specs, named, param_specs


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
