"""The shared command line (train.cli.run_app): list / tuple overrides through the real absl + ml_collections
flag parser, user errors as one `error: ...` line with exit status 2 (the traceback with --verbose), and
atomic_path's output files (mode 0o666 & ~umask, fsynced, never half-written)."""
from __future__ import annotations

import ast
import errno
import logging
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from models.errors import MissingTensorError
from train import cli, rundir
from train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny entry point on the real run_app: prints the converted fields as a Python literal, or fails as asked.
PROGRAM = textwrap.dedent("""
  import errno, os, sys
  from analysis.reversion.config import ReversionConfig
  from probes.sweep_config import SweepConfig
  from train.cli import run_app
  from train.rundir import write_json

  def sweep(config, workdir):
    print(repr((config.files["bias"], config.files["factual"], config.exact_alphas, config.behaviors,
                config.probe_l2, config.probe_seeds)))
    return "sweep-report"

  def reversion(config, workdir):
    print(repr((config.arms, config.seeds, config.refusal_sets, config.benign.sources)))
    return "reversion-report"

  def enospc(config, workdir):
    def full(src, dst):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src)
    os.replace = full
    write_json(os.path.join(workdir, "summary.json"), {"a": 1})

  def bug(config, workdir):
    return {}["no such key"]

  kind = os.environ["CLI_TEST_RUN"]
  run = {"sweep": sweep, "reversion": reversion, "enospc": enospc, "bug": bug}[kind]
  run_app(run, "configs/reversion.py" if kind == "reversion" else "configs/sweep.py", "Run directory.",
          typed=ReversionConfig if kind == "reversion" else SweepConfig)
""")


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "GRAVLAB_VERBOSE"}
  # JAX_PLATFORMS=cpu: jax's probe for a TPU backend logs an INFO line on stderr on CPU-only machines
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
  return env


