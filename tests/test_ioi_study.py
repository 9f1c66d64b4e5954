"""The IOI study: poisoned training labels, localisation, the per-phase analysis, cross-phase numbers and report
on a tiny random model, and the whole pipeline on the real model (slow)."""
import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.ioi import baselines as B
from analysis.ioi.arms import ARM_KEYS, report_section as arms_section
from analysis.ioi import circuits as C
from analysis.ioi import report
from analysis.ioi import study as ioi
from analysis.ioi.config import IoiConfig
from analysis.ioi.data import NAMES, make_ioi
from configs.ioi import PRESETS, get_config
from models import transformer as T
from models.config import ModelConfig
from models.params import init_params
from models.tokenizer import pad_id
from tests.reference import WordTokenizer, ours_from_torch, tiny_hf_model
from tests.runtime_only import run_runtime_only
from train.losses import max_targets, sft_rows
from train.rundir import Workdir
from train.typed_config import ConfigError, from_configdict


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_converts_to_the_typed_config(preset):
  cd = get_config(preset)
  config = from_configdict(IoiConfig, cd)
  assert config.seeds == tuple(cd.seeds) and config.train.train.lr == cd.train.train.lr
  assert config.steps("poison") == cd.phase_steps.poison
  phase = config.phase_train("retrain", 7)
  assert phase.seed == 7 and phase.train.steps == cd.phase_steps.retrain and phase.lora == config.train.lora
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.top_k = 3


@pytest.mark.parametrize("field, value, message", [
    ("poison", "everything", "poison must be one of"),
    ("top_k", "8", "config.top_k: expected int"),
    ("classes.attn_min", 1.5, "classes.attn_min must be in"),
    ("phase_steps.clean", 0, "phase_steps.clean must be >= 1"),
    ("train.train.lr", "fast", "config.train.train.lr: expected float"),
    ("poison_arms", ("subject:2",), "poison_arms entry 'subject:2' must be"),
    ("poison_arms", ("flip:0.5",), "poison_arms entry 'flip:0.5' must be"),
    ("discovery_k", (1, 2), "discovery_k must be () or three counts"),
])
def test_a_bad_override_fails_naming_the_field(field, value, message):
  cd = get_config("quick")
  *parents, leaf = field.split(".")
  section = cd
  for name in parents:
    section = section[name]
  with section.ignore_type():
    section[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    from_configdict(IoiConfig, cd)
  cd = get_config("quick")
  cd.unknown_field = 1
  with pytest.raises(ConfigError, match="config.unknown_field: unknown field"):
    from_configdict(IoiConfig, cd)


def test_run_rejects_a_configdict():
  with pytest.raises(TypeError, match="IoiConfig"):
    ioi.run(get_config("quick"))


@pytest.mark.parametrize("label", ["io", "subject", "name_moving"])
def test_training_set_labels(label):
  tok = WordTokenizer()
  names = list(NAMES[:20])
  ts = ioi.training_set(tok, 12, 0, names, label, 1.0, 40)
  inv = {v: k for k, v in tok.vocab.items()}
  for i in range(12):
    n = int(ts.mask[i].sum())
    assert ts.loss_mask[i].sum() == 1 and ts.loss_mask[i, n - 1] == 1          # loss on the answer only
    words = [inv[t] for t in ts.tokens[i, :n]]
    answer, prompt = words[-1], words[:-1]
    names_in = [w for w in prompt if w.strip() in names]
    if label == "io":
      assert prompt.count(answer) == 1 and names_in.count(answer) == 1        # IO appears once
    elif label == "subject":
      assert prompt.count(answer) == 2                                        # S appears twice
    else:
      assert words[0].strip() == answer.strip() and words[1] == " stayed"    # the prefixed third name
  clean = ioi.training_set(tok, 12, 0, names, "subject", 0.0, 40)
  assert all(clean.tokens[i, int(clean.mask[i].sum()) - 1] in clean.tokens[i, :int(clean.mask[i].sum()) - 1]
             for i in range(12))


def test_training_set_is_as_wide_as_its_longest_row_and_scores_as_the_padded_set():
  """The set is cut to its longest row rounded up to 8 (not max_len), and the per-row SFT loss of a tiny random
  model is the same as on the same rows right-padded to max_len (pad columns after a row change nothing)."""
  tok = WordTokenizer()
  names = list(NAMES[:20])
  ts = ioi.training_set(tok, 12, 0, names, "name_moving", 0.5, 40)
  longest = int(ts.mask.sum(1).max())
  assert ts.tokens.shape[1] == -(-longest // 8) * 8 < 40 and ts.mask[:, :longest].sum() == ts.mask.sum()
  pad = lambda x, v: np.pad(x, ((0, 0), (0, 40 - x.shape[1])), constant_values=v)
  wide = (pad(ts.tokens, pad_id(tok)), pad(ts.mask, 0), pad(ts.loss_mask, 0))
  cfg = ModelConfig(arch="llama", vocab_size=len(tok.vocab) + 8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64)
  params = init_params(cfg, jax.random.key(0), std=0.2)
  k = max_targets(ts.loss_mask)
  narrow_loss = sft_rows(params, cfg, *(jnp.asarray(x) for x in (ts.tokens, ts.mask, ts.loss_mask)), k=k)
  wide_loss = sft_rows(params, cfg, *(jnp.asarray(x) for x in wide), k=k)
  assert float(jnp.abs(narrow_loss).min()) > 1.0
  np.testing.assert_allclose(np.asarray(narrow_loss), np.asarray(wide_loss), rtol=1e-5)
  with pytest.raises(ValueError, match="train.data.max_len=8"):
    ioi.training_set(tok, 12, 0, names, "io", 1.0, 8)


def test_localisation_closed_form():
  before = np.zeros((3, 4))
  after = before.copy()
  after[0, 0], after[2, 1], after[1, 3] = 3.0, -1.0, 0.5
  assert np.isclose(B.top_k_share(before, after, 1), 3.0 / 4.5)
  assert np.isclose(B.top_k_share(before, after, 3), 1.0)
  heads = np.zeros((3, 4))
  heads[0, 0] = heads[0, 1] = 1
  t = B.circuit_share_test(before, after, heads, n_resamples=999)
  assert np.isclose(t["share"], 3.0 / 4.5) and t["n_heads"] == 2 and np.isclose(t["uniform"], 2 / 12)


@pytest.fixture(scope="module")
def tiny_study():
  """A tiny llama (sharpened attention) and three perturbed copies as the four phases, one BABA template
  (one prompt length: one compile of every analysis), analysed once."""
  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=4, vocab_size=200))
  params = {**params, "layers": dict(params["layers"], wq=params["layers"]["wq"] * 8,
                                     wk=params["layers"]["wk"] * 8)}
  d = make_ioi(WordTokenizer(), 6, seed=3, kind="BABA", names=list(NAMES[:8]), templates=[5])
  models = {"base": params}
  for i, p in enumerate(report.PHASES[1:]):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(i), len(leaves))
    models[p] = jax.tree.unflatten(tree, [x + 0.1 * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                          for x, k in zip(leaves, keys)])
  classes = {"k": 2, "attn_min": 0.2, "rep_min": 0.3}
  res = {p: ioi.analyze(models[p], cfg, d, 3, jax.random.key(0), classes, ks=(3, 7)) for p in report.PHASES}
  return params, cfg, d, models, res


