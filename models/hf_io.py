"""Read and write Hugging Face checkpoint directories (config.json + safetensors) for our stacked pytree.

Reading (`load_hf`) streams: every shard is opened once with `safetensors.safe_open(..., framework="numpy",
backend="pread")` and tensors are read one at a time into `models.params.build_params`, which stacks one
parameter `[L, ...]` at a time. The "pread" backend matters: with the default "mmap" backend every page of
the file that was read stays mapped, and counted in our resident memory, until the file is closed (reading
every tensor of a 570 MB file into jax arrays: peak RSS +2.15x the file with mmap, +1.11x with pread).
Measured for `load_hf` on CPU (tests/test_hf_io.py, 256 MB fp32 checkpoint): peak RSS +1.29x the file.

Writing (`save_hf`) is the inverse of `transformers`' `save_pretrained(safe_serialization=True)`: HF tensor
names and `[out, in]` orientation (via `models.params.hf_tensors`), `{"format": "pt"}` safetensors metadata,
`model.safetensors` or `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`. It
is atomic: everything is written into a sibling temporary directory that is renamed onto `out_dir` last.

Pickle checkpoints (`pytorch_model.bin`, `*.pt`) are refused on purpose: unpickling runs arbitrary code.
No torch at run time.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.errors import CorruptFileError, MissingTensorError, ModelError
from models.params import ShardingFn, build_params, hf_tensors
from models.tokenizer import check_fits, save_tokenizer

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAVE_DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------- reading
def _open_safetensors(path: str):
  """`safe_open` one file for numpy, preferring the "pread" backend (see module docstring).

  Raises:
    CorruptFileError: the header is unreadable or the file is shorter than the header says (names `path`).
  """
  try:
    try:
      return safe_open(path, framework="numpy", backend="pread")
    except TypeError:  # safetensors < 0.8 has no `backend` argument: mmap is all there is.
      return safe_open(path, framework="numpy")
  except SafetensorError as e:
    raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from e
  except OSError as e:
    raise CorruptFileError(f"{path}: cannot open ({e})") from e


def read_hf_config(path: str) -> ModelConfig:
  """The ModelConfig of a config.json whose `architectures` gravlab implements (ModelConfig.from_hf_file)."""
  return ModelConfig.from_hf_file(path)


def find_weight_files(directory: str | os.PathLike) -> list[str]:
  """Paths of the safetensors files of an HF checkpoint directory, in shard order.

  Follows transformers' lookup: `model.safetensors` if present, else the shards named in the `weight_map`
  of `model.safetensors.index.json`.

  Raises:
    ModelError: neither file exists (the message lists pickle checkpoints found, which are refused).
    CorruptFileError: the index is not JSON, has no `weight_map`, or names a shard outside the directory.
    MissingTensorError: the index names a shard file that does not exist (message names index and shard).
  """
  directory = os.fspath(directory)
  single = os.path.join(directory, SAFE_WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  index = os.path.join(directory, SAFE_INDEX_NAME)
  if not os.path.isfile(index):
    pickles = sorted(f for f in os.listdir(directory)
                     if f.endswith(_PICKLE_SUFFIXES) and not f.startswith(("training_args", "optimizer")))
    hint = (f"; found {', '.join(pickles)}, but .bin/pickle checkpoints are refused on purpose (unpickling "
            "can run arbitrary code): convert them to safetensors first") if pickles else ""
    raise ModelError(f"{directory}: no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME}){hint}")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CorruptFileError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from e
  shards: dict[str, str] = {}  # shard file -> first tensor it holds, in weight_map order
  for tensor, shard in weight_map.items():
    shards.setdefault(str(shard), tensor)
  paths = []
  for shard, tensor in shards.items():
    if os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise CorruptFileError(f"{index}: shard name {shard!r} is not a plain file name")
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
      raise MissingTensorError(f"{index}: shard {shard!r} (holding e.g. tensor {tensor!r}) does not exist")
    paths.append(path)
  return paths


class SafetensorsReader:
  """Reads tensors by HF name from a set of safetensors files, one tensor per call.

  Each file is opened once (header parsed, handle kept) and closed by `close()` / the `with` block. Where
  shards disagree, the first file holding a name wins. Tensors come back as numpy arrays in the file's dtype
  (bf16 as `ml_dtypes.bfloat16`) and HF orientation.
  """

  def __init__(self, paths: list[str]):
    """Open every file in `paths`. Raises CorruptFileError (naming the file) for an unreadable header."""
    self._handles: list[Any] = []
    self._where: dict[str, tuple[Any, str]] = {}
    try:
      for path in paths:
        handle = _open_safetensors(path)
        self._handles.append(handle)
        for name in handle.keys():
          self._where.setdefault(name, (handle, path))
    except BaseException:
      self.close()
      raise

  def keys(self) -> list[str]:
    """All tensor names over all files."""
    return list(self._where)

  def get_tensor(self, hf_name: str) -> np.ndarray | None:
    """The tensor `hf_name` as a fresh numpy array (any dtype, HF shape), or None if no file holds it.

    Raises:
      CorruptFileError: the bytes cannot be read (message names the file and the tensor).
    """
    entry = self._where.get(hf_name)
    if entry is None:
      return None
    handle, path = entry
    try:
      return handle.get_tensor(hf_name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CorruptFileError(f"{path}: cannot read tensor {hf_name!r} ({e})") from e

  def close(self) -> None:
    """Close every file handle (idempotent)."""
    handles, self._handles = self._handles, []
    for handle in handles:
      with contextlib.suppress(Exception):
        handle.__exit__(None, None, None)

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_hf(directory: str | os.PathLike, *, dtype=jnp.float32,
            sharding_fn: ShardingFn | None = None) -> tuple[dict[str, Any], ModelConfig]:
  """Load a Hugging Face checkpoint directory (config.json + safetensors) into our stacked pytree.

  Matches `transformers.AutoModelForCausalLM.from_pretrained(directory)` for Llama / Qwen2 / Qwen3: same
  config fields, same tensors (transposed to our `[in, out]` layout, see models.params). For tied embeddings
  an `lm_head.weight` present in the files is ignored. Peak host memory is the placed parameters plus one
  stacked parameter `[L, ...]` plus one HF tensor (never the whole file).

  Args:
    directory: the checkpoint directory.
    dtype: parameter dtype (jnp.float32, jnp.bfloat16, ...); tensors are cast from the file's dtype.
    sharding_fn: `sharding_fn("layers/wq", shape) -> Sharding | None`, see models.params.place.

  Returns:
    (params, cfg): the nested parameter dict (shapes in models.params) and the ModelConfig.

  Raises:
    ModelError: `directory` is not a directory, config.json is missing / not UTF-8 JSON, or there are no
      safetensors weights (pickle `.bin` checkpoints are refused on purpose).
    UnsupportedArchitectureError: config.json names a model_type, `architectures` class or feature gravlab
      does not implement (see read_hf_config).
    CorruptFileError: a safetensors file or the index is truncated / unreadable (names the file).
    MissingTensorError: a tensor the config needs is absent, or the index names a missing shard.
    ShapeMismatchError: a tensor's shape differs from what config.json implies (names the tensor).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise ModelError(f"{directory}: not a directory")
  cfg = read_hf_config(os.path.join(directory, CONFIG_NAME))
  with SafetensorsReader(find_weight_files(directory)) as reader:
    params = build_params(cfg, reader.get_tensor, dtype=dtype, sharding_fn=sharding_fn,
                          source=directory)
  return params, cfg


