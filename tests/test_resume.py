"""Config-checked resume (train.resume) and the divergence guard beyond NaN (train.guard), on the tiny model of
tests/test_train.py."""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint
from train.guard import DivergenceGuard, TrainingDivergedError
from train.adapters import AdapterError
from train.data import DatasetError
from train.loop import train_loop, validate
from train.resume import ResumeConfigError, check_resume, differences
from train.rundir import Workdir
from tests.test_train import CFG, ROOT, _config, _data, _params


# ------------------------------------------------------------------------------------------------ the guard
def test_guard_fires_after_patience_steps_above_the_factor_and_resets():
  g = DivergenceGuard(loss_factor=4.0, patience=3)
  for s, loss in enumerate([2.0, 1.5, 9.0, 9.0, 1.0, 9.0, 9.0]):   # two streaks of 2 (< patience): no stop
    g.update(s, loss, 1.0)
  assert g.reference == 2.0 and g.streak == 2 and g.suspect
  with pytest.raises(TrainingDivergedError, match=r"step 7: loss 9 above 4 x the first step's 2 .* for 3 steps"):
    g.update(7, 9.0, 1.0)


def test_guard_collapse_needs_both_vanished_gradient_and_uniform_loss():
  V = 61
  g = DivergenceGuard(loss_factor=0.0, patience=2, vocab=V)
  g.update(0, math.log(V), 1e-9)
  g.update(1, 0.5 * math.log(V), 1e-9)        # vanished gradient but a low loss: a converged run, not a collapse
  g.update(2, math.log(V), 0.5)               # uniform loss but a live gradient
  assert g.streak == 0
  g.update(3, math.log(V), 0.0)
  with pytest.raises(TrainingDivergedError, match=r"step 4: gradient norm 1e-08 below 1e-06 with the loss 4.07 at "
                                                  r"the uniform level ln\(61\) = 4.111 for 2 steps"):
    g.update(4, 0.99 * math.log(V), 1e-8)


def test_guard_never_fires_on_a_normal_run(tmp_path):
  r = train_loop(_params(), CFG, _data(), _config(steps=12, lr=3e-2), str(tmp_path))
  losses = [h["loss"] for h in r.history]
  assert losses[-1] < losses[0]                # the run learned, and the guard let it finish


def test_gradient_ascent_is_stopped_with_the_last_good_checkpoint(tmp_path):
  """A negative learning rate (refused by TrainConfig; planted past the check) is gradient ascent: the loss grows
  far past its start without any NaN. The guard stops it, and no checkpoint from inside the streak is kept."""
  c = _config(steps=30, warmup_steps=0, clip_norm=0.0, save_every=1, diverge_patience=3, max_to_keep=3,
              top=dict(mode="full"), lora=dict(targets="all"))
  object.__setattr__(c.train, "lr", -0.05)
  log = []
  wd = type("Log", (), {"log": lambda self, step, **m: log.append(m["loss"])})()
  with pytest.raises(TrainingDivergedError, match=r"above 4 x the first step's .*Last good checkpoint: step \d+"):
    train_loop(_params(), CFG, _data(), c, str(tmp_path), wd=wd)
  first_bad = next(i for i, loss in enumerate(log) if loss > 4 * log[0])
  assert len(log) == first_bad + 3 - 1 or len(log) == first_bad + 2      # stopped on the streak's 3rd step
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  last = ck.latest_step()
  _, meta = ck.restore(last)
  ck.close()
  assert last == first_bad - 1 and meta["first_loss"] == pytest.approx(log[0])
  assert log[last] < 4 * log[0]                 # the kept state's own loss was inside the bounds
  with pytest.raises(ResumeConfigError, match=r"config.train.lr: -0.05 -> 0.01"):  # a changed lr is refused
    train_loop(_params(), CFG, _data(), _config(steps=30, warmup_steps=0, clip_norm=0.0, save_every=1,
                                                diverge_patience=3, max_to_keep=3, top=dict(mode="full"),
                                                lora=dict(targets="all")), str(tmp_path))


