"""The calibrated kill-zone test (probes.killtest), its controls (probes.controls) and the first-order screen
(probes.screen): planted nulls must flag at most the nominal rate, planted effects must be found."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.interventions import resid_add_at
from models.params import init_params
from models.transformer import forward
from probes import controls, killtest, screen, steering
from probes.tasks import Task

CFG = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)
ALPHAS = (-4.0, 2.0, 4.0)


def margin(logits, arrays=None):
  """Per-probe score of the tests: log-prob margin of token 3 over token 5 at the last position."""
  lp = jax.nn.log_softmax(logits, axis=-1)
  return lp[:, 3] - lp[:, 5]


def _synthetic_grid(rng, *, T=5, L=12, K=16, N=50, tau=0.03, sigma=0.15, plant=None):
  """Per-probe scores of a grid where every direction j of a cell moves all probes by e_j ~ N(0, tau^2) (a
  direction-level effect) plus per-probe noise N(0, sigma^2); the behavior vector is direction 0. `plant`:
  (behavior, layers, effect per unit alpha) added to the behavior vector's e_0 for alpha > 0."""
  A = len(ALPHAS)
  base = [rng.normal(0.5, 0.2, N) for _ in range(T)]
  e = rng.normal(0.0, tau, (T, L, A, 1 + K))
  if plant is not None:
    t, layers, per_alpha = plant
    for j, a in enumerate(ALPHAS):
      if a > 0:
        e[t, layers, j, 0] += per_alpha * a
  scores = [b + e[t][..., None] + rng.normal(0.0, sigma, (L, A, 1 + K, N)) for t, b in enumerate(base)]
  return base, [s[:, :, 0] for s in scores], [s[:, :, 1:] for s in scores]


def _run(base, steered, ctrl, threshold=0.0):
  names = [f"b{t}" for t in range(len(base))]
  return killtest.kill_zone_test(base, steered, ctrl, names, list(range(steered[0].shape[0])), ALPHAS,
                                 threshold=threshold, n_boot=0)


def test_null_sweeps_flag_at_most_the_nominal_rate():
  """400 null grids (5 behaviors x 12 layers x 3 alphas = 180 cells each, K = 16, N = 50, no size threshold):
  the share of sweeps reporting any kill zone must be <= 5%."""
  rng = np.random.default_rng(0)
  any_zone = [bool(_run(*_synthetic_grid(rng))["kill_zones"]) for _ in range(400)]
  rate = float(np.mean(any_zone))
  print(f"null sweeps with a kill zone: {rate:.4f}")
  assert rate <= 0.05


def _old_band_rule(delta, ctrl, std_floor=0.02, band_z=2.0):
  """The rule gravlab used before the calibrated test (removed probes/killzones.py): a cell is killed when its
  delta lies below mean - band_z sd of K controls (sd ddof 1, floored at std_floor), widened to every control;
  delta `[...]`, ctrl `[..., K]`."""
  sd = np.maximum(ctrl.std(-1, ddof=1), std_floor)
  return delta < np.minimum(ctrl.mean(-1) - band_z * sd, ctrl.min(-1))


def test_the_old_band_rule_fails_the_same_calibration():
  """The calibration can fail: the previous rule (K = 2 isotropic controls, sd floored at 0.02, no correction
  across cells) flags most of the same null sweeps."""
  rng = np.random.default_rng(0)
  flagged = []
  for _ in range(100):
    base, steered, ctrl = _synthetic_grid(rng, K=2)
    killed = [_old_band_rule((s - b).mean(-1), (c - b).mean(-1)) for b, s, c in zip(base, steered, ctrl)]
    flagged.append(bool(np.any(killed)))
  rate = float(np.mean(flagged))
  print(f"old rule, null sweeps with a kill zone: {rate:.2f}")
  assert rate > 0.5


def test_planted_drop_is_found():
  """A drop of 0.05 per unit alpha (-0.1 at alpha 2, -0.2 at alpha 4; control sd 0.03 plus probe noise) at
  layers 4-6 of one behavior is found in >= 80% of 200 sweeps, with the threshold 0.1."""
  rng = np.random.default_rng(1)
  found = []
  for _ in range(200):
    res = _run(*_synthetic_grid(rng, plant=(0, [4, 5, 6], -0.05)), threshold=0.1)
    found.append(any(z["behavior"] == "b0" and z["alpha"] == 4.0 and set(z["layers"]) & {4, 5, 6}
                     for z in res["kill_zones"]))
  power = float(np.mean(found))
  print(f"power at a planted drop of -0.2 (alpha 4): {power:.3f}")
  assert power >= 0.8


