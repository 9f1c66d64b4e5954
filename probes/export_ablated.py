"""Directionally ablated weights from a gravlab vector file, as a Hugging Face directory transformers loads.

    python -m probes.export_ablated --model=smollm2-135m-instruct \\
        --vector=runs/x/sweep/vectors/refusal.caa.safetensors --layer=18 --out=runs/x/smollm2-no-refusal-l18

r = row layer + 1 of the vector file (resid_post[layer], probes.vectors), normalised; every matrix writing to the
residual stream loses its component along r (models.ablation.orthogonalize: embeddings, o_proj (+ bias),
down_proj; tied embeddings are untied), and the result is written with models.hf_io.save_hf (config.json,
safetensors, the tokenizer; atomic). The written model equals gravlab's forward with
`models.interventions.ablate_direction(L, r)` (tests/test_ablation.py, within 1e-4 in transformers). A JSON
`gravlab_ablation.json` in the directory records the model, the vector file, its sidecar's behavior / method and the
layer the direction came from.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from models.ablation import orthogonalize
from models.hf_io import save_hf
from models.loading import load, load_tokenizer
from probes import vectors as vectors_io


def export(model: str, vector_path: str, layer: int, out: str, overwrite: bool = False) -> str:
  """Write `model` with the direction of `vector_path`'s resid_post[layer] ablated to `out`; returns `out`.
  Raises ValueError naming the flag for a layer outside the vector file, and models.hf_io's errors when `out`
  exists (unless overwrite)."""
  vector, meta = vectors_io.load_vector(vector_path)
  if not 0 <= layer < vector.shape[0] - 1:
    raise ValueError(f"--layer={layer}: {vector_path} has decoder layers 0..{vector.shape[0] - 2}")
  params, cfg = load(model)
  if cfg.d_model != vector.shape[1]:
    raise ValueError(f"{vector_path}: tensor 'vector' has d_model {vector.shape[1]}, {model} has {cfg.d_model}")
  new, ncfg = orthogonalize(params, cfg, vector[layer + 1])
  path = save_hf(new, ncfg, out, tokenizer=load_tokenizer(model), overwrite=overwrite)
  with open(os.path.join(path, "gravlab_ablation.json"), "w") as f:
    json.dump({"model": model, "vector": os.path.abspath(vector_path), "layer": layer,
               "site": "resid_post", **{k: meta.get(k) for k in ("behavior", "method", "weights")}}, f, indent=2)
  return path


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    path = export(f.model, f.vector, f.layer, f.out, f.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {path} (transformers: AutoModelForCausalLM.from_pretrained({path!r}))")


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "Registry name, HF directory or .gguf path.", required=True)
  flags.DEFINE_string("vector", None, "A probes.vectors file (.safetensors with its .json sidecar).", required=True)
  flags.DEFINE_integer("layer", None, "Decoder layer whose resid_post row gives the direction.", required=True)
  flags.DEFINE_string("out", None, "Output directory (must not exist unless --overwrite).", required=True)
  flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
  app.run(main)
