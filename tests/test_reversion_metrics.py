"""Reversion metrics against closed forms: planted alignment, the Beta null, the block/push objectives."""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from analysis.reversion import metrics as R
from models import readout
from train import losses


def test_alignment_of_planted_drift_equals_the_cosine():
  rng = np.random.default_rng(0)
  L1, D = 4, 16
  aligned = rng.normal(size=(L1, D))
  v = rng.normal(size=(L1, D))
  theta = np.array([0.0, np.pi / 3, np.pi / 2, np.pi])      # planted angles to v_rev
  drift = np.zeros((L1, D))
  for l in range(L1):
    u = v[l] / np.linalg.norm(v[l])
    w = rng.normal(size=D)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    drift[l] = 2.5 * (np.cos(theta[l]) * u + np.sin(theta[l]) * w)
  a = R.alignment(jnp.asarray(aligned + drift), jnp.asarray(aligned), jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(a), np.cos(theta), atol=1e-5)


def test_mean_activation_positions():
  r = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)
  mask = np.array([[0, 1, 1], [1, 1, 1]])
  last = readout.mean_activation(jnp.asarray(r), jnp.asarray(mask), "last")
  np.testing.assert_allclose(np.asarray(last), r[:, :, -1].mean(1))
  mean = readout.mean_activation(jnp.asarray(r), jnp.asarray(mask), "mean")
  want = (r[:, 0, 1:].mean(1) + r[:, 1].mean(1)) / 2
  np.testing.assert_allclose(np.asarray(mean), want, rtol=1e-6)


def test_null_p99_matches_beta_quantile_and_sampling():
  for d in (3, 64, 576):
    q = R.null_cos_quantile(d, 0.99)
    assert np.isclose(q, 2 * scipy.stats.beta.ppf(0.99, (d - 1) / 2, (d - 1) / 2) - 1)
    samples = R.null_cos_samples(d, 200_000, seed=d)
    assert abs(np.quantile(samples, 0.99) - q) < 0.01 * max(q, 0.05) + 2e-3
  # d = 3: cos is uniform on [-1, 1] (Archimedes), so p99 = 0.98
  assert np.isclose(R.null_cos_quantile(3, 0.99), 0.98)
  # large d: approximately N(0, 1/d), p99 ~ 2.326 / sqrt(d)
  assert abs(R.null_cos_quantile(10_000) - 2.3263 / 100) < 5e-4


def test_block_and_push_objectives():
  rng = np.random.default_rng(1)
  aligned, v = jnp.asarray(rng.normal(size=(3, 8))), jnp.asarray(rng.normal(size=(3, 8)))
  u = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  forward_move = aligned + 0.7 * u
  backward_move = aligned - 0.7 * u
  assert float(losses.block_loss(forward_move, aligned, v, 0.0)) == 0.0
  np.testing.assert_allclose(float(losses.projection_on_vrev(forward_move, aligned, v)), 0.7, rtol=1e-6)
  np.testing.assert_allclose(float(losses.block_loss(forward_move, aligned, v, 2.0)), 2.0 * 0.49, rtol=1e-6)
  assert float(losses.block_loss(backward_move, aligned, v, 2.0)) == 0.0      # only positive motion is opposed
  g = jax.grad(lambda m: losses.block_loss(m, aligned, v, 1.0))(forward_move)
  assert float(jnp.sum(g * u)) > 0                                    # descent moves back against v_rev
  g = jax.grad(lambda m: losses.push_loss(m, aligned, v, 1.0))(forward_move)
  assert float(jnp.sum(g * u)) < 0                                    # descent moves further along v_rev
  assert abs(float(losses.push_loss(aligned + 100 * u, aligned, v, 1.0, scale=2.0))) <= 2.0


def test_spearman_matches_scipy_and_known_case():
  r, p = R.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
  assert np.isclose(r, 0.8207826816681233)
  assert np.isclose(R.spearman([1, 2, 3], [3, 2, 1])[0], -1.0)