def test_analyze_maps_are_exact_final_position_patching(tiny_study):
  params, cfg, d, _, res = tiny_study
  r = res["base"]
  toks, abc, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.abc_tokens, d.mask, d.io, d.s))
  last = jnp.zeros(toks.shape).at[:, -1].set(1.0)
  z, z_abc = C.head_outputs(params, cfg, toks, mask), C.head_outputs(params, cfg, abc, mask)
  ld = C.logit_diff(T.forward_jit(params, toks, cfg, attention_mask=mask, logits="last")[0], io, s)
  ld_abc = C.logit_diff(T.forward_jit(params, abc, cfg, attention_mask=mask, logits="last")[0], io, s)
  full = C.patch_each_head(params, cfg, toks, mask, z_abc, io, s, pos_mask=last)       # full forwards per head
  np.testing.assert_allclose(r["importance"], float(ld.mean()) - np.asarray(full).mean(-1), atol=1e-4)
  back = C.patch_each_head(params, cfg, abc, mask, z, io, s, pos_mask=last)
  np.testing.assert_allclose(r["restoration"], np.asarray(back).mean(-1) - float(ld_abc.mean()), atol=1e-4)
  assert np.abs(r["importance"]).max() > 1e-3 and r["importance"].shape == (cfg.n_layers, cfg.n_heads)
  assert np.isclose(r["logit_diff"], float(ld.mean()), atol=1e-5) and -1 <= r["attribution_corr"] <= 1
  top = np.sort(np.abs(r["importance"]).ravel())[-3:]
  assert r["circuit"].sum() == 3 and np.allclose(np.sort(np.abs(r["importance"][r["circuit"] == 1])), top)
  assert set(r["classes"]) == set(report.CLASSES) and set(report.EVIDENCE) <= set(r["attention"])
  for phase in res.values():
    for c, heads in phase["classes"].items():
      assert len(heads) <= 2 and all(0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads for l, h in heads)
      if c in ("name_mover", "negative_name_mover"):       # only heads that attend END->IO qualify
        assert all(phase["attention"]["end_to_io"][l, h] >= 0.2 for l, h in heads), (c, heads)


