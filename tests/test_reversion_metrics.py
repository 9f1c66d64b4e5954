"""Reversion metrics against closed forms and scipy: planted alignment, the Beta and covariance-shaped nulls, the
block/push objectives, the seed-level statistics."""
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


def _anisotropic(L=3, D=48, P=400, seed=0):
  """Activations `[L, P, D]` with a few high-variance directions (the shape of a real residual stream) and a
  v_rev that lives in them; the true covariance's square root per layer `[L, D, D]`."""
  rng = np.random.default_rng(seed)
  scales = np.where(np.arange(D) < 4, 12.0, 1.0)
  rot = np.stack([np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(L)])
  root = rot * scales[None, None, :]                                     # Sigma_l = root root^T
  acts = np.einsum("lde,lpe->lpd", root, rng.standard_normal((L, P, D))) + 5.0
  v_rev = np.stack([rot[l][:, 0] + 0.3 * rot[l][:, 1] for l in range(L)])
  v_rev[0] = 0.0                                                         # a layer the safety LoRA did not adapt
  return acts, v_rev, root


def test_covariance_null_is_above_the_isotropic_one_and_calibrated():
  """A planted anisotropic null drift (d ~ N(0, Sigma_l), no reversion at all): its alignment with a v_rev in
  the high-variance subspace exceeds the isotropic p99 most of the time, and the covariance-shaped p99 (estimated
  from 400 activations, not the true Sigma) at most about the nominal 1%."""
  acts, v_rev, root = _anisotropic()
  L, _, D = acts.shape
  null = R.covariance_null(acts, v_rev, 4000, 0.99, seed=1)
  iso = R.null_cos_quantile(L * D, 0.99)
  assert null["all_p99"] > 3 * iso
  assert np.isnan(null["layer_p99"][0]) and (null["layer_p99"][1:] > R.null_cos_quantile(D, 0.99)).all()
  rng = np.random.default_rng(2)
  d = np.einsum("lde,nle->nld", root, rng.standard_normal((4000, L, D)))          # true-null drifts
  cos = np.einsum("nld,ld->n", d, v_rev) / (np.linalg.norm(d.reshape(4000, -1), axis=1) * np.linalg.norm(v_rev))
  fpr_cov, fpr_iso = np.mean(cos > null["all_p99"]), np.mean(cos > iso)
  assert fpr_cov <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / 4000) + 0.005         # nominal, MC and estimation slack
  assert fpr_iso > 0.2                                                     # the isotropic null fails here
  # and a planted reversion (the drift is v_rev plus null noise) is found
  hit = np.einsum("nld,ld->n", d + 3 * v_rev[None] * np.linalg.norm(root[1], 2), v_rev)
  assert np.mean(hit / (np.linalg.norm((d + 3 * v_rev[None] * np.linalg.norm(root[1], 2)).reshape(4000, -1),
                                       axis=1) * np.linalg.norm(v_rev)) > null["all_p99"]) > 0.8


def test_t_interval_and_permutation_match_scipy():
  x = np.array([0.31, 0.42, 0.25, 0.38, 0.33])
  t = R.t_interval(list(x) + [np.nan])                                   # NaN = unmeasured, dropped
  lo, hi = scipy.stats.t.interval(0.95, 4, loc=x.mean(), scale=scipy.stats.sem(x))
  assert t["n"] == 5 and np.isclose(t["sd"], x.std(ddof=1)) and np.isclose(t["ci_low"], lo) and np.isclose(
      t["ci_high"], hi)
  assert np.isnan(R.t_interval([0.4])["ci_low"])                         # one seed: no CI
  a, b = np.array([0.6, 0.7, 0.65, 0.72, 0.69]), np.array([0.1, 0.05, 0.2, 0.12, 0.08])
  p = R.seed_permutation(a, b)
  # 5 vs 5 fully separated: exact two-sided p = 2 / C(10, 5)
  assert np.isclose(p["p"], 2 / 252) and np.isclose(p["diff"], a.mean() - b.mean())
  assert np.isnan(R.seed_permutation([1.0, 1.0], [1.0, 1.0])["p"])        # degenerate: undefined


