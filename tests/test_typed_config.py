"""train.typed_config: ConfigDict -> frozen typed dataclasses, with one-line errors naming the field."""
from __future__ import annotations

import dataclasses
import json
import typing

import ml_collections
import pytest

from train import typed_config as tc


@dataclasses.dataclass(frozen=True)
class Inner:
  lr: float = 1e-3
  steps: int = 10
  targets: tuple[str, ...] = ("q", "v")


@dataclasses.dataclass(frozen=True)
class Outer:
  model: str
  inner: Inner = Inner()
  n: dict[str, int] = dataclasses.field(default_factory=dict)
  window: tuple[float, float] = (0.0, 1.0)
  layers: int | None = None
  flag: bool = False


def _cd(**kw):
  c = ml_collections.ConfigDict({"model": "m", "inner": {"lr": 2, "steps": 3, "targets": ["q", "k"]},
                                 "n": {"a": 1}, "window": [0.4, 1.0], "layers": None, "flag": True})
  c.update(kw)
  return c


def test_converts_and_freezes():
  c = tc.from_configdict(Outer, _cd())
  assert c == Outer("m", Inner(2.0, 3, ("q", "k")), {"a": 1}, (0.4, 1.0), None, True)
  assert isinstance(c.inner.lr, float) and c.inner.targets == ("q", "k") and c.n["a"] == 1
  hash(c)                                   # hashable: safe as a static argument / closure of jitted code
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.model = "x"
  assert json.loads(json.dumps(tc.to_dict(c)))["inner"]["targets"] == ["q", "k"]
  assert tc.from_configdict(Outer, c) is c


@pytest.mark.parametrize("patch, message", [
    ({"inner": {"lr": "fast"}}, "config.inner.lr: expected float, got str 'fast'"),
    ({"inner": {"stepz": 3}}, "config.inner.stepz: unknown field"),
    ({"inner": {"steps": 2.5}}, "config.inner.steps: expected int, got float 2.5"),
    ({"inner": {"steps": True}}, "config.inner.steps: expected int, got bool True"),
    ({"inner": {"targets": "q,v"}}, "config.inner.targets: expected a tuple, got str 'q,v'"),
    ({"window": [0.1]}, "config.window: expected 2 values, got 1"),
    ({"n": {"a": "1"}}, "config.n.a: expected int, got str '1'"),
    ({"flag": 1}, "config.flag: expected bool, got int 1"),
    ({"layers": "3"}, "config.layers: expected int, got str '3'"),
])
def test_bad_field_is_named(patch, message):
  d = _cd().to_dict()
  for k, v in patch.items():
    d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d[k], dict) else v
  with pytest.raises(tc.ConfigError) as e:
    tc.from_configdict(Outer, d)
  assert str(e.value).startswith(message)
  assert "\n" not in str(e.value)


def test_missing_field_and_post_init_errors():
  with pytest.raises(tc.ConfigError, match=r"^config\.model: missing$"):
    tc.from_configdict(Outer, {})

  @dataclasses.dataclass(frozen=True)
  class Checked:
    lr: float = 1.0

    def __post_init__(self):
      if not self.lr > 0:
        raise ValueError(f"lr must be > 0, got {self.lr}")
  with pytest.raises(tc.ConfigError, match=r"^config\.train: lr must be > 0, got -1.0$"):
    tc.from_configdict(Checked, {"lr": -1}, "config.train")


def test_replace_is_nested_and_rechecked():
  c = tc.from_configdict(Outer, _cd())
  r = tc.replace(c, **{"inner.steps": 7, "window": (0.0, 0.5)})
  assert (r.inner.steps, r.window, r.inner.lr, c.inner.steps) == (7, (0.0, 0.5), 2.0, 3)
  with pytest.raises(tc.ConfigError, match=r"^config\.inner\.steps: expected int"):
    tc.replace(c, **{"inner.steps": "7"})
  with pytest.raises(tc.ConfigError, match=r"^config\.inner\.nope: unknown field"):
    tc.replace(c, **{"inner.nope": 1})


def test_any_fields_are_frozen():
  @dataclasses.dataclass(frozen=True)
  class G:
    window: tuple[typing.Any, ...] = ()
  g = tc.from_configdict(G, {"window": ["kill", [0.1, 0.5]]})
  assert g.window == ("kill", (0.1, 0.5))
  hash(g)
