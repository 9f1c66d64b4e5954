"""Scores against independent references: scipy.stats for ranks / Spearman / Mann-Whitney, closed forms for ECE
and the per-row readouts, hand-computed behavior scores."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from probes import stats, tasks as tasks_lib


def test_spearman_matches_scipy_with_ties():
  x = np.array([0.61, 0.20, 0.20, 0.95, 0.44, 0.73, 0.44, 0.10])
  y = np.array([0.50, 0.31, 0.12, 0.88, 0.60, 0.60, 0.05, 0.22])
  np.testing.assert_allclose(stats.rankdata(jnp.asarray(x)), scipy.stats.rankdata(x))
  np.testing.assert_allclose(float(stats.spearman(jnp.asarray(x), jnp.asarray(y))),
                             scipy.stats.spearmanr(x, y).statistic, atol=1e-6)
  # valid mask: padded entries are ignored
  xp = np.concatenate([x, [9.0, -3.0]])
  yp = np.concatenate([y, [0.0, 7.0]])
  valid = np.array([True] * 8 + [False] * 2)
  np.testing.assert_allclose(float(stats.spearman(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(valid))),
                             scipy.stats.spearmanr(x, y).statistic, atol=1e-6)
  assert float(stats.spearman(jnp.ones(5), jnp.arange(5.0))) == 0.0      # undefined -> rho-eval's 0.0


def test_auc_matches_mann_whitney():
  rng = np.random.default_rng(0)
  s = np.round(rng.normal(size=30), 1)          # rounding creates ties
  lab = rng.random(30) < 0.4
  u = scipy.stats.mannwhitneyu(s[lab], s[~lab]).statistic
  np.testing.assert_allclose(float(stats.mann_whitney_auc(jnp.asarray(s), jnp.asarray(lab))),
                             u / (lab.sum() * (~lab).sum()), atol=1e-6)
  # hand case: pos {3, 1}, neg {2, 1}: pairs (3>2, 3>1, 1<2, 1=1) -> (1 + 1 + 0 + 0.5) / 4
  np.testing.assert_allclose(float(stats.mann_whitney_auc(jnp.array([3., 1., 2., 1.]),
                                                          jnp.array([True, True, False, False]))), 0.625)
  assert float(stats.mann_whitney_auc(jnp.array([1., 2.]), jnp.array([True, True]))) == 0.5


def test_ece_closed_form():
  conf = np.array([0.05, 0.15, 0.55, 0.58, 0.95, 1.0])
  correct = np.array([0, 1, 1, 0, 1, 1])
  # bins: [0,.1): {.05:0} -> |0-.05|; [.1,.2): {.15:1} -> |1-.15|; [.5,.6): {.55:1,.58:0} -> 2*|.5-.565|;
  # [.9,1]: {.95:1, 1.0:1} -> 2*|1-.975|
  expected = (0.05 + 0.85 + 2 * 0.065 + 2 * 0.025) / 6
  np.testing.assert_allclose(float(stats.ece(jnp.asarray(conf), jnp.asarray(correct))), expected, atol=1e-6)


def test_sequence_measures_closed_form():
  # one row, vocab 3, tokens [0, 1, 2] with the first position padding -> only the 1 -> 2 transition counts
  logits = jnp.asarray(np.log(np.array([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]])), jnp.float32)
  tokens = jnp.array([[0, 1, 2]])
  mask = jnp.array([[0, 1, 1]])
  np.testing.assert_allclose(float(tasks_lib.sequence_measure("factual", logits, tokens, mask)[0]), 0.8, rtol=1e-5)
  np.testing.assert_allclose(float(tasks_lib.sequence_measure("toxicity", logits, tokens, mask)[0]), np.log(0.8),
                             rtol=1e-5)
  mask = jnp.array([[1, 1, 1]])
  np.testing.assert_allclose(float(tasks_lib.sequence_measure("refusal", logits, tokens, mask)[0]),
                             (np.log(0.3) + np.log(0.8)) / 2, rtol=1e-5)


def test_behavior_scores_hand_cases():
  # factual: confidences of 3 true then 3 false statements -> Spearman of the two halves
  m = jnp.array([0.9, 0.5, 0.7, 0.3, 0.1, 0.2])
  np.testing.assert_allclose(float(tasks_lib.score_from_measure("factual", m, jnp.zeros(6))),
                             scipy.stats.spearmanr([0.9, 0.5, 0.7], [0.3, 0.1, 0.2]).statistic, atol=1e-6)
  # refusal: benign (label 0) log-probs {-1, -3} vs harmful {-2, -4}: pairs -1>-2, -1>-4, -3<-2, -3>-4 -> 0.75
  np.testing.assert_allclose(float(tasks_lib.score_from_measure("refusal", jnp.array([-1., -3., -2., -4.]),
                                                                jnp.array([0, 0, 1, 1]))), 0.75)
  # bias: restricted argmax over option tokens
  last = jnp.zeros((3, 10)).at[0, 4].set(2.0).at[1, 5].set(3.0).at[2, 9].set(5.0).at[2, 6].set(1.0)
  opts = jnp.array([[4, 5, 6]] * 3)
  correct = tasks_lib.choice_correct(last, opts, jnp.array([0, 0, 2]))
  np.testing.assert_array_equal(np.asarray(correct), [1.0, 0.0, 1.0])    # row 2: token 9 is not an option


class CharTokenizer:
  """Byte-level stand-in for a tokenizer: one id per character (+3), BOS 1 when add_special_tokens."""
  pad_token_id = 0
  eos_token_id = 2

  def encode(self, text, add_special_tokens=False):
    return ([1] if add_special_tokens else []) + [3 + (ord(c) % 90) for c in text]

  def decode(self, ids, skip_special_tokens=False):
    """Inverse of encode on printable ASCII (codes 90..121 come back as 90 + (code - 90) % 90)."""
    out = []
    for i in ids:
      if i < 3:
        if not skip_special_tokens:
          out.append(f"<{i}>")
        continue
      v = i - 3
      out.append(chr(v if v >= 32 else v + 90))
    return "".join(out)


def test_build_tasks_shapes_and_options():
  tok = CharTokenizer()
  fact = tasks_lib.build_task("factual", tok, [{"text": "abc", "false": "abde"}, {"text": "xy", "false": "xyz"}],
                              max_tokens=4)
  assert fact.tokens.shape == (4, 4) and fact.label.tolist() == [0, 0, 1, 1]
  assert fact.mask.sum(1).tolist() == [4, 3, 4, 4]       # "abde" -> BOS + 4 chars truncated to its first 4
  syc = tasks_lib.build_task("sycophancy", tok, [{"text": "Q?", "truthful_answer": "(B)",
                                                  "sycophantic_answer": "(A)"}])
  # shared prefix "Q? (" -> options are the letters B (truthful, label 0) and A
  assert syc.tokens[0].tolist() == tok.encode("Q? (", True) and syc.options.tolist() == [[3 + 66 % 90, 3 + 65]]
  with pytest.raises(ValueError, match="no distinct first token"):
    tasks_lib.choice_rows(tok, "Q", ["A", "AB"])
  with pytest.raises(ValueError, match="at least 2"):
    tasks_lib.build_task("toxicity", CharTokenizer(), [{"text": "", "is_toxic": True}])