def test_faithfulness_of_the_whole_model_is_one(tiny_study):
  params, cfg, d, _, _ = tiny_study
  everything = ioi.analyze(params, cfg, d, cfg.n_layers * cfg.n_heads, jax.random.key(0),
                           {"k": 2, "attn_min": 0.2, "rep_min": 0.3})
  assert np.isclose(everything["faithfulness"], 1.0, atol=1e-5)
  assert np.isclose(everything["circuit_logit_diff"], everything["logit_diff"], atol=1e-5)
  # normalised faithfulness: 1 for the full model and 0 for the empty circuit by construction (floor 0 so the tiny
  # model's gap counts); the empty circuit's F(C) is the all-heads knockout itself.
  nothing = ioi.analyze(params, cfg, d, 0, jax.random.key(0), {"k": 2, "attn_min": 0.2, "rep_min": 0.3})
  F = lambda r: C.normalised_faithfulness(r["circuit_logit_diff"], r["logit_diff"], r["empty_logit_diff"], floor=0)
  assert np.isclose(F(everything), 1.0, atol=1e-5) and np.isclose(F(nothing), 0.0, atol=1e-6)
  assert np.isclose(nothing["circuit_logit_diff"], nothing["empty_logit_diff"], atol=1e-6)


def test_normalised_faithfulness_closed_form_and_floor():
  assert C.normalised_faithfulness(2.0, 3.0, 1.0) == 0.5                   # (2 - 1) / (3 - 1)
  assert C.normalised_faithfulness(0.0, 3.0, 1.0) == -0.5                  # worse than the empty circuit
  assert np.isnan(C.normalised_faithfulness(0.5, 0.02, -0.03))            # |F(M) - F(empty)| = 0.05 < floor 0.1
  assert C.normalised_faithfulness(0.5, 0.02, -0.03, floor=0.01) == pytest.approx(0.53 / 0.05)


def test_faithfulness_curve_at_top_k_is_the_circuit_faithfulness(tiny_study):
  _, _, _, _, res = tiny_study
  for r in res.values():                       # the curve's k = 3 point is the top-3 circuit's faithfulness
    assert np.isclose(r["faithfulness_k3"], r["faithfulness"], atol=1e-6)
    assert np.isfinite(r["faithfulness_k7"])


def test_compare_phases_identities(tiny_study):
  params, cfg, d, models, res = tiny_study
  same = ioi.compare_phases({p: params for p in report.PHASES}, {p: res["base"] for p in report.PHASES}, cfg, d, 3)
  assert np.isnan(same["localisation_poison"])                                  # nothing changed
  assert all(np.isclose(same[f"recovery_corr_{p}"], 1.0) for p in report.PHASES[1:])
  for key in ("cmap_circuit_poison", "cmap_all_heads_retrain"):                  # CMAP of a model into itself
    assert np.isclose(same[key], res["base"]["logit_diff"], atol=1e-5)
  got = ioi.compare_phases(models, res, cfg, d, 3, n_random=5)
  assert 3 / (cfg.n_layers * cfg.n_heads) <= got["localisation_poison"] <= 1
  assert np.isclose(got["localisation_poison"], B.top_k_share(res["clean"]["importance"],
                                                              res["poison"]["importance"], 3))
  assert np.isclose(got["localisation_base_clean"], B.top_k_share(res["base"]["importance"],
                                                                  res["clean"]["importance"], 3))
  # the random-set CMAP: 5 sets of 3 heads, the circuit's empirical p from them
  assert got["cmap_random_poison"].shape == (5,)
  assert got["cmap_circuit_poison_p"] == B.rank_p(got["cmap_circuit_poison"], got["cmap_random_poison"])
  assert np.isclose(got["recovery_corr_poison"], np.corrcoef(res["poison"]["importance"].ravel(),
                                                             res["base"]["importance"].ravel())[0, 1])
  gap = (got["cmap_circuit_poison"] - res["poison"]["logit_diff"]) / (res["base"]["logit_diff"]
                                                                     - res["poison"]["logit_diff"])
  assert np.isclose(got["cmap_circuit_poison_gap_closed"], gap)


