"""ml_collections ConfigDict -> frozen, typed dataclasses, once, at the entry point.

The flax examples' TrainConfig pattern: a study declares its configuration as frozen dataclasses (field names,
types and defaults; nested sections are dataclass-typed fields), the entry point converts the ConfigDict from
`configs/<study>.py` once with `from_configdict`, and library code takes the dataclass (or plain values), never
the ConfigDict. The conversion checks every field, so a misspelled override or a value of the wrong type fails
at start-up with one line naming the field (`config.benign.lr: expected float, got 'fast'`), not an hour in.

Supported field types: bool, int, float, str, None-able versions of those (`int | None`), tuple[X, ...],
tuple[X, Y], dict[str, X] (from a ConfigDict or dict; a hashable flax FrozenDict) and nested frozen dataclasses. Lists become tuples, so
every converted config is hashable and safe to close over in jitted code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from flax.core.frozen_dict import FrozenDict

T = TypeVar("T")


class ConfigError(ValueError):
  """A config field is unknown, missing or of the wrong type; the message names the field."""


def _as_mapping(cd: Any, where: str) -> dict[str, Any]:
  if hasattr(cd, "to_dict"):
    return cd.to_dict()
  if isinstance(cd, dict):
    return dict(cd)
  raise ConfigError(f"{where}: expected a section (ConfigDict or dict), got {type(cd).__name__} {cd!r}")


def _convert(tp: Any, value: Any, where: str) -> Any:
  """`value` as type `tp`, or ConfigError naming `where`."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if dataclasses.is_dataclass(tp):
    return from_configdict(tp, value, where)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in (a for a in args if a is not type(None)):
      try:
        return _convert(a, value, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a tuple, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if origin is dict:
    kt, vt = args
    return FrozenDict({_convert(kt, k, where): _convert(vt, v, f"{where}.{k}")
                       for k, v in _as_mapping(value, where).items()})
  if tp is Any:
    return _freeze(value)
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where}: expected bool, got {type(value).__name__} {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
    return value
  raise TypeError(f"{where}: field type {tp!r} is not supported by train.typed_config")


def _freeze(value: Any) -> Any:
  """Lists -> tuples and mappings -> FrozenDicts, recursively (an `Any` field stays hashable)."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, dict) or hasattr(value, "to_dict"):
    return FrozenDict({k: _freeze(v) for k, v in _as_mapping(value, "").items()})
  return value


def from_configdict(cls: type[T], cd: Any, where: str = "config") -> T:
  """Build the frozen dataclass `cls` from a ConfigDict (or dict, or an instance of `cls`, returned as is).

  Every key of `cd` must be a field of `cls` and every field without a default must be present; values are
  checked against the field types (module docstring) and nested sections converted recursively.
  Raises ConfigError (a ValueError) naming the first bad field, e.g. `config.benign.steps`.
  """
  if isinstance(cd, cls):
    return cd
  data = _as_mapping(cd, where)
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
  kw = {}
  for name, f in fields.items():
    if name in data:
      kw[name] = _convert(hints[name], data[name], f"{where}.{name}")
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      raise ConfigError(f"{where}.{name}: missing")
  try:
    return cls(**kw)
  except (ValueError, TypeError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
  """A converted config as plain JSON-able values (dicts, lists), for config.json."""
  if dataclasses.is_dataclass(obj):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, (dict, FrozenDict)):
    return {k: to_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_dict(v) for v in obj]
  return obj


def replace(obj: T, **changes: Any) -> T:
  """A copy of the converted config `obj` with dotted fields changed, re-checked like `from_configdict`:
  `replace(c, **{"safety.lora.rank": 16, "seeds": (1,)})`. Raises ConfigError naming a bad field."""
  data = to_dict(obj)
  for path, value in changes.items():
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
      if not isinstance(node.get(p), dict):
        raise ConfigError(f"config.{path}: unknown field")
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"config.{path}: unknown field")
    node[leaf] = to_dict(value)
  return from_configdict(type(obj), data)