def test_prediction_interval_p_is_uniform_under_the_null_and_undefined_without_spread():
  rng = np.random.default_rng(2)
  d = rng.normal(size=(40000, 9))
  pv = killtest.cell_p_values(d[:, 0], d[:, 1:])
  assert abs(np.mean(pv["p"] <= 0.05) - 0.05) < 0.006
  assert np.mean(pv["p_rank"] <= 0.2) <= 0.2 + 0.006        # 2 min(rank) / 9: P(p_rank <= 0.2) = 2/9 - 0
  flat = killtest.cell_p_values(np.array([0.3]), np.zeros((1, 8)))
  assert np.isnan(flat["p"][0]) and np.isnan(flat["t"][0])     # undefined, not infinitely significant


def test_paired_ci_covers_the_mean_at_the_nominal_rate():
  rng = np.random.default_rng(3)
  cover = []
  for i in range(300):
    diff = rng.normal(0.2, 1.0, 40)
    lo, hi = killtest.paired_ci(diff, 999, i)
    cover.append(lo <= 0.2 <= hi)
  assert 0.90 <= np.mean(cover) <= 0.98
  assert killtest.paired_ci(np.full(10, 0.5), 999, 0) == (0.5, 0.5)


def test_zones_need_significance_size_and_dose_response():
  N, K = 40, 16
  rng = np.random.default_rng(4)
  base = [np.zeros(N)]
  ctrl = [rng.normal(0.0, 0.01, (3, 3, K, 1)) + np.zeros((3, 3, K, N))]
  delta = np.zeros((3, 3))
  delta[1, 2] = -0.3                      # layer 1, alpha 4: big drop, but alpha 2 (the next smaller) is flat
  delta[2, 1:] = -0.3                     # layer 2: drops at alpha 2 and 4
  steered = [delta[..., None] + np.zeros((3, 3, N))]
  res = killtest.kill_zone_test(base, steered, ctrl, ["b"], [0, 1, 2], ALPHAS, threshold=0.1, n_boot=0)
  assert res["significant"][0, 1, 2] and not res["dose_response"][0, 1, 2] and not res["killed"][0, 1, 2]
  assert res["killed"][0, 2, 2] and not res["killed"][0, 2, 1]          # alpha 2 has no smaller positive alpha
  assert res["kill_zones"] == [{"behavior": "b", "alpha": 4.0, "layers": [2], "min_delta": -0.3, "worst_layer": 2,
                                "max_q": pytest.approx(res["q"][0, 2, 2])}]


def _probes(n=24, s=8, seed=0):
  rng = np.random.default_rng(seed)
  toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (n, s)), jnp.int32)
  return toks, jnp.ones((n, s), jnp.int32)


def _margin_task(toks, mask) -> Task:
  """A choice task whose per-probe score (probes.margins: correct minus best other option) is `margin`."""
  n = toks.shape[0]
  return Task("bias", np.asarray(toks), np.asarray(mask), np.zeros(n, np.int32), np.tile([[3, 5]], (n, 1)), n)


def _exact(params, toks, mask, layers, dirs, alphas, method="suffix"):
  """steering.steering_sweep's per-probe scores `[L', A, M, N]` and base `[N]` of `_margin_task`."""
  res = steering.steering_sweep(params, CFG, [_margin_task(toks, mask)], dirs, layers, alphas, method=method,
                                per_probe=True)
  return res["scores"][0], res["baseline"][0]


def test_tiny_model_null_with_a_control_as_the_behavior_vector():
  """On a tiny random model, 60 sweeps (3 layers x 3 alphas, K = 8) whose 'behavior vector' is one more isotropic
  control: at most 5% report a kill zone."""
  params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)
  toks, mask = _probes()
  n_sims, K = 60, 8
  norms = jnp.full((3,), 2.0)
  dirs = controls.isotropic(jax.random.PRNGKey(1), norms, n_sims * (1 + K), CFG.d_model)
  sc, base = _exact(params, toks, mask, [0, 1, 2], dirs, ALPHAS)
  np.testing.assert_allclose(base, np.asarray(margin(forward(params, toks, CFG, attention_mask=mask,
                                                              logits="last")[0])), rtol=1e-5, atol=1e-5)
  sc = sc.reshape(3, 3, n_sims, 1 + K, -1)
  flagged = [bool(_run([base], [sc[:, :, i, 0]], [sc[:, :, i, 1:]])["kill_zones"]) for i in range(n_sims)]
  assert np.std(sc[:, :, :, 1:].mean(-1)) > 1e-3            # the directions do move the scores
  print(f"tiny model, null sweeps with a kill zone: {np.mean(flagged):.3f}")
  assert np.mean(flagged) <= 0.05


