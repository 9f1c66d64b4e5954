"""Config-checked resume: a run resumed into a directory that holds checkpoints must have the config it started
with, field for field, except fields that cannot change its results.

Every run directory keeps its config (`config.json`, and the train config inside each orbax checkpoint's
metadata). When a run starts where checkpoints exist, `check_resume` compares the two flattened configs:

- a difference in a field that alters results (model, data, optimiser, LoRA, seeds, arms, sizes: everything
  not listed below) is refused, naming each field with its old and new value; start a new workdir instead;
- a difference only in fields that do not (`NEUTRAL_LEAVES`: progress bars, logging / evaluation cadence,
  checkpoint keeping, multi-host addresses; the `export` section) is refused too unless the run is started with
  `--config.resume=force`, so that nothing changes silently;
- `stop_after` (`FREE_LEAVES`: how far this invocation goes, the way a run is stopped and continued) may always
  differ.
"""
from __future__ import annotations

from typing import Any, Iterable

NEUTRAL_LEAVES = frozenset({
    "progress", "log_every", "save_every", "max_to_keep", "checkpoint_dir", "eval_every",
    "distributed", "coordinator_address", "num_processes", "process_id", "capture_batch_size",
    "memory_gib", "fsdp", "tensor",           # vmap chunk and mesh shape: the same numbers up to float rounding
})
FREE_LEAVES = frozenset({"stop_after", "resume"})
NEUTRAL_SECTIONS = frozenset({"export"})
MODES = ("check", "force")


class ResumeConfigError(ValueError):
  """Resuming with a config that differs from the saved one; the message names the fields."""


def flatten(d: Any, prefix: str = "config") -> dict[str, Any]:
  """`{"config.a.b": leaf}` of a nested dict (lists compared as lists, tuples as lists)."""
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}.{k}"))
    return out
  return {prefix: list(d) if isinstance(d, tuple) else d}


def _neutral(path: str) -> bool:
  parts = path.split(".")
  return parts[-1] in NEUTRAL_LEAVES or any(p in NEUTRAL_SECTIONS for p in parts[1:-1])


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, old value, new value) of every leaf that differs (a missing leaf is `<absent>`), sorted."""
  a, b = flatten(old), flatten(new)
  missing = "<absent>"
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)]


def _describe(diffs: Iterable[tuple[str, Any, Any]]) -> str:
  return "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs)


def check_resume(old: dict[str, Any], new: dict[str, Any], mode: str, where: str) -> list[tuple[str, Any, Any]]:
  """Compare the saved config `old` with the new one before resuming from the checkpoints in `where`.

  mode: "check" refuses any difference; "force" accepts differences in NEUTRAL fields only.
  Returns the accepted (neutral) differences. Raises ResumeConfigError naming the differing fields, or
  ValueError for an unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"config.resume must be one of {MODES}, got {mode!r}")
  diffs = [d for d in differences(old, new) if d[0].split(".")[-1] not in FREE_LEAVES]
  fixed = [d for d in diffs if not _neutral(d[0])]
  if fixed:
    raise ResumeConfigError(
        f"{where} holds checkpoints of a run with a different config ({_describe(fixed)}); these fields alter "
        f"results, so the run cannot resume: use a new --workdir, or delete the checkpoints to restart")
  if diffs and mode != "force":
    raise ResumeConfigError(
        f"{where} holds checkpoints of a run with a different config ({_describe(diffs)}); these fields do not "
        f"alter results: pass --config.resume=force to resume with them")
  return diffs


def check_mode(mode: str) -> None:
  """Raise ValueError unless `mode` (a config's `resume` field) is one of MODES."""
  if mode not in MODES:
    raise ValueError(f"resume must be one of {MODES}, got {mode!r}")
