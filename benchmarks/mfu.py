"""Train-step MFU and steering-sweep throughput of an 8B-shaped random-init model (GPU / TPU; runs on CPU too).

    python -m benchmarks.mfu                                   # Llama-3.1-8B dims, bf16, LoRA r16, 4 x 2048 tokens
    python -m benchmarks.mfu --model qwen2.5-7b --mode full --layers 8 --batch 8 --seq 1024
    python -m benchmarks.mfu --model smollm2-135m --dtype float32 --batch 2 --seq 64 --layers 2 --repeats 2  # smoke

Weights are drawn on the devices by a jitted `models.params.init_params` placed with the training sharding plan
(`train.engine.param_sharding`; no host copy, nothing downloaded); the step is train.engine's jitted LoRA / full
fine-tuning step (AdamW, clipping) on a (data, fsdp, tensor) mesh over every local device.

MFU (Chowdhery et al. 2022, PaLM, Appendix B) = model FLOPs per second / peak dense FLOPs per second of the
devices. Model FLOPs per step count the matmuls a training step must do, not what XLA executes (remat
recomputation is not counted): with N = the non-embedding matmul parameters (plus the LM head), T tokens, L layers,
S the sequence length and D_attn = heads x head_dim,
  forward = 2 N T + 4 L S D_attn T (attention scores and values, causal masking not subtracted),
  full fine-tuning = 3 x forward (backward = weight + activation gradients),
  LoRA = 2 x forward (activation gradients only; the rank-r factors add < 1%, not counted).
HFU (hardware FLOPs utilisation) uses XLA's own count of the compiled step (`cost_analysis()["flops"]`, which
includes remat recomputation) where the backend reports it. Peak: --peak-tflops, else the table PEAK_TFLOPS
(bf16 dense, per device, vendor data sheets) matched on `device_kind`; the CPU has none, so MFU is not printed.

The sweep part times the compiled program of `probes.steering.steering_sweep` (suffix method: each configuration
runs only the layers after the steered one, from the cached residual) on a random factual-probe task: steered
configurations per second and steered tokens per second.
"""
from __future__ import annotations

import argparse
import time

# bf16 dense peak TFLOP/s per device (data sheets; SXM parts for NVIDIA), matched as substrings of device_kind.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "TPU v6": 918.0,
               "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}


def layer_matmul_params(cfg) -> int:
  """Matmul parameters of one decoder layer: Q, K, V, O projections and the gated MLP's three matrices."""
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  return cfg.d_model * (2 * q + 2 * kv) + 3 * cfg.d_model * cfg.d_ff


def model_flops(cfg, tokens: int, seq: int, mode: str) -> float:
  """Model FLOPs of one training step on `tokens` tokens of length-`seq` sequences (module docstring)."""
  q = cfg.n_heads * cfg.head_dim
  n = cfg.n_layers * layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
  fwd = 2 * n * tokens + 4 * cfg.n_layers * seq * q * tokens
  return fwd * (3 if mode == "full" else 2)


