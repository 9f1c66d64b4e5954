"""Linear probe sweep: recovers a planted direction at the planted layer only; splits keep pairs together."""
import numpy as np
import pytest

from probes import linear


def test_probe_sweep_recovers_planted_layer():
  rng = np.random.default_rng(0)
  L1, P, D, planted = 5, 60, 16, 3
  y = np.array([1] * P + [0] * P)
  groups = np.concatenate([np.arange(P), np.arange(P)])
  acts = rng.normal(size=(L1, 2 * P, D)).astype(np.float32)
  u = rng.normal(size=D)
  u /= np.linalg.norm(u)
  acts[planted] += (3.0 * (2 * y - 1))[:, None] * u[None, :]      # +-3 sigma along u at the planted layer
  out = linear.probe_sweep(acts, y, groups, l2s=[1e-3, 1e-1], seeds=[0, 1, 2], steps=200)
  assert out["acc"].shape == (L1, 3) and out["grid/test_acc"].shape == (L1, 2, 3)
  assert int(out["acc_mean"].argmax()) == planted
  assert out["acc_mean"][planted] > 0.95 and out["auc_mean"][planted] > 0.99
  others = np.delete(out["acc_mean"], planted)
  assert others.max() < 0.75                                        # chance elsewhere (36 test rows)
  assert np.all((out["ece"] >= 0) & (out["ece"] <= 1))


def test_group_splits_keep_pairs_together():
  groups = np.repeat(np.arange(10), 2)
  s = linear.group_splits(groups, [0, 1], (0.6, 0.2, 0.2))
  assert s.shape == (2, 20)
  for row in s:
    assert np.all(row[0::2] == row[1::2])
    assert np.bincount(row, minlength=3).tolist() == [12, 4, 4]
  assert not np.array_equal(s[0], s[1])
  with pytest.raises(ValueError, match="cannot split"):
    linear.group_splits(np.arange(2), [0])