@pytest.mark.parametrize("method", ["suffix", "full"])
def test_exact_scores_equal_a_direct_forward(method):
  """The sweep program's per-probe scores, with directions shared or per task, equal a direct steered forward."""
  params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)
  toks, mask = _probes(6)
  dirs = controls.isotropic(jax.random.PRNGKey(2), jnp.ones(2), 3, CFG.d_model)
  sc, _ = _exact(params, toks, mask, [1, 3], dirs, [2.0], method)
  ref = margin(forward(params, toks, CFG, attention_mask=mask, logits="last",
                       interventions=resid_add_at(CFG.n_layers, 3, 2.0 * dirs[1, 2]))[0])
  np.testing.assert_allclose(sc[1, 0, 2], np.asarray(ref), rtol=1e-5, atol=1e-5)
  task = _margin_task(toks, mask)
  other = jnp.stack([dirs, -dirs], axis=1)                  # [L', 2 tasks, M, D]: task 1 gets the negated directions
  res = steering.steering_sweep(params, CFG, [task, task], other, [1, 3], [2.0], method=method, per_probe=True)
  np.testing.assert_allclose(res["scores"][0], sc, rtol=1e-5, atol=1e-5)
  ref_neg = margin(forward(params, toks, CFG, attention_mask=mask, logits="last",
                           interventions=resid_add_at(CFG.n_layers, 3, -2.0 * dirs[1, 2]))[0])
  np.testing.assert_allclose(res["scores"][1][1, 0, 2], np.asarray(ref_neg), rtol=1e-5, atol=1e-5)


def test_gradient_screen_matches_finite_differences():
  params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)
  toks, mask = _probes(6, seed=5)
  g = screen.score_gradients(params, CFG, {"tokens": toks, "mask": mask}, margin)
  dirs = controls.isotropic(jax.random.PRNGKey(3), jnp.ones(CFG.n_layers), 4, CFG.d_model)
  dd = np.asarray(screen.directional_derivatives(g, dirs))                      # [L, M, B]
  eps = 1e-2
  for layer, m in ((0, 1), (2, 3), (3, 0)):
    f = lambda a: np.asarray(margin(forward(params, toks, CFG, attention_mask=mask, logits="last",
                                            interventions=resid_add_at(CFG.n_layers, layer, a * dirs[layer, m]))[0]),
                             np.float64)
    fd = (f(eps) - f(-eps)) / (2 * eps)
    np.testing.assert_allclose(dd[layer, m], fd, rtol=2e-2, atol=2e-3)
  assert np.abs(dd).max() > 1e-2


def test_screen_p_is_exact_under_exchangeability():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(4000, 200, 5))                  # 4000 independent "layers", 1 + 199 directions, 5 probes
  res = screen.screen(x[:, 0], x[:, 1:])
  assert abs(np.mean(res["p"] <= 0.05) - 0.05) < 0.012
  assert res["n_controls"] == 199 and res["p"].min() >= 1 / 200


def test_controls_have_the_norm_and_live_where_the_activations_vary():
  rng = np.random.default_rng(7)
  L, N, D = 3, 10, 32
  basis = rng.normal(size=(L, 4, D))                    # activations in a 4-dimensional subspace per layer
  acts = jnp.asarray(np.einsum("lnk,lkd->lnd", rng.normal(size=(L, N, 4)), basis), jnp.float32)
  norms = jnp.asarray([1.0, 2.0, 5.0])
  q = np.linalg.qr(np.transpose(basis, (0, 2, 1)))[0]                            # [L, D, 4]
  off = lambda v: np.linalg.norm(v - np.einsum("ldk,lmk->lmd", q, np.einsum("ldk,lmd->lmk", q, v)), axis=-1)
  cov = np.asarray(controls.controls("covariance", jax.random.PRNGKey(0), norms, 50, acts=acts))
  iso = np.asarray(controls.controls("isotropic", jax.random.PRNGKey(0), norms, 50, acts=acts))
  np.testing.assert_allclose(np.linalg.norm(cov, axis=-1), np.broadcast_to(norms[:, None], (L, 50)), rtol=1e-5)
  assert off(cov).max() < 1e-4 * 5 and off(iso).mean() > 0.8            # in the span vs mostly outside it
  pos, neg = acts, acts[:, ::-1] * 0.5
  shuf = np.asarray(controls.controls("shuffled", jax.random.PRNGKey(1), norms, 50, pos=pos, neg=neg))
  assert np.allclose(np.linalg.norm(shuf, axis=-1), np.asarray(norms)[:, None], rtol=1e-5)
  assert off(shuf).max() < 1e-4 * 5
  with pytest.raises(ValueError, match="need the activations"):
    controls.controls("covariance", jax.random.PRNGKey(0), norms, 5)


