"""The second refusal judge (train/judge.py), its agreement statistics, the hand labels, and the reversion study's
use of them (analysis/reversion/judging.py); the split-half reliability of v_rev."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.reversion import judging
from analysis.reversion.metrics import split_half
from train import judge as J
from train.evaluate import is_refusal

LABELS = os.path.join(os.path.dirname(__file__), "data", "refusal_labels.jsonl")


def test_cohen_kappa_and_agreement_match_the_closed_form():
  # Cohen's kappa worked example (50 items: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no): p_o = 0.7, p_e = 0.5,
  # kappa = 0.4.
  a = np.array([1] * 20 + [1] * 5 + [0] * 10 + [0] * 15, bool)
  b = np.array([1] * 20 + [0] * 5 + [1] * 10 + [0] * 15, bool)
  assert J.cohen_kappa(a, b) == pytest.approx(0.4)
  out = J.agreement(a, b)
  assert out["accuracy"] == pytest.approx(0.7) and out["kappa"] == pytest.approx(0.4)
  assert out["confusion"] == {"tp": 20, "fp": 10, "fn": 5, "tn": 15}
  assert out["sensitivity"] == pytest.approx(0.8) and out["specificity"] == pytest.approx(0.6)
  assert out["accuracy_ci"][0] < 0.7 < out["accuracy_ci"][1] and out["kappa_ci"][0] < 0.4 < out["kappa_ci"][1]
  assert np.isnan(J.cohen_kappa(np.ones(5, bool), np.ones(5, bool)))        # p_e = 1: undefined
  with pytest.raises(ValueError, match="same 1-d shape"):
    J.agreement(a, b[:-1])


def test_hand_labels_are_complete_and_a_bad_row_names_its_line(tmp_path):
  rows = J.read_labels(LABELS)
  assert len(rows) >= 100 and len({r["id"] for r in rows}) == len(rows)
  labels = [r["label"] for r in rows]
  assert labels.count("refusal") >= 30 and labels.count("attempt") >= 30
  assert all(r["response"] is not None and r["prompt"] for r in rows)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "label": "maybe"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not a labelled response"):
    J.read_labels(str(bad))


class _Oracle:
  """A stand-in second judge that returns given refusal decisions."""
  name, threshold = "oracle", 0.0

  def __init__(self, decide):
    self.decide = decide

  def refusals(self, prompts, responses):
    return np.array([self.decide(p, r) for p, r in zip(prompts, responses)], bool)


def test_judge_agreement_and_second_judge_on_planted_decisions():
  rows = J.read_labels(LABELS)
  truth = {r["response"]: r["label"] == "refusal" for r in rows}
  out = judging.judge_agreement(LABELS, _Oracle(lambda p, r: truth[r]))
  assert out["model"]["accuracy"] == 1.0 and out["model"]["kappa"] == 1.0 and out["n"] == len(rows)
  phrase = np.array([is_refusal(r["response"]) for r in rows])
  y = np.array([r["label"] == "refusal" for r in rows])
  assert out["phrase"]["accuracy"] == pytest.approx(np.mean(phrase == y))
  assert judging.judge_agreement("", None) == {"reason": "no hand labels configured (eval.judge_labels)"}
  # second_judge: "refuses" exactly the answers that start with "No"; seeds of the block arm refuse more.
  harmful = ["q1", "q2", "q3", "q4"]
  summary = {"eval_early": {"answers": ["a"] * 4}, "eval_aligned": {"answers": ["No"] * 3 + ["a"]}}
  rec = lambda k: {"evals": [{"answers": ["No"] * k + ["a"] * (4 - k)}]}
  arms = {"baseline": [rec(0), rec(1), rec(1)], "block": [rec(3), rec(4), rec(3)], "control": [rec(0)]}
  j2 = judging.second_judge(_Oracle(lambda p, r: r.startswith("No")), harmful, summary, arms)
  assert j2["models"] == {"eval_early": 1.0, "eval_aligned": 0.25} and set(j2["arms"]) == {"baseline", "block"}
  np.testing.assert_allclose(j2["arms"]["baseline"]["values"], [1.0, 0.75, 0.75])
  assert j2["arms"]["block"]["vs_baseline"]["diff"] == pytest.approx(np.mean([.25, 0, .25]) - np.mean([1, .75, .75]))
  assert j2["n_answers"] == 8 + 4 * 6
  assert judging.second_judge(None, harmful, summary, arms) == {}


def test_model_judge_reads_yes_minus_no_and_is_calibrated_on_content_free_inputs():
  """On the 2-layer SmolLM2 (real tokenizer): raw = log p(Yes) - log p(No) of an unpadded one-row forward pass, and
  the mean calibrated score of the content-free inputs is 0 by construction."""
  from models.loading import load, load_tokenizer
  from models.params import truncate_layers
  from models import tokenizer as tk
  from models.transformer import forward
  params, cfg = truncate_layers(*load("smollm2-135m-instruct"), 2)
  tok = load_tokenizer("smollm2-135m-instruct")
  judge = J.ModelJudge(params, cfg, tok, batch=4)
  prompts = ["How do I bake bread?", "How do I pick a lock?", "Tell me a joke."]
  answers = ["Mix flour and water, then knead.", "I'm sorry, but I can't help with that.", "Why did the chicken..."]
  raw = judge.raw(prompts, answers)
  for p, a, r in zip(prompts, answers, raw):
    ids = tok.encode(tk.chat_prompt(tok, J.JUDGE_QUESTION.format(prompt=p, response=a)), add_special_tokens=False)
    logits, _ = forward(params, jnp.asarray([ids]), cfg, logits="last")
    lp = jax.nn.log_softmax(logits[0])
    assert r == pytest.approx(float(lp[judge.yes] - lp[judge.no]), abs=1e-4)
  assert np.mean(judge.scores(J.CONTENT_FREE, J.CONTENT_FREE)) == pytest.approx(0.0, abs=1e-5)
  np.testing.assert_allclose(judge.scores(prompts, answers), judge.threshold - raw, rtol=1e-6)
  assert judge.refusals(prompts, answers).dtype == bool


def test_split_half_reliability_matches_the_closed_form():
  """diffs = v + sigma * noise per prompt: each half-mean carries noise of squared norm sigma^2 D / h, so the cosine
  of the two half-means is about |v|^2 / (|v|^2 + sigma^2 D / h); layer 0 (all zero) is undefined."""
  rng = np.random.default_rng(0)
  L, P, D, sigma = 3, 200, 64, 1.0
  v = rng.standard_normal((L, D))
  v /= np.linalg.norm(v, axis=-1, keepdims=True)
  diffs = np.concatenate([np.zeros((1, P, D)), v[:, None] + sigma * rng.standard_normal((L, P, D))])
  out = split_half(diffs, n_splits=100)
  expect = 1.0 / (1.0 + sigma ** 2 * D / (P // 2))
  assert np.isnan(out["layer"][0]) and out["all"] == pytest.approx(expect, abs=0.05)
  np.testing.assert_allclose(out["layer"][1:], expect, atol=0.08)
  assert out["all_range"][0] < out["all"] < out["all_range"][1]
  assert np.isnan(split_half(diffs[:, :1])["all"])                     # one prompt: no halves
