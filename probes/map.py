"""The layer map of a model: run the kill-zone study at its `:map` size and write one artifact (probes.layer_map).

    python -m probes.map --model=smollm2-135m-instruct --workdir=runs/smollm2-map
    python -m probes.map --model=/path/to/hf_dir_or.gguf --workdir=runs/x-map
    python -m probes.map --sweep=docs/main_smollm2/sweep --workdir=runs/from-sweep    # no new run

--model: a registry name, HF directory or GGUF (local files only). The sweep runs with configs/sweep.py:map
(`--config.x=v` overrides any field), its exact cells placed at about 1/3 and 3/5 of the model's depth, into
<workdir>/sweep (resumable like any sweep). --sweep builds the map from a finished sweep workdir instead.

Writes to --workdir: map.json (schema docs/layer_map.schema.json, explained in docs/layer_map.md), map.png and
map.md (a model-card section). Each file is written atomically, after every number is computed. Bad input (an
unknown model, a sweep workdir that is not one) stops with one line and exit status 2.
"""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from absl import flags

from models import registry
from models.loading import load, load_tokenizer
from probes import layer_map, plots
from probes import lens as lens_lib
from probes import vectors as vectors_io
from probes import sweep as sweep_lib
from probes.sweep_config import SweepConfig
from train.cli import run_app
from train.rundir import atomic_path, default_workdir, write_json, write_text

EXACT_DEPTHS = (1 / 3, 3 / 5)


def exact_layers(n_layers: int, depths=EXACT_DEPTHS) -> list[int]:
  """Decoder layers at the given fractions of the depth (rounded, distinct, within 0 .. n_layers - 1)."""
  return sorted({min(n_layers - 1, max(0, round(f * n_layers))) for f in depths})


def write_map(m: dict, out_dir: str) -> dict[str, str]:
  """map.json, map.png and map.md of the map `m` in `out_dir` (map.png with the logit-lens panel when the map has
  one); returns their paths."""
  paths = {k: os.path.join(out_dir, f"map.{k}") for k in ("json", "png", "md")}
  fig = plots.layer_map(m)
  md = layer_map.markdown(m)
  with atomic_path(paths["png"]) as tmp:
    fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
  write_text(paths["md"], md)
  write_json(paths["json"], m)
  return paths


def run_map(config: SweepConfig, workdir: str | None, model: str | None = None, sweep_dir: str | None = None,
            q_level: float | None = None, lens_pairs: int = 32) -> str:
  """Run (or, with `sweep_dir`, read) the sweep and write the map (module docstring); returns map.md's path.

  config: the `:map` SweepConfig (its model replaced by `model` when given). lens_pairs: refusal pairs of the
  logit lens (probes.lens; 0 = none; with `sweep_dir` the sweep's model is loaded for it). Raises ValueError /
  FileNotFoundError for a model that does not resolve or a sweep workdir that is not one (probes.layer_map.build)."""
  loaded = None
  if sweep_dir is None:
    config = dataclasses.replace(config, model=model) if model else config
    registry.resolve(config.model)
    params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
    config = dataclasses.replace(config, exact_layers=tuple(exact_layers(cfg.n_layers)))
    name = config.model.rstrip("/").split("/")[-1].removesuffix(".gguf")
    workdir = workdir or default_workdir(name + "-map")
    sweep_dir = os.path.join(workdir, "sweep")
    loaded = (params, cfg, load_tokenizer(config.model))
    sweep_lib.run(config, sweep_dir, loaded=loaded, weights=vectors_io.weights_digest(config.model))
  else:
    workdir = workdir or os.path.join(sweep_dir, "layer_map")
  m = layer_map.build(sweep_dir, q_level)                 # checks the sweep before any model is loaded
  if lens_pairs > 0:
    if loaded is None:
      name = m["source"]["config"].get("model", m["model"]["name"])
      loaded = (*load(name, dtype=jnp.float32), load_tokenizer(name))
    m["logit_lens"] = lens_lib.refusal_lens(*loaded, n=lens_pairs)
  return write_map(m, workdir)["md"]


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "Model: registry name, HF directory or GGUF (default: the config's).")
  flags.DEFINE_string("sweep", None, "Build the map from this finished probes.sweep workdir instead of running.")
  flags.DEFINE_float("q_level", None, "Window threshold on the screen's BH q (default: the config's q_level).")
  flags.DEFINE_integer("lens_pairs", 32, "Refusal pairs for the logit lens (probes.lens); 0 = no lens.")
  run_app(lambda c, w: run_map(c, w, flags.FLAGS.model, flags.FLAGS.sweep, flags.FLAGS.q_level,
                               flags.FLAGS.lens_pairs),
          "configs/sweep.py:map", "Output directory (default runs/<date>-<model>-map).", typed=SweepConfig)