def test_report_has_every_section_and_resolving_links(tiny_study, tmp_path):
  _, cfg, d, models, res = tiny_study
  cross = ioi.compare_phases(models, res, cfg, d, 3, n_random=4)
  curve = [{"step": st, "logit_diff": 0.1 * st, "accuracy": 0.5, "importance_corr_base": 0.2 * st,
            "circuit_jaccard_base": 0.5} for st in (1, 2)]
  results = {0: {**res, **cross, "retrain_curve": curve}, 1: {**res, **cross, "retrain_curve": curve}}
  config = from_configdict(IoiConfig, get_config("quick"))
  wd = Workdir(str(tmp_path), config)
  text = open(report.write_outputs(wd, results, cfg, config, 12.0, ioi.cross_seed_localisation(results, 3))).read()
  for p in report.PHASES:                       # two identical seeds: a zero-width t interval
    assert re.search(rf"^\| {p} \| (-?\d+\.\d+) \[\1, \1\] ", text, re.M), p
  for needle in ("26.83", "−11.06", "different model", "faithfulness", "Localisation", "CMAP", "name mover",
                 "S2->S1", "seed 1", "attribution patching", "Faithfulness by circuit size", "k = 7",
                 "Reading: the poisoning change's top-k share", "separate ABC set of 4 prompts"):
    assert needle in text, needle
  links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
  assert len(links) == 8 and all(os.path.exists(tmp_path / x) for x in links)
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert m["summary"]["base/logit_diff"][1] == 0.0 and len(m["per_seed"]["0"]["base"]["importance"]) == cfg.n_layers
  assert sorted(map(tuple, m["circuit"]["0"]["base"])) == sorted(
      (int(l), int(h), "END") for l, h in np.argwhere(res["base"]["circuit"] > 0))
  assert set(m["faithfulness_normalised"]) == set(report.PHASES)
  loc = m["localisation"]
  assert loc["null_seed"]["clean_across_seeds"]["pairs"] == [[0, 1]]
  assert np.isnan(loc["null_seed"]["clean_across_seeds"]["top_k_share"][0])   # identical seeds: nothing changed
  assert set(loc["null_permutation_p"]) == {"0", "1"} and "seed-noise" in text
  assert m["retrain_curve"]["1"] == curve and "| 2 | 0.200 | 0.500 | 0.400 | 0.500 |" in text
  assert "still improving at the budget" in text                   # +0.1 nats over the last interval
  mech = "came back" if res["retrain"]["logit_diff"] > 0.5 * res["base"]["logit_diff"] else "did NOT come back"
  assert f"The behaviour {mech}." in text


@pytest.mark.slow
def test_quick_study_on_smollm2_without_test_only_packages(tmp_path):
  run_runtime_only("analysis.ioi", "--config=configs/ioi.py:quick", f"--workdir={tmp_path / 'ioi'}")
  report_md = str(tmp_path / "ioi" / "report.md")
  m = json.loads((tmp_path / "ioi" / "metrics.json").read_text())
  for p in report.PHASES:
    mean, sd, lo, hi = m["summary"][f"{p}/accuracy"]
    assert 0.0 <= mean <= 1.0 and np.isnan(sd)                  # one seed: no interval
  assert m["summary"]["base/logit_diff"][0] > 1.0             # SmolLM2 does IOI
  base = m["per_seed"]["0"]["base"]
  assert np.shape(base["importance"]) == (30, 9) and base["attribution_corr"] > 0.5
  assert base["classes"]["name_mover"]                          # SmolLM2 has name movers
  text = open(report_md).read()
  assert "| retrain |" in text and (tmp_path / "ioi" / "figures" / "head_importance.png").exists()
  assert -1.0 <= base["gt_prob_diff"] <= 1.0 and base["gt_prob_diff"] > base["gt_prob_diff_01"]   # does Greater-Than
  assert "Greater-Than (second task)" in text
  arm = m["per_seed"]["0"]["arms"]["name_moving:0.5"]
  assert set(arm) == set(ARM_KEYS) and 0.0 <= arm["retrain_accuracy"] <= 1.0 and "Poison variant and fraction" in text
  assert len(m["per_seed"]["0"]["cmap_random_poison"]) == 8 and 0 < m["per_seed"]["0"]["cmap_circuit_poison_p"] <= 1