# ------------------------------------------------------------------------------------------------ resume
def test_differences_and_check_resume_modes():
  old = {"model": "a", "train": {"lr": 0.1, "progress": True, "layers": [1, 2]}, "export": {"peft": True}}
  new = {"model": "a", "train": {"lr": 0.1, "progress": False, "layers": (1, 2)}, "export": {"peft": False}}
  assert differences(old, new) == [("config.export.peft", True, False), ("config.train.progress", True, False)]
  with pytest.raises(ResumeConfigError, match=r"do not alter results: pass --config.resume=force"):
    check_resume(old, new, "check", "runs/x")
  assert len(check_resume(old, new, "force", "runs/x")) == 2
  changed = {**new, "train": {**new["train"], "lr": 0.2}, "seed": 3}
  with pytest.raises(ResumeConfigError, match=r"config.seed: '<absent>' -> 3; config.train.lr: 0.1 -> 0.2.*alter "
                                              r"results"):
    check_resume(old, changed, "force", "runs/x")
  assert check_resume(old, {**old, "stop_after": 8, "resume": "check"}, "check", "runs/x") == []   # free fields
  with pytest.raises(ValueError, match="config.resume must be one of"):
    check_resume(old, old, "always", "runs/x")


def test_resume_with_changed_rank_or_data_is_refused_naming_the_fields(tmp_path):
  c = _config(steps=8, stop_after=4, save_every=2)
  train_loop(_params(), CFG, _data(), c, str(tmp_path))
  rank8 = _config(steps=8, save_every=2, lora=dict(rank=8))
  with pytest.raises(ResumeConfigError, match=r"config.lora.rank: 4 -> 8"):
    train_loop(_params(), CFG, _data(), rank8, str(tmp_path))
  other_data = _config(steps=8, save_every=2, top=dict(seed=5))
  with pytest.raises(ResumeConfigError, match=r"config.seed: \d+ -> 5"):
    train_loop(_params(), CFG, _data(), other_data, str(tmp_path))
  # a neutral field (the progress bar, stop_after) may differ at this level: the run resumes and finishes
  r = train_loop(_params(), CFG, _data(), _config(steps=8, save_every=2, progress=False), str(tmp_path))
  assert r.start_step == 4 and len(r.history) == 4
  assert np.isfinite(r.history[-1]["loss"])


# ------------------------------------------------------------------------------------------------ run directories
def _ckpt_dir(path):
  os.makedirs(os.path.join(path, "checkpoints", "4"), exist_ok=True)    # what orbax leaves: checkpoints/<step>


def test_workdir_refuses_a_changed_config_where_checkpoints_exist(tmp_path):
  path = str(tmp_path / "run")
  Workdir(path, _config(steps=8)).close()
  Workdir(path, _config(steps=8, lr=0.02)).close()          # no checkpoints yet: a fresh start may change anything
  _ckpt_dir(path)
  with pytest.raises(ResumeConfigError, match=r"config.train.lr: 0.02 -> 0.03.*alter results"):
    Workdir(path, _config(steps=8, lr=0.03))
  with pytest.raises(ResumeConfigError, match=r"config.train.progress: False -> True.*--config.resume=force"):
    Workdir(path, _config(steps=8, lr=0.02, progress=True))
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["train"]["progress"] is False         # nothing was written by the refused runs
  Workdir(path, _config(steps=8, lr=0.02, progress=True, top=dict(resume="force"))).close()
  with open(os.path.join(path, "config.json")) as f:
    saved = json.load(f)
  assert saved["train"]["progress"] is True and saved["resume"] == "force"
  Workdir(os.path.join(path, "stage"), _config(steps=99)).close()   # a stage inside the run: not compared again


def test_history_keeps_one_row_per_step(tmp_path):
  wd = Workdir(str(tmp_path), _config())
  for step, loss in [(0, 3.0), (1, 2.0), (2, 1.5), (1, 2.5), (2, 1.0), (3, 0.5)]:   # steps 1-2 replayed
    wd.log(step, loss=loss)
  wd.close()
  assert [(r["step"], r["loss"]) for r in wd.history()] == [(0, 3.0), (1, 2.5), (2, 1.0), (3, 0.5)]


