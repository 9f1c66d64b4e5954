"""The shared absl entry point `run_app`: config flags (list and tuple fields overridable, `_SequenceParser`),
one typed conversion before anything runs, and user errors as one `error: ...` line on stderr with exit status 2
(`_user_error`; `--verbose` or GRAVLAB_VERBOSE=1 for the traceback).
"""
from __future__ import annotations

import ast
import contextlib
import errno
import logging
import os
import re
import sys
from typing import Any, Iterator, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser
from tqdm import tqdm

from train import typed_config
from train.rundir import Workdir

GRAVLAB_PACKAGES = ("models", "train", "probes", "analysis")
EXIT_USER_ERROR = 2
# OSErrors that are about the user's paths or disk, not the program: one line, no traceback.
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}
_DISK_MESSAGES = ("No space left on device", "RESOURCE_EXHAUSTED")
_CONFIG_LOAD_FAILURE = "Failed loading config file"   # ml_collections' (deferred) OSError for a bad --config path


class _SequenceParser(tuple_parser.TupleParser):
  """Command-line values of list and tuple config fields (registered for both by run_app).

  Accepts a Python literal (`"(1.0,2.0)"`, `"['x.json']"`, `"()"`), a bare comma-separated form
  (`x.json,y.json`, `1.0,2.0`: each element a literal if it parses as one, else a string), a single element
  (`x.json`), and repeated flags (`--config.f=a --config.f=b`, concatenated). An empty value is the empty
  sequence; an element containing a comma needs the literal form. Returns a tuple: ml_collections stores it with
  the field's own type (a list field stays a list), and train.typed_config turns lists into tuples anyway.
  Raises ValueError for an empty element of the bare form (`a,,b`).
  """

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      return tuple(argument)
    if not isinstance(argument, str):
      return super().parse(argument)
    text = argument.strip()
    if not text:
      return ()
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      return tuple(_bare_element(e, argument) for e in text.split(","))
    if isinstance(value, (list, tuple, set, frozenset)):
      return tuple(value)
    return (value,)


def _bare_element(text: str, argument: str) -> Any:
  """One element of the bare comma-separated form: a Python literal if it parses as one, else the string."""
  text = text.strip()
  if not text:
    raise ValueError(f"empty element in {argument!r} (use a Python literal such as \"('a','')\" for empty strings)")
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


def _chain(e: BaseException) -> Iterator[BaseException]:
  """`e`, then its causes / contexts, outermost first (each exception once)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _is_user_error(e: BaseException) -> bool:
  """True for errors about the user's input (one line, exit 2) rather than the program (traceback).

  User errors: an `...Error` class defined in gravlab's own packages (models.errors.ModelError and its subclasses,
  AdapterError, DatasetError, PlanError, ConfigError, ProbeDataError, GridError, TrainingDivergedError, ...);
  an OSError about a path (not found, permission, is / is not a directory, exists) or the disk (full, quota,
  read-only, name too long), or ml_collections' failure to load the --config file; and any error whose message
  says the disk is full ("No space left on device", or tensorstore's / orbax's RESOURCE_EXHAUSTED; XLA's device
  out-of-memory, also RESOURCE_EXHAUSTED, keeps its traceback and allocation report).
  """
  if any(c.__module__.split(".")[0] in GRAVLAB_PACKAGES and c.__name__.endswith("Error") for c in type(e).__mro__):
    return True
  if isinstance(e, _PATH_ERRORS) or (isinstance(e, OSError) and e.errno in _DISK_ERRNOS):
    return True
  if isinstance(e, OSError) and _CONFIG_LOAD_FAILURE in str(e):
    return True
  return (any(m in str(e) for m in _DISK_MESSAGES)
          and not type(e).__module__.startswith(("jax", "jaxlib")))


def _user_error(e: BaseException) -> BaseException | None:
  """The first user error in `e`'s chain (outermost first), or None."""
  return next((x for x in _chain(e) if isinstance(x, Exception) and _is_user_error(x)), None)


def error_line(e: BaseException) -> str:
  """`error: <message>` on one line: an OSError as `<strerror>: <filename>` (plus its second filename and
  notes, e.g. atomic_path's `while writing <path>`); newlines and runs of blanks in messages become one space."""
  if isinstance(e, OSError) and _CONFIG_LOAD_FAILURE in str(e):   # its last line says why
    return "error: cannot load the --config file: " + str(e).strip().splitlines()[-1].strip()
  if isinstance(e, OSError) and e.filename is not None:
    msg = f"{e.strerror or type(e).__name__}: {e.filename}"
    if e.filename2 is not None:
      msg += f" -> {e.filename2}"
  else:
    msg = str(e) or type(e).__name__
  msg = " ".join([msg, *(f"({n})" for n in getattr(e, "__notes__", ()))])
  return "error: " + " ".join(msg.split())


def _verbose() -> bool:
  """--verbose (once flags are parsed; before that, its presence in argv) or GRAVLAB_VERBOSE=1."""
  if os.environ.get("GRAVLAB_VERBOSE", "") not in ("", "0"):
    return True
  if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS:
    return bool(flags.FLAGS.verbose)
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in sys.argv[1:])


