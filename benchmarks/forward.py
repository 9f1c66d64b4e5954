"""Forward-pass speed and loading memory: gravlab (JAX) vs transformers (PyTorch), same CPU, same model, one run.

    python -m benchmarks.forward [--model smollm2-135m-instruct] [--batch 8] [--seq 128] [--repeats 5]

Prints tokens/s of a full-logits forward for both and their ratio (target >= 1.0x), then the peak RSS of
loading the model with each library, each in a fresh subprocess (RSS above the post-import baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _status_mb(field: str) -> float:
  """VmRSS (current) or VmHWM (peak) of this process from /proc/self/status, in MiB.

  Not getrusage().ru_maxrss: Linux carries it over execve, so a child of a large process would start with the
  parent's peak.
  """
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _time(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  ts.sort()
  return ts[len(ts) // 2]


def measure_load(kind: str, path: str) -> dict:
  """Runs in a subprocess: import everything, record baseline RSS, load, record peak RSS."""
  import jax
  import jax.numpy  # noqa: F401
  import torch
  import transformers

  from models.loading import load
  jax.numpy.ones(8).block_until_ready()   # start the CPU client before the baseline
  base = _status_mb("VmRSS")
  t0 = time.perf_counter()
  if kind == "ours":
    params, _ = load(path)
    jax.block_until_ready(params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  else:
    if path.endswith(".gguf"):
      m = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    else:
      m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
  return {"kind": kind, "path": path, "load_s": time.perf_counter() - t0, "baseline_mb": base,
          "peak_mb": _status_mb("VmHWM"),
          "delta_mb": _status_mb("VmHWM") - base, "model_mb": nbytes / 2**20}


def _load_in_subprocess(kind: str, path: str) -> dict:
  out = subprocess.run([sys.executable, "-m", "benchmarks.forward", "--measure-load", kind, path],
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--measure-load", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.measure_load:
    print(json.dumps(measure_load(*args.measure_load)))
    return

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from models import registry
  from models.hf_io import save_hf
  from models.loading import load
  from models.transformer import forward_jit

  src = registry.resolve(args.model)
  params, cfg = load(args.model)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=torch.float32).eval()
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
  jt, tt = jnp.asarray(toks), torch.tensor(toks)
  n_tok = args.batch * args.seq

  ours_s = _time(lambda: jax.block_until_ready(forward_jit(params, jt, cfg)[0]), args.repeats)
  with torch.inference_mode():
    torch_s = _time(lambda: ref(tt).logits, args.repeats)
  print(f"device: {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
  print(f"forward, {args.model}, batch {args.batch} x seq {args.seq}, fp32, full logits, median of "
        f"{args.repeats}:")
  print(f"  gravlab (jax.jit)      {n_tok / ours_s:9.0f} tok/s  ({ours_s * 1e3:.0f} ms)")
  print(f"  transformers (torch)   {n_tok / torch_s:9.0f} tok/s  ({torch_s * 1e3:.0f} ms)")
  print(f"  ratio gravlab / torch  {torch_s / ours_s:9.2f}x   (target >= 1.0x)")
  del ref

  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    save_hf(params, cfg, hf_dir)
    del params
    rows = [_load_in_subprocess(k, p) for p in (src.path, hf_dir) for k in ("ours", "transformers")]
  print("loading, peak RSS above the post-import baseline (fresh process each):")
  for r in rows:
    fmt = "GGUF" if r["path"].endswith(".gguf") else "safetensors fp32"
    print(f"  {r['kind']:<13} {fmt:<17} model {r['model_mb']:7.0f} MB  peak +{r['delta_mb']:7.0f} MB "
          f"({r['delta_mb'] / r['model_mb']:.2f}x model)  {r['load_s']:.1f}s")


if __name__ == "__main__":
  main()
