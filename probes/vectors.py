"""Steering and reading vectors as files other tools load: safetensors plus a JSON sidecar.

A vector file holds one float32 tensor "vector" `[L+1, D]` in gravlab's boundary convention (CONVENTION): row 0
is the token embeddings (the input of decoder layer 0), row l + 1 is resid_post[l], the output of decoder layer l
(0-based), where the sweep steers "at layer l". Its sidecar `<stem>.json` says what the vector is and what the study
found about it: model name and weight digest, behavior, method, where the contrast pairs came from and how many,
the layer convention, and the evidence (per layer: the first-order screen's slope, p and q; the exact cells'
delta, CI, p and q). `probes.export_control_vector` turns a vector file into a llama.cpp control vector.

safetensors (not pickle) is read with `safetensors.numpy`; nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from models import registry

CONVENTION = ("boundary: row 0 = token embeddings (input of decoder layer 0); row l + 1 = resid_post[l], the output "
              "of decoder layer l (0-based), where gravlab steers 'at layer l'; llama.cpp's direction.{l} is row l + 1")
_CHUNK = 8 << 20


def weights_digest(model: str) -> dict[str, Any]:
  """{"path", "bytes", "sha256"} of the weight file(s) `model` resolves to (models.registry.resolve): the GGUF file,
  or every *.safetensors file of an HF directory in name order, hashed as one stream. Streams 8 MiB at a time
  (a 270 MB GGUF: about a second; a 16 GB 8B model: about a minute). Raises models.registry's errors for a model that does not resolve."""
  path = registry.resolve(model).path
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
           if os.path.isdir(path) else [path])
  digest, size = hashlib.sha256(), 0
  for f in files:
    with open(f, "rb") as fh:
      while block := fh.read(_CHUNK):
        digest.update(block)
        size += len(block)
  return {"path": path, "bytes": size, "sha256": digest.hexdigest()}


def save_vector(path: str, vector, meta: dict[str, Any]) -> tuple[str, str]:
  """Write `vector` `[L+1, D]` (any float dtype; stored float32) to `path` (.safetensors) and `meta` (JSON-able,
  plus "shape", "dtype" and "layer_convention") to the sidecar beside it; the files appear complete or not at all
  (each is written to a temporary name and renamed). Returns (tensor path, sidecar path).

  Raises ValueError: `path` does not end in .safetensors, or `vector` is not 2-D or not finite."""
  if not path.endswith(".safetensors"):
    raise ValueError(f"save_vector: {path}: the file name must end in .safetensors")
  v = np.ascontiguousarray(np.asarray(vector, np.float32))
  if v.ndim != 2 or not np.all(np.isfinite(v)):
    raise ValueError(f"save_vector: {path}: tensor 'vector' must be a finite [L+1, D] array, got shape {v.shape}")
  side = path.removesuffix(".safetensors") + ".json"
  meta = {**meta, "shape": list(v.shape), "dtype": "float32", "layer_convention": CONVENTION}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({"vector": v}, path + ".tmp", metadata={"format": "gravlab-vector"})
  with open(side + ".tmp", "w") as f:
    json.dump(meta, f, indent=2, default=jsonable)
  os.replace(path + ".tmp", path)
  os.replace(side + ".tmp", side)
  return path, side


def load_vector(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(vector `[L+1, D]` float32, sidecar dict) from a `save_vector` file. Raises ValueError naming the file when the
  tensor "vector" is missing or its shape disagrees with the sidecar; FileNotFoundError when either file is."""
  tensors = load_file(path)
  if "vector" not in tensors:
    raise ValueError(f"{path}: no tensor 'vector' (found {sorted(tensors)})")
  v = tensors["vector"]
  with open(path.removesuffix(".safetensors") + ".json") as f:
    meta = json.load(f)
  if list(v.shape) != meta.get("shape"):
    raise ValueError(f"{path}: tensor 'vector' has shape {list(v.shape)}, its sidecar says {meta.get('shape')}")
  return v.astype(np.float32), meta


# The exact-test cell fields a vector's sidecar and the layer map carry (probes.sweep_exact writes them).
EXACT_CELL_KEYS = ("layer", "alpha", "alpha_rel", "n_probes", "delta", "ci_low", "ci_high", "p", "q",
                   "dose_response", "killed")


def exact_cells(cells: list[dict], behavior: str) -> list[dict[str, Any]]:
  """The exact-test cells of one behavior, each cut to EXACT_CELL_KEYS (the fields it has)."""
  return [{k: c[k] for k in EXACT_CELL_KEYS if k in c} for c in cells if c["behavior"] == behavior]


def sweep_evidence(screen_row: dict, cells: list[dict], behavior: str) -> dict[str, Any]:
  """What the sweep found about `behavior`'s own vector: the screen's per-layer slope / p / q (layer l = resid_post[l])
  and the exact cells (EXACT_CELL_KEYS: layer, alpha, delta, ci_low, ci_high, p, q, ...) of that behavior."""
  return {"screen": {k: np.asarray(screen_row[k]).tolist() for k in ("slope", "z", "p", "q")},
          "exact_cells": exact_cells(cells, behavior)}


def jsonable(x):
  """json.dump default= for numpy scalars and arrays."""
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
