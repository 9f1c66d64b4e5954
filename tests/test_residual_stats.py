"""Residual-stream statistics against closed forms, and the atomic run-directory writers."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from analysis.residual_stats import mean_difference_separation, residual_stats
from train.rundir import Workdir, atomic_path, write_json


def test_residual_stats_closed_form():
  # boundary 0: e1 * 3 ; boundary 1: e1 * 3 + e2 * 4 (norm 5); one real token, one padding token
  r = np.zeros((2, 1, 2, 3), np.float32)
  r[0, 0, 1] = [3, 0, 0]
  r[1, 0, 1] = [3, 4, 0]
  r[:, 0, 0] = 1000.0   # padding: must be ignored by the masked statistics
  mask = np.array([[0, 1]])
  s = residual_stats(jnp.asarray(r), jnp.asarray(mask))
  np.testing.assert_allclose(s["norm_mean"], [3, 5], rtol=1e-6)
  np.testing.assert_allclose(s["norm_last"], [3, 5], rtol=1e-6)
  np.testing.assert_allclose(s["update_ratio"], [4 / 3], rtol=1e-6)
  np.testing.assert_allclose(s["cos_next"], [3 / 5], rtol=1e-6)
  np.testing.assert_allclose(s["max_abs"], [3, 4])
  np.testing.assert_array_equal(s["max_dim"], [0, 1])


def test_mean_difference_separation_closed_form():
  pos = np.array([[[2.0, 0], [4.0, 0]]])    # projections on e1: 2, 4 -> mean 3, var 1
  neg = np.array([[[0.0, 1], [0.0, -1]]])   # projections: 0, 0 -> mean 0, var 0
  s = mean_difference_separation(jnp.asarray(pos), jnp.asarray(neg))
  np.testing.assert_allclose(s["diff_norm"], [3.0], rtol=1e-6)
  np.testing.assert_allclose(s["d_prime"], [3.0 / np.sqrt(0.5)], rtol=1e-6)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / "out.json"
  with pytest.raises(RuntimeError):
    with atomic_path(str(target)) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == []
  write_json(str(target), {"a": np.float32(1.5)})
  assert json.loads(target.read_text()) == {"a": 1.5}


def test_workdir_writes_config_metrics_and_tensorboard(tmp_path):
  wd = Workdir(str(tmp_path / "run"), {"model": "x", "alpha": 4})
  wd.log(0, loss=1.0)
  wd.log(1, loss=0.5)
  wd.close()
  assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"model": "x", "alpha": 4}
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tb"))