def _exit_user_error(e: BaseException) -> NoReturn:
  """Close what the failed run left open, print `error_line(e)` to stderr as the last line, exit with status 2.

  First the Workdirs' TensorBoard writers (their last events) and open tqdm bars (so the line starts a line);
  then the line, a flush of absl's log handlers, stdout and stderr, and os._exit rather than sys.exit:
  interpreter shutdown would finalise the rest of the failed run and print after the line (a tqdm bar created
  again, orbax managers and tensorstore callbacks into a closed event loop, imports with sys.meta_path None).
  Nothing is lost by skipping it: checkpoints are saved synchronously (train.checkpoint), metrics.jsonl is
  flushed line by line and every other output is written whole or not at all (atomic_path)."""
  Workdir.close_all()
  for bar in list(getattr(tqdm, "_instances", ())):
    with contextlib.suppress(Exception):
      bar.close()
  print(error_line(e), file=sys.stderr)
  with contextlib.suppress(Exception):
    absl_logging.flush()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(EXIT_USER_ERROR)


def _quiet_failed_save(record: logging.LogRecord) -> bool:
  """absl-handler filter: drops orbax's background-thread error records (a failed checkpoint write, logged with
  its traceback); the main thread re-raises the same error, which run_app reports as the one `error:` line (or,
  with --verbose, where this filter is not installed, shows in full)."""
  return not (record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


def _quiet_unraisable(hook):
  """A sys.unraisablehook that drops the teardown noise of a failed run and passes everything else to `hook`:
  tensorstore's write callbacks into the event loop orbax closed after a failed save ("Event loop is closed",
  dozens a failed checkpoint) and imports during interpreter shutdown ("sys.meta_path is None")."""
  def quiet(u):
    text = str(u.exc_value)
    if not ((u.exc_type is RuntimeError and text == "Event loop is closed")
            or (issubclass(u.exc_type, ImportError) and "sys.meta_path is None" in text)):
      hook(u)
  return quiet


def _flag_error_message(text: str) -> str:
  """absl's flag error on one line; a config file that raised (ml_collections quotes the whole traceback in
  the message) as the flag and the exception's last line."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  tb = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), None)
  if tb is not None:
    lines = lines[:tb] + lines[-1:]
  return f"{' '.join(' '.join(lines).split())} (--helpshort for the flags)"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad flag or override (flags.Error, e.g. an unparsable value, or ml_collections'
  AttributeError / KeyError for an override of a field that does not exist) is a user error: one line, exit 2
  (the traceback with --verbose)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _verbose():
      raise
    message = _flag_error_message(str(e))
  except (AttributeError, KeyError) as e:
    text = str(e)   # "'nope'", or the repr of "'lrr'\nDid you mean \"lr\" instead of \"lrr\"?"
    name = next(iter(re.findall(r"\w+", text)), "")
    paths = [a[2:].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = next((p for p in paths if name in p.split(".")[1:]), None)
    if bad is None or _verbose():   # not about an override: a bug, with its traceback
      raise
    hint = re.search(r'Did you mean "(\w+)"', text)
    message = f"--{bad}: the config has no field {name!r}" + (f" (did you mean {hint[1]!r}?)" if hint else "")
  print(f"error: {message}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def register_sequence_flags() -> None:
  """Parse list and tuple config fields on the command line with _SequenceParser (call before defining
  --config)."""
  for field_type in (list, tuple):
    config_flags.register_flag_parser_for_type(field_type, _SequenceParser())


def run_app(run, config_file: str, workdir_help: str, typed: type | None = None) -> None:
  """The shared absl entry point: `--config=<config_file>:<preset>` (ml_collections, `--config.x=v` overrides,
  list and tuple fields as `--config.x="(1.0,2.0)"` or `--config.x=a.json,b.json`: _SequenceParser), `--workdir`
  and `--verbose`, then `run(config, workdir)` and print where its report is.

  typed: the study's frozen config dataclass; the ConfigDict is converted once (train.typed_config) before `run`
  starts, and a bad field stops the program with one line naming it. A user error anywhere (flag parsing, the
  conversion, the run: _is_user_error) prints one line `error: ...` to stderr and exits with status 2; with
  --verbose or GRAVLAB_VERBOSE=1 it raises with the full traceback instead. Other exceptions propagate with
  their traceback. Flags are defined here, at program start, never at import time, so entry-point modules can
  import each other.
  """
  register_sequence_flags()
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_bool("verbose", False, "On a user error, raise with the full traceback instead of one line "
                    "(also GRAVLAB_VERBOSE=1).")
  config_flags.DEFINE_config_file("config", config_file, "Config file (path:preset).", lock_config=True)

  def main(argv):
    del argv
    if not _verbose():
      absl_logging.get_absl_handler().addFilter(_quiet_failed_save)
      sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    try:
      config = flags.FLAGS.config
      if typed is not None:
        config = typed_config.from_configdict(typed, config)
      print(f"report: {run(config, flags.FLAGS.workdir)}")
    except Exception as e:
      user = _user_error(e)
      if user is None or _verbose():
        raise
      _exit_user_error(user)

  app.run(main, flags_parser=_parse_flags)