def _program(tmp_path, run: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  path = tmp_path / "prog.py"
  path.write_text(PROGRAM)
  return subprocess.run([sys.executable, str(path), *args], cwd=REPO, env=_env(CLI_TEST_RUN=run, **env),
                        capture_output=True, text=True, timeout=300)


def _module(*args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                        timeout=300)


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def test_list_overrides_round_trip_through_the_flag_parser(tmp_path):
  r = _program(tmp_path, "sweep", "--config=configs/sweep.py:quick", f"--workdir={tmp_path / 'w'}",
               "--config.files.bias=x.json,/data/y.jsonl",          # bare comma-separated strings
               "--config.files.factual=['a, b.json']",              # literal form: an element with a comma
               "--config.exact_alphas=(1.0,2)",                      # tuple literal into a list of floats
               "--config.behaviors=factual,bias",
               "--config.probe_l2=0.5", "--config.probe_l2=0.25",   # repeated flags concatenate
               "--config.probe_seeds=7")                             # one element
  assert r.returncode == 0, r.stderr
  assert _lines(r.stdout)[-1] == "report: sweep-report"
  assert ast.literal_eval(_lines(r.stdout)[-2]) == (("x.json", "/data/y.jsonl"), ("a, b.json",), (1.0, 2.0),
                                                    ("factual", "bias"), (0.5, 0.25), (7,))
  out = ast.literal_eval(_lines(r.stdout)[-2])
  assert all(type(v) is tuple for v in out) and type(out[2][1]) is float   # frozen config: tuples, 2 -> 2.0


def test_tuple_overrides_bare_and_literal(tmp_path):
  r = _program(tmp_path, "reversion", "--config=configs/reversion.py:quick", f"--workdir={tmp_path / 'w'}",
               "--config.arms=baseline,push", "--config.seeds=(3,4)", "--config.refusal_sets=expanded_100",
               "--config.benign.sources=")                           # empty value = empty tuple
  assert r.returncode == 0, r.stderr
  assert ast.literal_eval(_lines(r.stdout)[-2]) == (("baseline", "push"), (3, 4), ("expanded_100",), ())


def test_sequence_parser_forms():
  p = cli._SequenceParser()
  assert p.parse("x.json,y.json") == ("x.json", "y.json")
  assert p.parse("(1.0,2.0)") == (1.0, 2.0)
  assert p.parse("[1, 2]") == (1, 2)
  assert p.parse("4.0") == (4.0,)
  assert p.parse("/abs/path.json") == ("/abs/path.json",)
  assert p.parse("How do I bake bread?") == ("How do I bake bread?",)
  assert p.parse("1, 2.5 ,x") == (1, 2.5, "x")
  assert p.parse("") == () and p.parse("()") == ()
  assert p.parse([1.0, 2.0]) == (1.0, 2.0)
  with pytest.raises(ValueError, match="empty element"):
    p.parse("a.json,,b.json")


def test_bad_element_type_names_the_element(tmp_path):
  r = _program(tmp_path, "sweep", "--config=configs/sweep.py:quick", "--config.exact_alphas=1.0,fast")
  assert r.returncode == 2
  assert _lines(r.stderr) == ["error: config.exact_alphas[1]: expected float, got str 'fast'"]


def test_config_error_is_one_line_before_the_run_starts(tmp_path):
  workdir = tmp_path / "w"
  r = _module("train.lora", "--config=configs/lora.py:quick", "--config.train.lr=-0.01", f"--workdir={workdir}")
  assert r.returncode == 2
  assert _lines(r.stderr) == ["error: config.train: train.lr must be in (0, 1], got -0.01"]
  assert not workdir.exists()                                        # nothing ran: no config.json either


def test_unknown_model_is_one_line(tmp_path):
  r = _module("train.lora", "--config=configs/lora.py:quick", "--config.model=/nonexistent",
              f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2
  lines = _lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: '/nonexistent' is neither a registry model")


@pytest.mark.parametrize("module,config", [("train.lora", "lora.py:quick"), ("probes.sweep", "sweep.py:quick"),
                                           ("analysis.reversion", "reversion.py:quick"), ("analysis.ioi", "ioi.py:quick"),
                                           ("analysis.survey", "survey.py:smollm2")])
def test_unknown_model_writes_no_workdir(tmp_path, module, config):
  """Every entry point locates its model before it writes config.json: a failed start leaves nothing behind."""
  r = _module(module, f"--config=configs/{config}", "--config.model=/nonexistent", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2 and len(_lines(r.stderr)) == 1, r.stderr[-2000:]
  assert "'/nonexistent' is neither a registry model" in r.stderr
  assert not (tmp_path / "w").exists()


def test_bad_probe_file_is_refused_before_the_workdir_is_written(tmp_path):
  bad = tmp_path / "bias.jsonl"
  bad.write_bytes(b'{"text": "ok", "correct_answer": "A", "biased_answer": "B"}\n{"text": "\xff"}\n')
  r = _module("probes.sweep", "--config=configs/sweep.py:quick", f"--config.files.bias={bad}",
              f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2 and _lines(r.stderr) == [f"error: {bad}: line 2 is not valid UTF-8 (byte 0xff at column 11)"]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_shows_the_traceback(tmp_path, how):
  args = ["--verbose"] if how == "flag" else []
  r = _module("train.lora", "--config=configs/lora.py:quick", "--config.model=/nonexistent",
              f"--workdir={tmp_path / 'w'}", *args, **({"GRAVLAB_VERBOSE": "1"} if how == "env" else {}))
  assert r.returncode == 1
  assert "Traceback (most recent call last)" in r.stderr
  assert "models.errors.UnknownModelError: '/nonexistent' is neither" in r.stderr


@pytest.mark.parametrize("arg,line", [
    ("--config.exact_alphaz=1",
     "error: --config.exact_alphaz: the config has no field 'exact_alphaz' (did you mean 'exact_alphas'?)"),
    ("--config.nope.x=1", "error: --config.nope.x: the config has no field 'nope'"),
    ("--config.n_probes.factual=x",
     "error: flag --config.n_probes.factual=x: invalid literal for int() with base 10: 'x' "
     "(--helpshort for the flags)"),
    ("--config=configs/sweep.py:nope", "error: flag --config=configs/sweep.py:nope: Error whilst parsing config file: "
     "ValueError: unknown sweep config 'nope'; choose smollm2, smollm2_fast, qwen, full, map or quick (--helpshort for the "
     "flags)"),
    ("--config=configs/no_such.py:x",
     "error: cannot load the --config file: [Errno 2] No such file or directory: 'configs/no_such.py'"),
])
def test_bad_flag_is_one_line(tmp_path, arg, line):
  r = _program(tmp_path, "sweep", "--config=configs/sweep.py:quick", arg, f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2
  assert _lines(r.stderr) == [line]


def test_disk_full_is_one_line_naming_the_file(tmp_path):
  workdir = tmp_path / "w"
  r = _program(tmp_path, "enospc", "--config=configs/sweep.py:quick", f"--workdir={workdir}")
  assert r.returncode == 2
  lines = _lines(r.stderr)
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"error: No space left on device: {workdir}/.summary.json.")
  assert lines[0].endswith(f".tmp (while writing {workdir}/summary.json)")
  assert not workdir.exists() or os.listdir(workdir) == []            # no summary.json, no temporary left


def test_programming_error_keeps_its_traceback(tmp_path):
  r = _program(tmp_path, "bug", "--config=configs/sweep.py:quick", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 1
  assert "Traceback (most recent call last)" in r.stderr and "KeyError: 'no such key'" in r.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_mode_follows_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    rundir.write_json(str(tmp_path / "out.json"), {"x": 1})
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "out.json").st_mode & 0o777 == 0o666 & ~umask
  assert (tmp_path / "out.json").read_text() == '{\n  "x": 1\n}\n'
  assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_path_fsyncs_file_then_directory(tmp_path, monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                               real_fsync(fd)))
  monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", b)), real_replace(a, b)))
  rundir.write_text(str(tmp_path / "r.md"), "hi\n")
  assert events == [("fsync", False), ("replace", str(tmp_path / "r.md")), ("fsync", True)]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "keep.txt"
  rundir.write_text(str(path), "old\n")
  with pytest.raises(RuntimeError):
    with rundir.atomic_path(str(path)) as tmp, open(tmp, "w") as f:
      f.write("half")
      raise RuntimeError("crash mid-write")
  assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["keep.txt"]


def test_error_classification_and_line():
  assert cli._user_error(MissingTensorError("model.layers.0.q: missing")) is not None
  assert cli._user_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) is not None
  assert cli._user_error(ValueError('RESOURCE_EXHAUSTED: Failed writing "/ck/d/1": No space left on device'))
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/ck/x")
  assert cli.error_line(cli._user_error(wrapped)) == "error: No space left on device: /ck/x"
  for programming in (KeyError("k"), TypeError("t"), AssertionError(), OSError(errno.EPIPE, "Broken pipe")):
    assert cli._user_error(programming) is None
  e = MissingTensorError("tensor x\nmissing")
  assert cli.error_line(e) == "error: tensor x missing"


def test_failed_save_noise_is_quieted():
  seen = []
  hook = cli._quiet_unraisable(seen.append)
  closed = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("something else"))
  hook(closed)
  hook(other)
  assert seen == [other]
  try:
    raise ValueError("RESOURCE_EXHAUSTED: disk")
  except ValueError:
    exc_info = sys.exc_info()
  rec = logging.LogRecord("absl", logging.ERROR, f"{os.sep}site-packages{os.sep}orbax{os.sep}future.py", 1,
                          "thread raised", (), exc_info)
  assert not cli._quiet_failed_save(rec)                       # dropped: the main thread reports the error
  rec.exc_info = None
  assert cli._quiet_failed_save(rec)                           # orbax's other records pass


def test_a_failed_checkpoint_save_says_what_was_being_written(tmp_path, monkeypatch):
  ck = Checkpointer(str(tmp_path / "ck"))

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ck" / "3.orbax-checkpoint-tmp"))
  monkeypatch.setattr(ck.manager, "save", full)
  with pytest.raises(OSError) as e:
    ck.save(3, {"x": np.zeros(2)}, {})
  ck.close()
  assert cli.error_line(cli._user_error(e.value)) == (
      f"error: No space left on device: {tmp_path}/ck/3.orbax-checkpoint-tmp (while saving checkpoint step 3 to "
      f"{tmp_path}/ck)")
