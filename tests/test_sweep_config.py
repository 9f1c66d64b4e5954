"""configs/sweep.py's presets as probes.sweep_config.SweepConfig: every preset converts, a bad value fails with one
line naming the field, and probes.sweep.run refuses an unconverted ConfigDict."""
import dataclasses

import pytest

from configs.sweep import PRESETS, get_config
from probes import sweep
from probes.sweep_config import SweepConfig
from train.typed_config import ConfigError, from_configdict, to_dict


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_converts_and_keeps_every_value(preset):
  cd = get_config(preset)
  c = from_configdict(SweepConfig, cd)
  hash(c)
  assert to_dict(c) == cd.to_dict()                   # every field set in the file, no value changed
  assert {f.name for f in dataclasses.fields(SweepConfig)} == set(cd.to_dict())


@pytest.mark.parametrize("field, value, message", [
    ("vector", "mean", "vector must be one of caa, pca"),
    ("method", "prefix", "method must be one of suffix, full"),
    ("behaviors", ["factual", "honesty"], "behaviors: unknown behavior 'honesty'"),
    ("memory_gib", 0.0, "memory_gib must be > 0"),
    ("probe_fractions", [0.5, 0.2, 0.2], "probe_fractions must be 3 non-negative fractions summing to 1"),
    ("screen_directions", 0, "screen_directions must be >= 1"),
    ("screen_directions", 2.5, "config.screen_directions: expected int"),
    ("exact_layers", [3, 3], "exact_layers must be distinct layer indices >= 0"),
    ("exact_alphas", [0.0, 4.0], "exact_alphas must be finite and non-zero"),
    ("q_level", 1.0, r"q_level must be in \(0, 1\)"),
    ("baseline_n", -1, "baseline_n must be >= 0"),
])
def test_a_bad_override_names_the_field(field, value, message):
  d = get_config("quick").to_dict()                   # a dict: the ConfigDict itself refuses a change of type
  d[field] = value
  with pytest.raises(ConfigError, match=message) as e:
    from_configdict(SweepConfig, d)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("section, key, value, message", [
    ("n_probes", "bias", 1, "n_probes.bias must be >= 2"),
    ("exact_controls", "covariance", 1, "exact_controls.covariance must be >= 2"),
    ("exact_controls", "shuffled", -1, "exact_controls.shuffled must be >= 0"),
    ("probe_pairs", "refusal", -2, "probe_pairs.refusal must be >= 1"),
    ("max_tokens", "toxicity", 0, "max_tokens.toxicity must be >= 1"),
])
def test_a_bad_per_behavior_value_names_the_field(section, key, value, message):
  cd = get_config("quick")
  cd[section][key] = value
  with pytest.raises(ConfigError, match=message):
    from_configdict(SweepConfig, cd)


def test_run_refuses_a_configdict():
  with pytest.raises(TypeError, match=r"from_configdict\(SweepConfig, c\)"):
    sweep.run(get_config("quick"), "/nonexistent/never-written")
