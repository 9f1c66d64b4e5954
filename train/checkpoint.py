"""Checkpoints: one orbax-checkpoint CheckpointManager per run directory (train state + JSON metadata), shared by
train.engine.fit (through train.loop.train_loop) and train.loop.fit_chunks."""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """orbax-checkpoint CheckpointManager over `<workdir>/checkpoints`: items "state" (the train-state pytree)
  and "meta" (JSON: the run config, LoRA rank/alpha/targets/layers). Saves are synchronous and atomic (orbax
  writes a temporary directory and renames it); the newest `max_to_keep` are kept.

  Multi-host: every process constructs it and calls `save` / `restore` with the same arguments (orbax
  synchronises the processes; each writes the shards its devices hold, process 0 the metadata and "meta"), so
  `directory` must be one path all hosts share (a gs:// bucket on Cloud TPU, a shared filesystem on GPU
  clusters); URLs are kept as given."""

  def __init__(self, directory: str, max_to_keep: int = 2):
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
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    except Exception as e:   # a full disk, say: the one-line error (train.cli) says what was being written
      e.add_note(f"while saving checkpoint step {step} to {self.directory}")
      raise

  def restore(self, step: int, like: Any = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) saved at `step`, laid out like the pytree `like` (same structure, shardings, dtypes);
    with like=None, as saved (plain nested containers of host-default arrays)."""
    abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def discard_from(self, step: int) -> None:
    """Delete every saved step >= `step` (states the divergence guard found bad)."""
    for s in self.manager.all_steps():
      if s >= step:
        self.manager.delete(s)

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved at `step` alone (no array is read)."""
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def close(self) -> None:
    self.manager.close()


def common_step(checkpointers: Sequence[Checkpointer]) -> int | None:
  """The newest step every one of `checkpointers` has saved (runs resumed together), or None."""
  steps = set.intersection(*(set(c.manager.all_steps()) for c in checkpointers)) if checkpointers else set()
  return max(steps) if steps else None