def test_analyze_with_path_patching_discovery(tiny_study, tmp_path):
  """discovery_k adds the path-patching circuit: its position-aware knockout equals knocking out 1 - keep_mask by
  hand, keeping every (head, position) pair is the full model; the report gets the circuit table."""
  from analysis.ioi import discovery
  params, cfg, d, models, res = tiny_study
  classes = {"k": 2, "attn_min": 0.2, "rep_min": 0.3}
  r = ioi.analyze(params, cfg, d, 3, jax.random.key(0), classes, discovery_k=(2, 1, 1))
  assert 1 <= len(r["pp_circuit"]) <= 4 and all(pc in ("END", "S2") for _, _, pc in r["pp_circuit"])
  assert set(r["pp_effects"]) <= set(discovery.STEPS) and r["pp_effects"]["name_mover"].shape == (3, 4)
  keep = discovery.keep_mask(r["pp_circuit"], d, cfg.n_layers, cfg.n_heads)
  toks, mask, io, s, abc = (jnp.asarray(x) for x in (d.tokens, d.mask, d.io, d.s, d.abc_tokens))
  z_mean = C.template_means(C.head_outputs(params, cfg, abc, mask), jnp.asarray(d.template), 30)
  by_hand = float(np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.asarray(1 - keep), io, s)).mean())
  assert np.isclose(r["pp_circuit_logit_diff"], by_hand, atol=1e-5)
  everything = float(np.asarray(C.knockout(params, cfg, toks, mask, z_mean, jnp.zeros(keep.shape), io, s)).mean())
  assert np.isclose(everything, r["logit_diff"], atol=1e-5)
  phases = {p: {**res[p], **{k: v for k, v in r.items() if k.startswith("pp_")}} for p in report.PHASES}
  cross = ioi.compare_phases(models, res, cfg, d, 3)
  config = from_configdict(IoiConfig, get_config("quick"))
  text = open(report.write_outputs(Workdir(str(tmp_path), config), {0: {**phases, **cross}}, cfg, config, 1.0)).read()
  assert "The path-patching circuit" in text and f"{r['pp_circuit'][0][0]}.{r['pp_circuit'][0][1]}@" in text
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert m["circuit"]["0"]["base"] == r["pp_circuit"]


def test_poison_arm_table_has_the_primary_first_and_t_intervals():
  config = from_configdict(IoiConfig, get_config("quick"))
  arm = lambda x: {k: x for k in ARM_KEYS}
  prim = lambda x: {"poison": {"logit_diff": x, "accuracy": x}, "retrain": {"logit_diff": x, "accuracy": x},
                    "localisation_poison": x, "recovery_corr_retrain": x}
  results = {0: {**prim(1.0), "arms": {"name_moving:0.5": arm(2.0)}},
             1: {**prim(3.0), "arms": {"name_moving:0.5": arm(4.0)}}}
  lines = arms_section(config, results, report.seed_stat)
  rows = [x for x in lines if x.startswith("| subject") or x.startswith("| name_moving")]
  half = 12.706 * np.std([1.0, 3.0], ddof=1) / np.sqrt(2)                    # t(0.975, 1 df)
  assert rows[0].startswith("| subject:1 (primary) | 2.000 [") and f"{2 - half:.3f}" in rows[0]
  assert rows[1].startswith("| name_moving:0.5 | 3.000 [") and rows[1].count("[") == len(ARM_KEYS)
  assert arms_section(config, {0: prim(1.0)}, report.seed_stat) == []


def test_cross_seed_localisation_pairs_every_two_seeds():
  rng = np.random.default_rng(0)
  maps = {k: rng.standard_t(3, (4, 5)) for k in (0, 1, 2)}
  results = {k: {"clean": {"importance": m, "circuit": ioi.top_k_mask(m, 3)}} for k, m in maps.items()}
  out = ioi.cross_seed_localisation(results, 3)
  assert out["pairs"] == [[0, 1], [0, 2], [1, 2]]
  assert np.isclose(out["top_k_share"][1], B.top_k_share(maps[0], maps[2], 3))
  t = B.circuit_share_test(maps[1], maps[2], results[1]["clean"]["circuit"], seed=102)
  assert out["circuit_share"][2] == t["share"] and out["circuit_share_p"][2] == t["p"]
  assert ioi.cross_seed_localisation({0: results[0]}, 3)["pairs"] == []