def test_probe_gradients_map_rows_to_paired_probes_exactly():
  """sweep_screen.probe_gradients (row batches of 3 over 8 rows, the last padded) gives each factual probe's
  d margin / d alpha: the finite difference of probes.margins.probe_scores (true row minus false row)."""
  from probes import margins, sweep_screen, tasks as tasks_lib
  params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)
  toks, mask = _probes(8, seed=9)
  task = tasks_lib.Task("factual", np.asarray(toks), np.asarray(mask), np.asarray([0] * 4 + [1] * 4, np.int32),
                        np.zeros((8, 0), np.int32), 4)
  g = sweep_screen.probe_gradients(params, CFG, task, 3)                         # [L, 4, D]
  v = controls.isotropic(jax.random.PRNGKey(4), jnp.ones(CFG.n_layers), 1, CFG.d_model)[:, 0]
  d = np.asarray(jnp.einsum("lnd,ld->ln", g, v))
  arrays, eps = task.arrays(), 1e-2
  for layer in (0, 3):
    f = lambda a: np.asarray(margins.probe_scores("factual", forward(
        params, arrays["tokens"], CFG, attention_mask=arrays["mask"], logits="all",
        interventions=resid_add_at(CFG.n_layers, layer, a * v[layer]))[0], arrays), np.float64)
    np.testing.assert_allclose(d[layer], (f(eps) - f(-eps)) / (2 * eps), rtol=2e-2, atol=2e-3)


def test_screen_batches_sorted_by_length_and_trimmed_give_the_full_width_gradients():
  """sweep_screen.probe_gradients on left-padded rows of lengths 2..13 (batches of 3, widths a multiple of 4, so
  every batch drops padding columns; and with a token budget, batches of 2 or 4 rows) equals score_gradients of all
  rows at the set's full width, row for row; and batch_widths covers every row once, shortest first, with widths
  that hold their rows."""
  from probes import margins, sweep_screen, tasks as tasks_lib
  params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)
  rng = np.random.default_rng(3)
  lengths = rng.permutation(np.arange(2, 14))                                       # 12 rows, S = 13
  toks = rng.integers(1, CFG.vocab_size, (12, 13)).astype(np.int32)
  mask = (np.arange(13)[None, :] >= 13 - lengths[:, None]).astype(np.int32)
  task = tasks_lib.Task("refusal", toks * mask, mask, np.asarray([0] * 6 + [1] * 6, np.int32),
                        np.zeros((12, 0), np.int32), 6)
  batches = sweep_screen.batch_widths(lengths, 3, 13, 4)
  assert sorted(np.concatenate([idx[:n] for idx, n, _ in batches]).tolist()) == list(range(12))
  assert [w for *_, w in batches] == [4, 8, 12, 13]
  assert all(lengths[idx].max() <= w for idx, _, w in batches)
  with pytest.raises(ValueError, match="quantum 0"):
    sweep_screen.batch_widths(lengths, 3, 13, 0)
  g = np.asarray(sweep_screen.probe_gradients(params, CFG, task, 3, quantum=4))       # [L, 6, D]
  rows = screen.score_gradients(params, CFG, task.arrays(), sweep_screen.ROW_MEASURE["refusal"], "all")
  ref = np.asarray(jnp.moveaxis(margins.probe_margins("refusal", jnp.moveaxis(rows, 1, -1), task.arrays()["label"]),
                                -1, 1))
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
  # a token budget: the shortest rows run in a batch of 2 * 2 rows (4 rows x width 8 = 32 tokens), longer ones in 2s
  wide = sweep_screen.batch_widths(lengths, 2, 13, 4, tokens=32)
  assert [(n, w) for _, n, w in wide] == [(4, 8), (2, 8), (2, 12), (2, 12), (2, 13)]
  assert sorted(np.concatenate([idx[:n] for idx, n, _ in wide]).tolist()) == list(range(12))
  np.testing.assert_allclose(np.asarray(sweep_screen.probe_gradients(params, CFG, task, 2, quantum=4, tokens=32)),
                             ref, rtol=1e-4, atol=1e-6)
