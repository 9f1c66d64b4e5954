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
