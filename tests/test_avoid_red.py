"""The avoid-the-red study (analysis/avoid_red/): the complement window, the kill zone from a sweep, point
configs, the benign fine-tuning of a group of points as one vmapped program against per-seed programs (tiny random
model), its chunked resume, and the whole study on SmolLM2 cut to 2 layers (`configs/avoid_red.py:quick`)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from analysis import grid
from analysis.avoid_red import study as avoid_red
from analysis.avoid_red.config import AvoidRedConfig, KillZoneSection
from configs.avoid_red import get_config
from models.config import ModelConfig
from models.params import init_params
from tests.runtime_only import run_runtime_only
from train import adapters, engine, scan
from train.loop import fit_chunks
from train.step import init_state
from train.typed_config import from_configdict

CFG = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)


@pytest.mark.parametrize("L", [2, 7, 30])
def test_complement_is_exactly_the_layers_outside_the_window(L):
  for lo, hi in [(0.0, 0.3), (0.25, 0.6), (0.5, 1.0), (0.73, 0.87), (0.34, 0.34)]:
    inside = {l for l in range(L) if lo - 1e-9 <= l / L <= hi + 1e-9}     # the rho-eval depth rule, by hand
    if not inside:
      continue
    if len(inside) == L:
      with pytest.raises(adapters.AdapterError, match="complement .* is empty"):
        adapters.resolve_layers(L, depth=(lo, hi), complement=True)
      continue
    comp = adapters.resolve_layers(L, depth=(lo, hi), complement=True)
    assert comp == tuple(sorted(set(range(L)) - inside))
    cfg = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_layers=L, n_heads=4, n_kv_heads=2, head_dim=8,
                      d_ff=48)
    m_in = adapters.LoraSpec.create(cfg, rank=2, alpha=4, depth=(lo, hi)).layer_mask()
    m_out = adapters.LoraSpec.create(cfg, rank=2, alpha=4, depth=(lo, hi), complement=True).layer_mask()
    np.testing.assert_array_equal(m_in + m_out, np.ones(L))
    np.testing.assert_array_equal(m_in * m_out, np.zeros(L))
  if L == 30:
    assert adapters.resolve_layers(30, depth=(0.73, 0.87)) == (22, 23, 24, 25, 26)
    assert adapters.resolve_layers(30, depth=(0.73, 0.87), complement=True) == tuple(range(22)) + (27, 28, 29)
    assert adapters.resolve_layers(30, layers=(22, 26), complement=True) == tuple(range(22)) + (27, 28, 29)
  with pytest.raises(adapters.AdapterError, match="complement"):
    adapters.resolve_layers(L, complement=True)


def test_complement_reaches_training():
  """configs/lora.py's lora.complement reaches train.loop: the window's layers start and stay exactly zero."""
  from configs.lora import get_config as lora_config
  from train.loop import trainables
  from train.train_config import TrainConfig
  c = lora_config("quick")
  c.lora.depth, c.lora.complement = (0.3, 0.5), True                   # 3 layers: window = layer 1
  lora, umask, spec = trainables(init_params(CFG, jax.random.PRNGKey(0)), CFG, from_configdict(TrainConfig, c),
                                 jax.random.PRNGKey(1))
  assert spec.layers == (0, 2)
  for t, ab in lora.items():
    assert float(jnp.abs(ab["a"][1]).max()) == 0.0 and float(jnp.abs(ab["a"][0]).max()) > 0
    np.testing.assert_array_equal(np.asarray(umask[t]["a"]).ravel(), [1.0, 0.0, 1.0])


def grid_config(**kw):
  return ml_collections.ConfigDict(kw)


def _sweep_metrics(path, zones, n_layers=30):
  path.write_text(json.dumps({"n_layers": n_layers, "kill_zones": zones}))
  return str(path)


def test_kill_window_explicit_and_from_a_sweep(tmp_path):
  c = from_configdict(KillZoneSection, get_config("smollm2").kill_zone)
  w, src = avoid_red.kill_window(c)
  assert w == (0.73, 0.87) and "explicit" in src
  zone = lambda b, a, layers, d: {"behavior": b, "alpha": a, "layers": layers, "min_delta": d,   # noqa: E731
                                  "worst_layer": layers[0]}
  c = dataclasses.replace(c, sweep_metrics=_sweep_metrics(tmp_path / "m.json", [zone("factual", 4.0, [10, 14], -0.2),
                                                         zone("factual", 4.0, [22, 26], -0.5),
                                                         zone("bias", 4.0, [6], -0.3),
                                                         zone("factual", -4.0, [2, 6], -0.9)]))
  w, src = avoid_red.kill_window(c)
  assert w == (22 / 30, 26 / 30) and "[22, 26]" in src
  assert adapters.resolve_layers(30, depth=w) == (22, 23, 24, 25, 26)     # layers between swept ones count
  c = dataclasses.replace(c, behavior="sycophancy")
  with pytest.raises(ValueError, match=r"no kill zone of 'sycophancy' at alpha \+4 .*\('bias', 4.0\)"):
    avoid_red.kill_window(c)
  c = dataclasses.replace(c, sweep_metrics=str(tmp_path / "missing.json"))
  with pytest.raises(FileNotFoundError, match="config.kill_zone.sweep_metrics"):
    avoid_red.kill_window(c)
  c = dataclasses.replace(c, sweep_metrics="", window=(0.9, 0.2))
  with pytest.raises(ValueError, match="config.kill_zone.window"):
    avoid_red.kill_window(c)


def test_point_config_sets_window_seed_and_axes():
  cd = get_config("smollm2")
  cd.grid.axes, cd.grid.rank = ("window", "rank", "seed"), (4, 16)
  c = from_configdict(AvoidRedConfig, cd)
  pts = grid.expand(c.grid)
  kill = (0.73, 0.87)
  p = next(p for p in pts if p.name == "window-outside__rank-16__seed-2")
  pc = avoid_red.point_config(c, p, kill)
  assert (pc.safety.lora.depth, pc.safety.lora.complement, pc.safety.lora.rank) == (kill, True, 16)
  assert pc.safety.seed == 2 and pc.seeds == (2,)
  assert c.reversion.safety.lora.depth == (0.4, 1.0) and c.reversion.safety.seed == 0     # base untouched
  pa = avoid_red.point_config(c, pts[0], kill)
  assert pa.safety.lora.depth == kill and not pa.safety.lora.complement
  assert avoid_red.point_config(c, next(p for p in pts if p["window"] == "all"), kill).safety.lora.depth == ()
  assert avoid_red.window_lora((0.4, 1.0), kill) == ((0.4, 1.0), False)
  c = dataclasses.replace(c, grid=grid_config(axes=("window", "depth"), window=("kill",), depth=(1,)))
  with pytest.raises(ValueError, match="unknown axis 'depth'"):
    avoid_red.point_config(c, grid.expand(c.grid)[0], kill)
  with pytest.raises(ValueError, match="config.grid.window"):
    avoid_red.window_lora("red", kill)


SEEDS, T, B, S, P = (3, 5), 4, 2, 10, 3


def _group_setup():
  """Two points with their own theta_aligned, v_rev, data order and LoRA initialisation."""
  base = init_params(CFG, jax.random.PRNGKey(0), std=0.1)
  frozen = [jax.tree.map(lambda x, k=k: x + 0.02 * jax.random.normal(jax.random.PRNGKey(k), x.shape), base)
            for k in (11, 12)]
  spec = adapters.LoraSpec.create(CFG, rank=4, alpha=8.0)
  tx, _ = engine.make_optimizer(lr=1e-2, total_steps=T)
  init = [init_state(adapters.init_lora(spec, CFG, jax.random.PRNGKey(s)), tx, s) for s in SEEDS]
  rng = np.random.default_rng(0)
  toks = rng.integers(1, CFG.vocab_size, (len(SEEDS), T, B, S))
  mask = np.ones_like(toks)
  mask[:, :, 1, 7:] = 0
  lm = mask.astype(np.float32)
  lm[..., :3] = 0
  batches = {"tokens": jnp.asarray(toks, jnp.int32), "mask": jnp.asarray(mask, jnp.int32),
             "loss_mask": jnp.asarray(lm)}
  probe = {"tokens": jnp.asarray(rng.integers(1, CFG.vocab_size, (P, 6)), jnp.int32),
           "mask": jnp.ones((P, 6), jnp.int32)}
  early = scan.probe_mean(base, None, CFG, probe)
  refs = []
  for f in frozen:
    m = scan.probe_mean(f, None, CFG, probe)
    refs.append({"mean_aligned": m, "v_rev": early - m})
  sc = scan.ScanConfig(arm="baseline", lora_scale=spec.scale)
  return frozen, refs, init, batches, probe, spec, tx, sc


@pytest.fixture(scope="module")
def group():
  """The setup and ONE group program, shared (both tests call it on 2-step chunks: one compilation)."""
  frozen, refs, init, batches, probe, spec, tx, sc = _group_setup()
  return frozen, refs, init, batches, probe, scan.make_program(CFG, sc, tx, per_run_frozen=True), tx, sc


def test_per_point_program_equals_the_per_seed_reversion_programs(group):
  frozen, refs, init, batches, probe, prog, tx, sc = group
  stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)        # noqa: E731
  state, ms = stack(init), []
  for c0 in (0, 2):                                                     # two chunks of 2 steps
    state, m = prog(state, stack(frozen), jax.tree.map(lambda x: x[:, c0:c0 + 2], batches), probe, stack(refs))
    ms.append(m)
  m = jax.tree.map(lambda *x: np.concatenate(x, axis=1), *ms)
  ref_prog = scan.make_program(CFG, sc, tx)                            # the reversion study's, one seed at a time
  for i in range(len(SEEDS)):
    one = jax.tree.map(lambda x: x[i:i + 1], batches)
    s_i, m_i = ref_prog(stack([init[i]]), frozen[i], one, probe, refs[i])
    for k in ("task", "align_all", "align", "proj", "grad_norm"):
      np.testing.assert_allclose(m[k][i], m_i[k][0], rtol=2e-5, atol=2e-6)
    # Batched vs single matmuls round differently and AdamW divides by sqrt(v): ~1e-4 of a step (lr 1e-2).
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], state)), jax.tree.leaves(s_i)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b)[0], rtol=1e-4, atol=1e-5)
  assert float(np.abs(np.asarray(m["align_all"][0]) - np.asarray(m["align_all"][1])).max()) > 1e-3


def test_fit_chunks_resumes_from_its_checkpoints(group, tmp_path):
  frozen, refs, init, batches, probe, prog, tx, sc = group
  stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)        # noqa: E731
  args = (prog, stack(init), stack(frozen), stack(refs), batches, probe)

  def evaluate(i, lora):                                                # any per-point function of the LoRA
    return {"b_norm": float(sum(jnp.sum(ab["b"] ** 2) for ab in lora.values())), "i": i}
  whole = fit_chunks(*args, [str(tmp_path / f"w{i}") for i in (0, 1)], 2, evaluate)
  dirs = [str(tmp_path / f"r{i}") for i in (0, 1)]
  assert fit_chunks(*args, dirs, 2, evaluate, stop_after=2) is None
  assert os.path.isdir(os.path.join(dirs[1], "checkpoints", "2"))
  resumed = fit_chunks(*args, dirs, 2, evaluate)
  for w, r in zip(whole, resumed):
    assert [e["step"] for e in r["evals"]] == [2, 4]
    for a, b in zip(w["evals"], r["evals"]):
      assert a["i"] == b["i"] and a["b_norm"] == pytest.approx(b["b_norm"], rel=1e-5)
    assert w["metrics"]["align"].shape == (T, CFG.n_layers)
    np.testing.assert_allclose(w["metrics"]["align_all"], r["metrics"]["align_all"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="eval_every = 3 must divide"):
    fit_chunks(*args, dirs, 3, evaluate)


@pytest.mark.slow
def test_quick_study_end_to_end_and_rerun_does_no_work(tmp_path):
  """`python -m analysis.avoid_red` with torch / peft / accelerate unimportable, then an in-process rerun."""
  cd = get_config("quick")
  cd.grid.seed = (0,)
  c = from_configdict(AvoidRedConfig, cd)
  wd = str(tmp_path / "ar")
  run_runtime_only("analysis.avoid_red", "--config=configs/avoid_red.py:quick", f"--workdir={wd}",
                   "--config.grid.seed=(0,)")
  report = os.path.join(wd, "report.md")
  m = json.load(open(os.path.join(wd, "metrics.json")))
  assert m["status"]["ran"] == ["window-kill__seed-0", "window-outside__seed-0", "window-all__seed-0"]
  assert m["layers"] == {"kill": [1], "outside": [0], "all": [0, 1]}
  for f in ("avoid_red_grid", "avoid_red_curves", "avoid_red_heatmaps"):
    assert os.path.exists(os.path.join(wd, "figures", f + ".png"))
  text = open(report).read()
  assert "| kill | 1 |" in text and "| outside | 1 |" in text and "| all | 1 |" in text and "## Verdict" in text
  pm = json.load(open(os.path.join(wd, "points", "window-kill__seed-0", "metrics.json")))
  assert len(pm["align_all"]) == c.reversion.benign.steps and pm["layers"] == [1]
  assert pm["scalars"]["d_factual"] == pytest.approx(pm["scores"]["factual"] - json.load(
      open(os.path.join(wd, "early.json")))["scores"]["factual"])
  # The kill-window LoRA leaves the residual stream before layer 1 untouched: v_rev is zero at boundary 1.
  assert np.all(np.asarray(pm["align"])[:, 0] == 0.0)
  table = m["table"]
  assert avoid_red.run(c, wd) == report
  m2 = json.load(open(os.path.join(wd, "metrics.json")))
  assert m2["status"]["ran"] == [] and len(m2["status"]["skipped"]) == 3 and m2["table"] == table