def test_cli_resume_with_changed_lr_is_one_line_exit_2(tmp_path):
  """The issue's repro: checkpoints of train.lora :quick, then the same command with a new lr."""
  cmd = [sys.executable, "-m", "train.lora", "--config=configs/lora.py:quick", f"--workdir={tmp_path}",
         "--config.train.steps=4", "--config.train.save_every=2", "--config.train.stop_after=2",
         "--config.eval.refusal=False", "--config.train.progress=False"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  again = subprocess.run(cmd + ["--config.train.lr=0.01"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 2
  err = [l for l in again.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and "config.train.lr: 0.0003 -> 0.01" in err[0], err


# ------------------------------------------------------------------------------------------------ validation
def test_validate_checks_reading_vectors_and_layers_before_any_model_load(tmp_path):
  """train.loop.validate needs only the model's shapes: a pickled, mis-shaped or missing reading vector and
  out-of-model layers are refused with the field named (train.lora calls it before loading weights)."""
  lorra = dict(top=dict(objective="lorra"))
  evil = tmp_path / "evil.npy"
  np.save(evil, np.asarray([{"x": 1}], dtype=object), allow_pickle=True)
  wrong = tmp_path / "wrong.npy"
  np.save(wrong, np.zeros((3, 3), np.float32))
  good = tmp_path / "good.npy"
  np.save(good, np.ones((CFG.n_layers, CFG.d_model), np.float32))
  for path, msg in ((evil, "not a numeric .npy array"), (wrong, r"shape \(3, 3\), the model needs \[3, 32\]"),
                    (tmp_path / "none.npy", "no such file")):
    c = _config(lorra=dict(reading_vector=str(path)), **lorra)
    with pytest.raises(DatasetError, match=rf"config.lorra.reading_vector='{path}': {msg}"):
      validate(c, CFG)
  validate(_config(lorra=dict(reading_vector=str(good)), **lorra), CFG)
  with pytest.raises(AdapterError, match="outside the model"):
    validate(_config(lora=dict(layers=(0, 7))), CFG)


def test_cached_stage_computes_once_and_restores_the_same_tree(tmp_path):
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, 2.5, "x", None, np.float64(3.0)],
          "c": ({"d": jnp.ones(3), "nan": float("nan")}, True), "e": [np.zeros(2, np.int32), np.array(7.0)]}
  calls = []

  def stage():
    calls.append(1)
    timing["stage_s"] = 1.25
    return tree
  timing = {"before": 0.0}
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None)
  assert checkpoint.cached_stage(ck, 1, "one", stage, timing) is tree
  assert checkpoint.cached_stage(ck, 2, "two", lambda: [np.ones(1)]) == [np.ones(1)]
  ck.close()
  timing = {}
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None)
  out = checkpoint.cached_stage(ck, 1, "one", stage, timing)
  assert len(calls) == 1 and timing == {"stage_s": 1.25, "resumed": ["one"]}       # only what the stage added
  np.testing.assert_array_equal(out["a"], tree["a"])
  assert out["a"].dtype == np.float32 and out["b"] == [1, 2.5, "x", None, 3.0] and isinstance(out["c"], tuple)
  np.testing.assert_array_equal(out["c"][0]["d"], np.ones(3))
  assert np.isnan(out["c"][0]["nan"]) and out["c"][1] is True
  assert out["e"][0].dtype == np.int32 and float(out["e"][1]) == 7.0
  with pytest.raises(TypeError, match="cannot checkpoint a object"):
    checkpoint.cached_stage(ck, 3, "bad", lambda: {"x": object()})
  with pytest.raises(TypeError, match="cannot checkpoint a <U1 array"):
    checkpoint.cached_stage(ck, 3, "bad", lambda: {"x": np.array(["a"])})
  assert checkpoint.cached_stage(ck, 2, "two", lambda: calls.append(2)) == [np.ones(1)]      # restored, not rerun
  with pytest.raises(ValueError, match="checkpoint 2 holds stage 'two', not 'screen'"):
    checkpoint.cached_stage(ck, 2, "screen", lambda: None)
  empty = {"e": np.zeros((0, 3), np.float32), "n": np.arange(3)}
  checkpoint.cached_stage(ck, 4, "empty", lambda: empty)
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None)
  back = checkpoint.cached_stage(ck, 4, "empty", lambda: None)
  assert back["e"].shape == (0, 3) and back["e"].dtype == np.float32 and list(back["n"]) == [0, 1, 2]
  assert calls == [1]