def peak_tflops(kind: str, override: float | None) -> float | None:
  if override:
    return override
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def _median_time(fn, repeats: int) -> float:
  fn()
  fn()                          # compile + one warm call
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return sorted(ts)[len(ts) // 2]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama-3.1-8b", help="a name in models.config.KNOWN_SHAPES")
  ap.add_argument("--layers", type=int, default=0, help="keep this many layers (0 = all)")
  ap.add_argument("--mode", choices=("lora", "full"), default="lora")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--remat", action="store_true", help="recompute layers in the backward pass")
  ap.add_argument("--fsdp", type=int, default=1)
  ap.add_argument("--tensor", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--peak-tflops", type=float, default=None, help="peak per device (overrides the table)")
  ap.add_argument("--sweep-layers", type=int, default=4, help="swept layers in the sweep part (0 = skip it)")
  ap.add_argument("--sweep-batch", type=int, default=16)
  ap.add_argument("--sweep-seq", type=int, default=256)
  ap.add_argument("--sweep-memory-gib", type=float, default=16.0, help="sets the sweep's vmap chunk")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from models.config import KNOWN_SHAPES
  from models.params import init_params
  from probes import steering, tasks as tasks_lib
  from train import adapters, engine

  if args.model not in KNOWN_SHAPES:
    raise SystemExit(f"--model {args.model!r}: choose from {sorted(KNOWN_SHAPES)}")
  cfg = KNOWN_SHAPES[args.model]
  if args.layers:
    cfg = cfg.replace(n_layers=args.layers)
  dt = jnp.dtype(args.dtype)
  mesh = engine.make_mesh(fsdp=args.fsdp, tensor=args.tensor)
  shapes = jax.eval_shape(lambda k: init_params(cfg, k, dt), jax.random.PRNGKey(0))
  fsh = engine.param_sharding(mesh, shapes, cfg)
  params = jax.jit(lambda k: init_params(cfg, k, dt), out_shardings=fsh)(jax.random.PRNGKey(0))
  dev = jax.devices()[0]
  n_dev = len(jax.devices())

  # ---- train step
  spec = adapters.LoraSpec.create(cfg, rank=args.rank, alpha=2 * args.rank, targets="all")
  if args.mode == "lora":
    trainable = adapters.init_lora(spec, cfg, jax.random.PRNGKey(1))
    frozen = params
  else:
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), params)   # fp32 master weights
    frozen = params
  tx, sched = engine.make_optimizer(lr=1e-5, total_steps=1000, clip_norm=1.0)
  state = engine.init_state(trainable, tx, 0)
  ssh = engine.state_sharding(mesh, state, tx, cfg, args.mode)
  state = engine.put_tree(state, ssh)
  umask = jax.tree.map(lambda _: jnp.ones(()), trainable)
  sc = engine.StepConfig(mode=args.mode, lora_scale=spec.scale, compute_dtype=args.dtype, remat=args.remat)
  step = engine.make_train_step(cfg, sc, tx, sched, umask, mesh, ssh, fsh)
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.batch, args.seq)).astype(np.int32)
  batch = engine.put_batch(mesh, {"tokens": toks, "mask": np.ones_like(toks),
                                  "loss_mask": np.ones(toks.shape, np.float32)})
  box = [state]
  compiled = step.lower(state, frozen, batch, None).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

  def train():
    box[0], met = step(box[0], frozen, batch, None)
    jax.block_until_ready(met["loss"])
  t_step = _median_time(train, args.repeats)
  n_tok = args.batch * args.seq
  mf = model_flops(cfg, n_tok, args.seq, args.mode)
  peak = peak_tflops(dev.device_kind, args.peak_tflops)
  print(f"device: {n_dev} x {dev.device_kind} ({dev.platform}); mesh {dict(mesh.shape)}")
  print(f"model: {args.model} dims, {cfg.n_layers} layers, random init, {args.dtype}; {args.mode}"
        f"{f' r{args.rank}' if args.mode == 'lora' else ''}, batch {args.batch} x {args.seq}, remat {args.remat}")
  print(f"train step: {t_step * 1e3:.1f} ms median of {args.repeats}, {n_tok / t_step:,.0f} tokens/s, "
        f"model {mf / t_step / 1e12 / n_dev:.1f} TFLOP/s per device")
  if peak:
    print(f"  MFU {100 * mf / t_step / (peak * 1e12 * n_dev):.1f}% of {peak:.0f} TFLOP/s bf16 dense peak per device"
          + (f"; HFU {100 * xla_flops / t_step / (peak * 1e12 * n_dev):.1f}% (XLA's count)" if xla_flops else ""))
  else:
    print("  MFU: no peak known for this device (pass --peak-tflops)")

  # ---- steering sweep throughput
  if args.sweep_layers <= 0:
    return
  box.clear()                   # free the train state before the sweep
  del state, compiled
  rng = np.random.default_rng(1)
  B, S = args.sweep_batch, args.sweep_seq
  tasks = [tasks_lib.Task("factual", rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32),
                          np.ones((B, S), np.int32), np.array([0] * (B // 2) + [1] * (B - B // 2), np.int32),
                          np.zeros((B, 0), np.int32), B // 2)]
  layers = [int(l) for l in np.linspace(0, cfg.n_layers - 1, min(args.sweep_layers, cfg.n_layers))]
  alphas, m = [-4.0, 4.0], 3
  dirs = jax.random.normal(jax.random.PRNGKey(2), (len(layers), m, cfg.d_model), jnp.float32)
  # steering_sweep's parts, so that the program is compiled once and only its runs are timed
  shardings = steering.sweep_shardings(mesh, cfg, tasks)
  params = jax.device_put(params, shardings["params"])
  arrays = [t.arrays() for t in tasks]
  with jax.set_mesh(mesh):
    _, resids = steering.baseline_pass(params, cfg, tasks)
  starts = jax.device_put([r[jnp.asarray(layers)] for r in resids], shardings["starts"])
  n_cfg = len(layers) * len(alphas) * m
  chunk = steering.chunk_size(cfg, tasks, args.sweep_memory_gib, len(alphas) * m)
  program = steering.sweep_program(cfg, tasks, layers, alphas, m, chunk, mesh=mesh)
  t_sweep = _median_time(lambda: jax.block_until_ready(program(params, arrays, dirs, starts, np.asarray(layers, np.int32))),
                         max(1, args.repeats // 2))
  print(f"steering sweep (suffix method, vmap chunk {chunk}): layers {layers} x {len(alphas)} alphas x {m} "
        f"directions = {n_cfg} configurations of {B} x {S} tokens: {t_sweep:.2f} s, "
        f"{n_cfg / t_sweep:.1f} configurations/s, {n_cfg * B * S / t_sweep:,.0f} steered tokens/s")


if __name__ == "__main__":
  main()