# ------------------------------------------------------------------------------------------- writing
def _check_target(out_dir: str, overwrite: bool) -> None:
  """Raise FileExistsError if `out_dir` is a file or symlink, or a non-empty directory and not `overwrite`."""
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir) or os.path.islink(out_dir):
    raise FileExistsError(f"{out_dir}: exists and is not a plain directory")
  if os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir}: directory exists and is not empty (pass overwrite=True to replace it)")


def _make_temp_dir(out_dir: str) -> str:
  """Create and return a fresh sibling `out_dir.tmp-XXXXXXXX` (mode from the umask, unlike tempfile's 0700)."""
  for _ in range(100):
    tmp = f"{out_dir}.tmp-{secrets.token_hex(4)}"
    try:
      os.mkdir(tmp)
      return tmp
    except FileExistsError:
      continue
  raise FileExistsError(f"{out_dir}: could not create a temporary sibling directory")


def _umask_modes(directory: str) -> None:
  """Give every file in `directory` the mode a new file gets (0o666 less the umask): safetensors' save_file
  writes 0o600 files whatever the umask. The mode is read from a probe file, without os.umask (not thread-safe)."""
  probe = os.path.join(directory, f".mode-{secrets.token_hex(4)}")
  os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
  mode = os.stat(probe).st_mode & 0o777
  os.remove(probe)
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      os.chmod(path, mode)


