"""A gravlab vector file (probes.vectors) as a llama.cpp control vector: GGUF, architecture "controlvector".

    python -m probes.export_control_vector --vector=runs/x/sweep/vectors/refusal.caa.safetensors \\
        --layers=13-20 --alpha=4 --out=refusal.gguf
    llama-cli -m model.gguf --control-vector refusal.gguf      # alpha is already in the tensors
    llama-cli -m model.gguf --control-vector-scaled refusal.gguf 0.5 --control-vector-layer-range 13 20

Layer convention. llama.cpp adds tensor `direction.{il}` to the output of decoder layer il (0-based), at every
position, times the file's scale (src/llama-adapter.cpp `llama_adapter_cvec::apply` and `tensor_for(il)`, applied by
each model graph's `build_cvec(cur, il)` after layer il); its loader (common/common.cpp
`llama_control_vector_load_one`) rejects layer index 0 and stores nothing for it, so the output of layer 0 cannot be
steered. gravlab steers "at layer l" by adding to resid_post[l], the output of decoder layer l, which is row l + 1
of a vector file. So direction.{l} = alpha * vector[l + 1] for l >= 1, the same index as gravlab's layer. This is
also repeng's convention (its ControlVector.export_gguf writes `direction.{layer}` for model.layers[layer]'s output).

The file is written with the gguf package's GGUFWriter: keys controlvector.model_hint (the model architecture)
and controlvector.layer_count, one float32 tensor `direction.{l}` `[D]` per exported layer, and the evidence as extra
keys under `gravlab.` (model, weight sha256, behavior, method, alpha, layers, the sidecar's evidence as JSON).
"""
from __future__ import annotations

import json
import os
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from models.interventions import Interventions
from probes import vectors as vectors_io

ARCH = "controlvector"


def parse_layers(spec: str, n_layers: int) -> list[int]:
  """"a-b" (inclusive), "a,b,c" or "a" -> sorted decoder layer indices. Raises ValueError naming the flag for a
  malformed spec, layer 0 (llama.cpp cannot steer it) or a layer outside 1 .. n_layers - 1."""
  try:
    if "-" in spec:
      a, b = (int(x) for x in spec.split("-"))
      layers = list(range(a, b + 1))
    else:
      layers = sorted({int(x) for x in spec.split(",")})
  except ValueError:
    raise ValueError(f"--layers={spec!r}: expected 'a-b', 'a,b,c' or 'a' (decoder layer indices)") from None
  return _check_layers(layers, n_layers, spec)


def _check_layers(layers: list[int], n_layers: int, spec) -> list[int]:
  """`layers` when non-empty and all in 1 .. n_layers - 1; else ValueError naming --layers=`spec`."""
  bad = [l for l in layers if not 1 <= l < n_layers]
  if not layers or bad:
    raise ValueError(f"--layers={spec!r}: layers must lie in 1..{n_layers - 1} (llama.cpp has no direction.0: "
                     f"the output of layer 0 cannot be steered); got {bad or 'none'}")
  return layers


def control_directions(vector: np.ndarray, layers: list[int], alpha: float) -> dict[int, np.ndarray]:
  """{l: alpha * vector[l + 1]} float32 `[D]` for each decoder layer l (module docstring's mapping).

  vector `[L+1, D]` in probes.vectors' boundary convention. Raises ValueError for a layer outside 1..L-1."""
  _check_layers(list(layers), vector.shape[0] - 1, ",".join(map(str, layers)))
  return {l: (float(alpha) * np.asarray(vector[l + 1], np.float32)).astype(np.float32) for l in layers}


def write_control_vector(path: str, directions: dict[int, np.ndarray], model_hint: str,
                         extra: dict[str, Any] | None = None) -> str:
  """Write `directions` {l: `[D]`} as a llama.cpp control vector to `path` (to a temporary name, then renamed: no
  half-written file). `extra` keys are written as gravlab.<key>: strings as they are, other values as JSON."""
  tmp = path + ".tmp"
  w = gguf.GGUFWriter(tmp, ARCH)
  w.add_string(f"{ARCH}.model_hint", model_hint)
  w.add_uint32(f"{ARCH}.layer_count", len(directions))
  for k, v in (extra or {}).items():
    w.add_string(f"gravlab.{k}", v if isinstance(v, str) else json.dumps(v, default=vectors_io.jsonable))
  for l in sorted(directions):
    w.add_tensor(f"direction.{l}", np.ascontiguousarray(directions[l], np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  os.replace(tmp, path)
  return path


def read_control_vector(path: str) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
  """({l: `[D]` float32}, {key: value} of the file's metadata) from a control-vector GGUF (gguf.GGUFReader).
  Raises ValueError naming the file when its architecture is not "controlvector" or a tensor is not direction.N."""
  r = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
  if meta.get("general.architecture") != ARCH:
    raise ValueError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, not {ARCH!r}")
  out = {}
  for t in r.tensors:
    head, _, idx = t.name.partition(".")
    if head != "direction" or not idx.isdigit():
      raise ValueError(f"{path}: tensor {t.name!r} is not direction.<layer>")
    out[int(idx)] = np.asarray(t.data, np.float32).reshape(-1)
  return out, meta


def to_interventions(directions: dict[int, np.ndarray], n_layers: int) -> Interventions:
  """What llama.cpp does with these directions, as gravlab steering: resid_add `[L, 1, 1, D]` with
  direction.{l} at resid_post[l] and zeros elsewhere (every position, every row)."""
  d = len(next(iter(directions.values())))
  add = np.zeros((n_layers, 1, 1, d), np.float32)
  for l, v in directions.items():
    add[l, 0, 0] = v
  return Interventions(resid_add=jnp.asarray(add))


def export(vector_path: str, layers: str, alpha: float, out: str) -> str:
  """Read `vector_path` (probes.vectors), map `layers` at `alpha`, write the GGUF to `out`; returns `out`."""
  vector, meta = vectors_io.load_vector(vector_path)
  dirs = control_directions(vector, parse_layers(layers, vector.shape[0] - 1), alpha)
  extra = {"source": os.path.abspath(vector_path), "alpha": alpha, "layers": sorted(dirs),
           **{k: meta[k] for k in ("model", "weights", "behavior", "method", "evidence") if k in meta}}
  return write_control_vector(out, dirs, meta.get("architecture", "llama"), extra)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    path = export(f.vector, f.layers, f.alpha, f.out)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {path} (llama.cpp: --control-vector {path})")


if __name__ == "__main__":
  flags.DEFINE_string("vector", None, "A probes.vectors file (.safetensors with its .json sidecar).", required=True)
  flags.DEFINE_string("layers", None, "Decoder layers: 'a-b' (inclusive), 'a,b,c' or 'a'; 1 .. L-1.", required=True)
  flags.DEFINE_float("alpha", 1.0, "Steering coefficient, in units of the vector (direction = alpha * vector).")
  flags.DEFINE_string("out", None, "Output GGUF path.", required=True)
  app.run(main)
