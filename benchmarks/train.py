"""LoRA train-step speed: gravlab (one jitted JAX step) vs transformers + PEFT (PyTorch), same CPU, one run.

    python -m benchmarks.train [--model smollm2-135m-instruct] [--batch 4] [--seq 128] [--rank 8] [--repeats 5]

Both sides: fp32, LoRA rank r / alpha 2r on q,k,v,o,gate,up,down of every layer, the full-sequence causal-LM
loss, backward, global-norm clipping 1.0 and an AdamW update (optax.adamw / torch.optim.AdamW). Prints the median
step time, tokens/s and the ratio (target >= 1.0x).
"""
from __future__ import annotations

import argparse
import os
import time


def _time_interleaved(fns, repeats: int) -> list[float]:
  """Median seconds per call of each function, after two warm-up calls each (compilation), timing the functions
  alternately so that both see the same machine load (the CPU may be shared)."""
  for fn in fns:
    fn()
    fn()
  ts = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      ts[i].append(time.perf_counter() - t0)
  return [sorted(t)[len(t) // 2] for t in ts]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from peft import LoraConfig, get_peft_model

  from models import registry
  from models.loading import load
  from train import adapters, engine

  src = registry.resolve(args.model)
  params, cfg = load(args.model)
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
  n_tok = args.batch * args.seq

  # ---- gravlab: the engine's jitted step (SFT loss on every position, no accumulation, one device).
  spec = adapters.LoraSpec.create(cfg, rank=args.rank, alpha=2 * args.rank, targets="all")
  lora = adapters.init_lora(spec, cfg, jax.random.PRNGKey(0))
  tx, sched = engine.make_optimizer(lr=1e-4, total_steps=1000, clip_norm=1.0)
  mesh = engine.make_mesh()
  state = engine.init_state(lora, tx, 0)
  st_sh, fr_sh = engine.replicated(mesh, state), engine.param_sharding(mesh, params)
  m = jnp.asarray(spec.layer_mask())[:, None, None]
  step = engine.make_train_step(cfg, engine.StepConfig(lora_scale=spec.scale), tx, sched,
                                {t: {"a": m, "b": m} for t in lora}, mesh, st_sh, fr_sh)
  host = {"tokens": toks[None], "mask": np.ones_like(toks)[None], "loss_mask": np.ones(toks.shape, np.float32)[None]}
  batch = engine.put_batch(mesh, host)
  box = [jax.device_put(state, st_sh)]

  def ours():
    box[0], met = step(box[0], params, batch, None)
    jax.block_until_ready(met["loss"])

  # ---- transformers + PEFT.
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=torch.float32)
  model = get_peft_model(ref, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], task_type="CAUSAL_LM"))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
  tt = torch.as_tensor(toks, dtype=torch.long)

  def theirs():
    out = model(input_ids=tt, labels=tt)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  ours_s, torch_s = _time_interleaved([ours, theirs], args.repeats)

  print(f"device: {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
  print(f"LoRA train step, {args.model}, batch {args.batch} x seq {args.seq}, fp32, rank {args.rank} on "
        f"q,k,v,o,gate,up,down, loss + backward + clip + AdamW, median of {args.repeats}, timed alternately:")
  print(f"  gravlab (jax.jit)        {n_tok / ours_s:8.0f} tok/s  ({ours_s * 1e3:.0f} ms)")
  print(f"  transformers + PEFT      {n_tok / torch_s:8.0f} tok/s  ({torch_s * 1e3:.0f} ms)")
  print(f"  ratio gravlab / torch    {torch_s / ours_s:8.2f}x   (target >= 1.0x)")


if __name__ == "__main__":
  main()