def _commit(tmp: str, out_dir: str, overwrite: bool) -> None:
  """Move the finished `tmp` directory to `out_dir`, replacing an empty (or, with overwrite, any) old one."""
  _check_target(out_dir, overwrite)
  if not os.path.lexists(out_dir):
    os.replace(tmp, out_dir)
  elif not os.listdir(out_dir):
    os.rmdir(out_dir)
    os.replace(tmp, out_dir)
  else:  # overwrite: park the old directory, move the new one in, then delete the old one.
    old = f"{out_dir}.old-{secrets.token_hex(4)}"
    os.replace(out_dir, old)
    try:
      os.replace(tmp, out_dir)
    except BaseException:
      os.replace(old, out_dir)
      raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
  """Yield a fresh temporary sibling of `out_dir` to fill; on success it is renamed onto `out_dir`, on any
  exception it is removed, so `out_dir` is never half-written.

  Raises:
    FileExistsError: `out_dir` is a file, or a non-empty directory and `overwrite` is False (checked before
      and again at the rename).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  _check_target(out_dir, overwrite)
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = _make_temp_dir(out_dir)
  try:
    yield tmp
    _umask_modes(tmp)
    _commit(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_weights(params: dict[str, Any], cfg: ModelConfig, tmp: str, dtype,
                   max_shard_bytes: int) -> set[str]:
  """Write the safetensors file(s) (+ index when sharded) into `tmp`; return the dtype names written.

  Host memory: one shard of contiguous copies plus one stacked parameter at a time.
  """
  written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
  shard: dict[str, np.ndarray] = {}
  shard_bytes = 0
  total_bytes = 0
  dtypes: set[str] = set()

  def flush():
    nonlocal shard_bytes
    name = f".shard-{len(written):05d}.safetensors"
    save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
    written.append((name, list(shard)))
    shard.clear()
    shard_bytes = 0

  for hf_name, arr in hf_tensors(params, cfg):
    # C-contiguous copy: safetensors.numpy writes the raw buffer, so a transposed view would be written in
    # the wrong order; the copy also drops the reference to the stacked [L, ...] host array.
    arr = np.array(arr, dtype=arr.dtype if dtype is None else dtype, order="C", copy=True)
    if arr.dtype.name not in _SAVE_DTYPES:
      raise ValueError(f"tensor {hf_name!r} has dtype {arr.dtype.name}; save_hf writes {_SAVE_DTYPES}")
    if shard and shard_bytes + arr.nbytes > max_shard_bytes:
      flush()
    shard[hf_name] = arr
    shard_bytes += arr.nbytes
    total_bytes += arr.nbytes
    dtypes.add(arr.dtype.name)
  if shard or not written:
    flush()

  if len(written) == 1:
    os.replace(os.path.join(tmp, written[0][0]), os.path.join(tmp, SAFE_WEIGHTS_NAME))
    return dtypes
  weight_map = {}
  n = len(written)
  for k, (name, tensors) in enumerate(written, start=1):
    final = f"model-{k:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
    weight_map.update((t, final) for t in tensors)
  with open(os.path.join(tmp, SAFE_INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
  return dtypes


def save_hf(params: dict[str, Any], cfg: ModelConfig, out_dir: str | os.PathLike, *, dtype=None,
            tokenizer=None, max_shard_bytes: int = 2**31, overwrite: bool = False) -> str:
  """Write `params` as a Hugging Face checkpoint directory that transformers 5.x loads.

  Output (matching `save_pretrained(safe_serialization=True)`): config.json (`cfg.to_hf_dict()`, with
  `torch_dtype` and its transformers-5 spelling `dtype` set to the dtype written), `model.safetensors` or,
  when the tensors exceed `max_shard_bytes`, `model-0000k-of-0000n.safetensors` + `model.safetensors.
  index.json`; tensors under HF names in HF `[out, in]` orientation, no `lm_head.weight` when embeddings are
  tied; plus, if `tokenizer` is given, its files (models.tokenizer.save_tokenizer), so
  `models.loading.load_tokenizer(out_dir)` gives it back. Atomic: all is written into a temporary sibling
  `out_dir.tmp-XXXX` that is renamed to `out_dir` at the end; on any error it is removed.

  Args:
    params: nested parameter dict (models.params layout), any float dtype, on any device.
    cfg: the matching ModelConfig.
    out_dir: output directory; created (with parents) if absent.
    dtype: dtype to write (jnp.float32 / jnp.bfloat16 / jnp.float16); None keeps each array's dtype.
    tokenizer: the model's transformers tokenizer (models.loading.load_tokenizer), or None for no tokenizer.
    max_shard_bytes: largest shard size in bytes (a single tensor larger than this gets its own shard).
    overwrite: replace an existing non-empty `out_dir`.

  Returns:
    The absolute path of `out_dir`.

  Raises:
    FileExistsError: `out_dir` is a file, or a non-empty directory and `overwrite` is False.
    TypeError: `tokenizer` has no `save_pretrained` (checked before anything is written).
    ValueError: a tensor's dtype is not float32 / bfloat16 / float16, or the tokenizer has more tokens than
      `cfg.vocab_size` (checked before anything is written).
    KeyError: `params` lacks a tensor that `cfg` implies.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if tokenizer is not None:
    check_fits(tokenizer, cfg.vocab_size)
  with atomic_dir(out_dir, overwrite) as tmp:
    dtypes = _write_weights(params, cfg, tmp, None if dtype is None else jnp.dtype(dtype), max_shard_bytes)
    config = cfg.to_hf_dict()
    # Mixed dtypes only arise with dtype=None and mixed params; report the widest.
    config["torch_dtype"] = config["dtype"] = max(dtypes, key=lambda d: (jnp.dtype(d).itemsize, d))
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
    if tokenizer is not None:
      save_tokenizer(tokenizer, tmp)
  return out_dir