def test_partial_correlation_finds_a_planted_association_and_holds_its_level():
  rng = np.random.default_rng(0)
  cells, seeds = 6, 5
  effect = rng.normal(0, 5, (cells, 1))                                  # arm / step effects shared by x and y
  x = effect + rng.normal(size=(cells, seeds))
  planted = R.partial_correlation(x, 2 * effect + 0.8 * (x - effect) + 0.3 * rng.normal(size=(cells, seeds)),
                                  n_perm=999)
  assert planted["r"] > 0.8 and planted["p"] < 0.01
  # null: y shares the cell effects (a raw correlation would be ~1) but not the seed-level variation
  ps = [R.partial_correlation(x := effect + rng.normal(size=(cells, seeds)),
                              3 * effect + rng.normal(size=(cells, seeds)), n_perm=199, seed=i)["p"]
        for i in range(200)]
  assert np.mean(np.asarray(ps) < 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200)
  assert "undefined" in R.partial_correlation(np.ones((3, 4)), rng.normal(size=(3, 4)))["reason"]


def test_welch_difference_matches_the_closed_form():
  from analysis.stats import welch_difference
  a, b = np.array([0.61, 0.70, 0.66, 0.72]), np.array([0.10, 0.31, 0.22])
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = np.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))     # Welch-Satterthwaite
  t = (a.mean() - b.mean()) / se
  r = welch_difference(list(a) + [np.nan], b)                                 # NaN = unmeasured, dropped
  half = scipy.stats.t.ppf(0.975, df) * se
  assert r["n_a"] == 4 and np.isclose(r["diff"], a.mean() - b.mean())
  assert np.isclose(r["p"], 2 * scipy.stats.t.sf(abs(t), df))
  assert np.isclose(r["ci_low"], r["diff"] - half) and np.isclose(r["ci_high"], r["diff"] + half)
  assert np.isnan(welch_difference([0.5], b)["p"])                           # one run: undefined
  assert np.isnan(welch_difference([1.0, 1.0], [1.0, 1.0])["ci_low"])          # no spread: undefined


def test_bh_q_matches_scipy_and_leaves_undefined_tests_out():
  from analysis.stats import bh_q
  p = np.array([0.01, np.nan, 0.04, 0.03, 0.20])
  q = bh_q(p)
  assert np.isnan(q[1])
  np.testing.assert_allclose(q[[0, 2, 3, 4]], scipy.stats.false_discovery_control(p[[0, 2, 3, 4]], method="bh"))
  np.testing.assert_allclose(q[[0, 2, 3, 4]], [0.04, 0.16 / 3, 0.16 / 3, 0.20])        # by hand: min_{j>=k} p_(j) m / j
  assert np.isnan(bh_q([np.nan])).all()


def test_arm_colors_distinct_for_every_smollm2_arm():
  """The lambda sweep's arms used to fall back to matplotlib's cycle and share the baseline's blue."""
  from analysis.reversion import plots
  arms = ["baseline", "block", "push", "project", "control", "block_lam0.3", "block_lam3"]
  colors = plots.arm_colors(arms)
  assert len(set(colors.values())) == len(arms)
  assert colors["baseline"] == "C0" and colors["block"] == "C2" and colors["control"] == "C7"
  assert colors["block_lam0.3"] == "C1" and colors["block_lam3"] == "C5"


def test_curves_lines_and_bands_share_distinct_colors():
  """Every arm of the curves figure (reversion arms and avoid-red windows alike) gets its own colour, and its
  interval band the colour of its line."""
  import matplotlib.colors as mcolors
  from matplotlib.collections import PolyCollection
  from analysis.reversion import plots
  rng = np.random.default_rng(0)
  arms = ["baseline", "block", "block_lam0.3", "kill", "early"]
  align = {a: rng.normal(0.5, 0.05, (3, 4)) for a in arms}
  harm = {a: rng.uniform(0.2, 0.4, (3, 2)) for a in arms}
  fig = plots.curves(np.arange(1, 5), align, 0.02, np.array([0, 4]), harm, "log-prob", "t")
  ax = fig.axes[0]
  lines = [mcolors.to_hex(l.get_color()) for l in ax.get_lines() if l.get_label() in arms]
  bands = [mcolors.to_hex(c.get_facecolor()[0]) for c in ax.collections if isinstance(c, PolyCollection)]
  assert len(set(lines)) == len(arms)
  assert bands[:len(arms)] == lines
