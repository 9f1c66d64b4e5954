"""Checkpoints: one orbax-checkpoint CheckpointManager per run directory (train state + JSON metadata), shared by
train.engine.fit (through train.loop.train_loop) and train.loop.fit_chunks; `cached_stage` keeps the results of a
study's expensive stages (the layer sweep) the same way, so a stopped run resumes."""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """orbax-checkpoint CheckpointManager over `<workdir>/checkpoints`: items "state" (the train-state pytree)
  and "meta" (JSON: the run config, LoRA rank/alpha/targets/layers). Saves are synchronous and atomic (orbax
  writes a temporary directory and renames it); the newest `max_to_keep` are kept.

  Multi-host: every process constructs it and calls `save` / `restore` with the same arguments (orbax
  synchronises the processes; each writes the shards its devices hold, process 0 the metadata and "meta"), so
  `directory` must be one path all hosts share (a gs:// bucket on Cloud TPU, a shared filesystem on GPU
  clusters); URLs are kept as given."""

  def __init__(self, directory: str, max_to_keep: int | None = 2):
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


def _split_tree(x: Any, arrays: dict[str, np.ndarray]) -> Any:
  """A JSON skeleton of a nested result (dicts with str keys, lists, tuples, scalars, strings, None) whose arrays
  are moved into `arrays` under generated names."""
  if isinstance(x, dict):
    return {"__dict__": [[k, _split_tree(v, arrays)] for k, v in x.items()]}
  if isinstance(x, (list, tuple)):
    return {"__list__": [_split_tree(v, arrays) for v in x], "tuple": isinstance(x, tuple)}
  if isinstance(x, (np.ndarray, jax.Array)):
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
      raise TypeError(f"cannot checkpoint a {a.dtype} array in a stage result (numbers only)")
    if a.size == 0:                                    # orbax refuses empty arrays: keep the shape in the JSON
      return {"__empty__": list(a.shape), "dtype": a.dtype.str}
    name = f"a{len(arrays)}"
    arrays[name] = a
    return {"__array__": name}
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (str, int, float, bool)):
    return x
  raise TypeError(f"cannot checkpoint a {type(x).__name__} in a stage result")


def _join_tree(x: Any, arrays: dict[str, Any]) -> Any:
  if isinstance(x, dict) and "__dict__" in x:
    return {k: _join_tree(v, arrays) for k, v in x["__dict__"]}
  if isinstance(x, dict) and "__list__" in x:
    items = [_join_tree(v, arrays) for v in x["__list__"]]
    return tuple(items) if x["tuple"] else items
  if isinstance(x, dict) and "__array__" in x:
    return np.asarray(arrays[x["__array__"]])
  if isinstance(x, dict) and "__empty__" in x:
    return np.zeros(x["__empty__"], np.dtype(x["dtype"]))
  return x


def cached_stage(ckpt: Checkpointer, step: int, name: str, fn: Callable[[], Any], timing: dict | None = None) -> Any:
  """`fn()`'s result, computed once and kept as checkpoint `step` of `ckpt`; a rerun restores it instead.

  For studies that do not train but run in expensive stages (the layer sweep): each stage's result (nested dicts /
  lists of numpy or jax arrays, scalars and strings) is saved as an orbax checkpoint, its arrays as the "state"
  item and the rest as JSON "meta", so a stopped run resumes at the first unfinished stage and a run directory
  holding stages is config-checked on rerun (train.rundir.Workdir). `ckpt` must keep every step
  (max_to_keep=None). The entries `fn` adds to `timing` are saved with it and restored, and restored stages are
  listed in timing["resumed"]. Arrays come back as numpy arrays, tuples as tuples. The config check covers the
  config, not the code: results saved by an older version of a stage are restored as they are.

  Raises:
    TypeError: the result holds a value of another type (a custom object, a string or object array), raised
      before anything is saved.
    ValueError: checkpoint `step` holds another stage than `name` (a workdir of a different pipeline).
  """
  timing = {} if timing is None else timing
  if step in ckpt.manager.all_steps():
    arrays, meta = ckpt.restore(step)
    if meta.get("stage") != name:
      raise ValueError(f"{ckpt.directory}: checkpoint {step} holds stage {meta.get('stage')!r}, not {name!r}; "
                       "use a new --workdir")
    timing.update(meta["timing"])
    timing.setdefault("resumed", []).append(name)
    return _join_tree(meta["tree"], arrays)
  before = dict(timing)
  out = fn()
  arrays: dict[str, np.ndarray] = {"_": np.zeros(())}
  tree = _split_tree(out, arrays)
  added = {k: v for k, v in timing.items() if k not in before or before[k] != v}
  ckpt.save(step, arrays, {"stage": name, "tree": tree, "timing": added})
  return out
