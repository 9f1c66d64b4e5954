"""All-heads activation patching speed: gravlab's one-program patching (JAX) vs a per-head PyTorch hook loop, same
CPU, same model, same prompts, one run.

    python -m benchmarks.patching [--n 16] [--ref-heads 12] [--repeats 3] [--json out.json]

Task: IOI (analysis.ioi.data, seeded), the clean prompts patched with their ABC counterparts' head outputs at the
final position, metric logit(IO) - logit(S) at the final position, every head of SmolLM2-135M-Instruct
(30 layers x 9 heads = 270), fp32.

Ours, each ONE jitted program that also runs the donor (ABC) forward:
  full         analysis.ioi.circuits.patch_each_head(method="full", pos_mask = final position): a full forward per head;
  last         patch_each_head(method="last"): exact, single-token decodes over the clean run's KV cache;
  attribution  analysis.ioi.circuits.attribution_patch (pos_mask = final position): one forward + one backward, a
               first-order ESTIMATE, not exact patching.
Compile and run times are measured separately (jit(...).lower(...).compile(), then the compiled executable).

Reference (TransformerLens-style loop on transformers' LlamaForCausalLM from the same GGUF): one forward of the ABC
prompts caching every layer's `self_attn.o_proj` input, then per head one forward of the clean prompts with a
forward pre-hook on that layer's `o_proj` replacing the head's slice at the final position with the cached one
(`logits_to_keep=1`, `torch.inference_mode`, explicit left-padding position ids, torch threads = the faster of 1
and all cores for one forward, chosen at run time: on an oversubscribed CPU torch's OpenMP threads can run
several times slower than one thread). To keep the run short the loop
is timed on `--ref-heads` heads (evenly spread, plus our top-3 heads by effect so the agreement check covers heads
that matter) and extrapolated linearly to all heads; the output says so. Its logit differences on those heads are
compared with ours (max abs diff), and our three methods with each other.

TransformerLens (benchmarks/patching_tl.py, the `bench` extra): `transformer_lens.patching.generic_activation_patch`
with `layer_pos_head_vector_patch_setter` on `hook_z` at the final position, TransformerLens's own batched patching
helper on a TransformerBridge over the same transformers model, timed on ALL heads (no extrapolation) and compared
with ours head by head. Its helpers pass no attention mask, so every method runs on unpadded prompts: the IOI
templates of one token length (`patching_tl.equal_length_templates`).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from analysis.ioi import circuits as C
from analysis.ioi.data import make_ioi
from benchmarks import patching_tl
from models import registry
from models.loading import load, load_tokenizer


def reference_loop(model, tokens, abc_tokens, mask, io, s, heads):
  """Per-head hook loop. Returns (donor forward seconds, per-head seconds [K], logit diffs [K, N], clean [N])."""
  import torch  # local: torch is the reference's, a test-only package the runtime install does not have

  tt, ta, tm = (torch.tensor(np.asarray(x), dtype=torch.long) for x in (tokens, abc_tokens, mask))
  pos = torch.clamp(torch.cumsum(tm, -1) - 1, min=0)           # same positions as gravlab / generate
  io_t, s_t = torch.tensor(np.asarray(io), dtype=torch.long), torch.tensor(np.asarray(s), dtype=torch.long)
  layers = model.model.layers
  hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads

  def ld(x):
    logits = model(input_ids=x, attention_mask=tm, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
    return (logits.gather(1, io_t[:, None]) - logits.gather(1, s_t[:, None]))[:, 0]

  with torch.inference_mode():
    clean = ld(tt).numpy()                                       # warm-up + the unpatched metric
    t0 = time.perf_counter()
    cache = {}
    hooks = [layers[l].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, l=l: cache.__setitem__(l, args[0][:, -1].clone())) for l in range(len(layers))]
    try:
      model(input_ids=ta, attention_mask=tm, position_ids=pos, logits_to_keep=1)
    finally:
      for h in hooks:
        h.remove()
    t_donor = time.perf_counter() - t0
    times, out = [], []
    for l, h in heads:
      def patch(mod, args, l=l, h=h):
        x = args[0].clone()
        x[:, -1, h * hd:(h + 1) * hd] = cache[l][:, h * hd:(h + 1) * hd]
        return (x,)
      t0 = time.perf_counter()
      hook = layers[l].self_attn.o_proj.register_forward_pre_hook(patch)
      try:
        out.append(ld(tt).numpy())
      finally:
        hook.remove()
      times.append(time.perf_counter() - t0)
  return t_donor, np.array(times), np.stack(out), clean


def pick_torch_threads(model, tokens, mask, repeats: int = 3) -> tuple[int, dict[int, float]]:
  """The faster of 1 and all-cores torch threads for one forward of the clean batch (median of `repeats`).

  On a shared, oversubscribed CPU torch's OpenMP threads can wait on each other and run several times slower
  than one thread; the reference gets whichever setting is faster at the time.
  """
  import torch  # local: test-only package (see reference_loop)

  x, m = torch.tensor(np.asarray(tokens), dtype=torch.long), torch.tensor(np.asarray(mask), dtype=torch.long)
  secs = {}
  with torch.inference_mode():
    for th in sorted({1, os.cpu_count() or 1}):
      torch.set_num_threads(th)
      model(input_ids=x, attention_mask=m, logits_to_keep=1)
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=x, attention_mask=m, logits_to_keep=1)
        ts.append(time.perf_counter() - t0)
      secs[th] = float(np.median(ts))
  best = min(secs, key=secs.get)
  torch.set_num_threads(best)
  return best, secs


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--n", type=int, default=16, help="IOI prompts")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--ref-heads", type=int, default=12, help="heads the PyTorch loop is timed on (evenly spread)")
  ap.add_argument("--repeats", type=int, default=3, help="runs of the last / attribution programs (median)")
  ap.add_argument("--chunk-full", type=int, default=9)
  ap.add_argument("--chunk-last", type=int, default=27)
  ap.add_argument("--skip-transformerlens", action="store_true", help="leave out the TransformerLens reference")
  ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
  return ap.parse_args()


def measure_ours(args, params, cfg, inputs, last_pos) -> dict:
  """Compile and run each of our three methods; {method: {compile_s, run_s, runs, result [L, H, N], load}}."""
  def program(method):
    def f(params, toks, abc, mask, io, s):
      donor = C.head_outputs(params, cfg, abc, mask)
      if method == "attribution":
        return C.attribution_patch(params, cfg, toks, mask, donor, io, s, pos_mask=last_pos)
      if method == "full":
        return C.patch_each_head(params, cfg, toks, mask, donor, io, s, pos_mask=last_pos, chunk=args.chunk_full)
      return C.patch_each_head(params, cfg, toks, mask, donor, io, s, chunk=args.chunk_last, method="last")
    return jax.jit(f)

  ours = {}
  for method in ("full", "last", "attribution"):
    t0 = time.perf_counter()
    compiled = program(method).lower(*inputs).compile()
    t_compile = time.perf_counter() - t0
    runs = []
    for _ in range(1 if method == "full" else args.repeats):
      t0 = time.perf_counter()
      res = np.asarray(jax.block_until_ready(compiled(*inputs)))
      runs.append(time.perf_counter() - t0)
    ours[method] = {"compile_s": t_compile, "run_s": float(np.median(runs)), "runs": len(runs), "result": res,
                    "load_avg_1min": os.getloadavg()[0]}
    print(f"  ours {method:<11} compile {t_compile:6.1f} s, run {ours[method]['run_s']:7.1f} s "
          f"(median of {len(runs)}; 1-min load average after: {os.getloadavg()[0]:.1f})", flush=True)
  return ours


def compare(ours, ref_total, idx, ref_ld, tl) -> dict:
  """Print the table of our methods against the hook loop (and TransformerLens); the per-method JSON rows."""
  full = ours["full"]["result"]
  cols = [("hook loop", ref_total)] + ([("TransformerLens", tl["total_s"])] if tl else [])
  print(f"{'method':<28}{'compile+run s':>14}{'run s':>9}"
        + "".join(f"{name + ' / ours':>24}{'(excl. compile)':>17}" for name, _ in cols)
        + f"{'max|d| vs loop':>15}{'max|d| vs TL':>14}{'max|d| vs full':>16}")
  for name, total in cols:
    print(f"{name + ' (reference)':<28}{total:14.1f}{total:9.1f}")
  rows = {}
  for method, r in ours.items():
    incl = r["compile_s"] + r["run_s"]
    vs_ref = float(np.abs(r["result"][idx] - ref_ld).max())
    vs_tl = float(np.abs(r["result"].reshape(-1, r["result"].shape[-1]) - tl["result"]).max()) if tl else None
    vs_full = float(np.abs(r["result"] - full).max())
    label = {"full": "ours full (exact)", "last": "ours last (exact)",
             "attribution": "ours attribution (estimate)"}[method]
    print(f"{label:<28}{incl:14.1f}{r['run_s']:9.1f}"
          + "".join(f"{total / incl:23.1f}x{total / r['run_s']:16.1f}x" for _, total in cols)
          + f"{vs_ref:15.2e}{'-' if vs_tl is None else f'{vs_tl:.2e}':>14}{vs_full:16.2e}")
    rows[method] = {"compile_s": r["compile_s"], "run_s": r["run_s"], "runs": r["runs"],
                    "ratio_incl_compile": ref_total / incl, "ratio_excl_compile": ref_total / r["run_s"],
                    "max_abs_diff_vs_reference": vs_ref, "max_abs_diff_vs_full": vs_full,
                    "load_avg_1min": r["load_avg_1min"]}
    if tl:
      rows[method].update(transformerlens_ratio_incl_compile=tl["total_s"] / incl,
                          transformerlens_ratio_excl_compile=tl["total_s"] / r["run_s"],
                          max_abs_diff_vs_transformerlens=vs_tl)
  return rows


def run_transformerlens(ref, src, toks, abc, io, s, L, H):
  """TransformerLens's helper on all L x H heads (benchmarks/patching_tl.py); its figures, printed."""
  import transformers  # local: the PyTorch reference's test-only packages (see reference_loop)

  hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path))
  bridge = patching_tl.boot_bridge(ref, hf_tok)
  tl = patching_tl.transformerlens_patching(bridge, toks, abc, io, s, [(l, h) for l in range(L) for h in range(H)])
  tl["total_s"] = tl["donor_s"] + tl["patch_s"]
  tl["load_avg_1min"] = os.getloadavg()[0]
  print(f"TransformerLens 4.3 generic_activation_patch (hook_z, final position) on all {L * H} heads: "
        f"{tl['patch_s']:.1f} s + donor run_with_cache {tl['donor_s']:.2f} s = {tl['total_s']:.1f} s "
        f"(1-min load average after: {tl['load_avg_1min']:.1f})")
  return tl


def main() -> None:
  args = _args()
  import torch  # local: the PyTorch reference's test-only packages (see reference_loop)
  import transformers

  params, cfg = load(args.model)
  tok = load_tokenizer(args.model)
  src = registry.resolve(args.model)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=torch.float32).eval()
  d = make_ioi(tok, args.n, seed=args.seed, templates=patching_tl.equal_length_templates(tok))
  if not d.mask.all():
    raise SystemExit("equal-length IOI templates gave padded prompts; TransformerLens's helpers need unpadded ones")
  toks, abc, mask = jnp.asarray(d.tokens), jnp.asarray(d.abc_tokens), jnp.asarray(d.mask)
  io, s = jnp.asarray(d.io), jnp.asarray(d.s)
  L, H = cfg.n_layers, cfg.n_heads
  N, S = d.tokens.shape
  last_pos = jnp.zeros((N, S), jnp.float32).at[:, -1].set(1.0)
  print(f"device: {jax.devices()[0].platform}, {os.cpu_count()} CPU cores (shared machine: the 1-min load average "
        f"is printed with each measurement; {os.getloadavg()[0]:.1f} now)")
  print(f"IOI, {args.model}: {N} prompts (seed {args.seed}; templates of one token length, unpadded), length {S}, "
        f"clean <- ABC head outputs at the final position, all {L} x {H} = {L * H} heads, fp32")
  ours = measure_ours(args, params, cfg, (params, toks, abc, mask, io, s), last_pos)

  full = ours["full"]["result"]                                            # [L, H, N]
  out, _ = jax.jit(lambda p, t, m: C.forward(p, t, cfg, attention_mask=m, logits="last"))(params, toks, mask)
  clean = np.asarray(C.logit_diff(out, io, s))
  effect = np.abs(full.mean(-1) - clean.mean()).reshape(-1)
  spread = np.linspace(0, L * H - 1, max(args.ref_heads - 3, 1)).round().astype(int)
  flat = list(dict.fromkeys([*spread.tolist(), *np.argsort(-effect)[:3].tolist()]))
  heads = [(i // H, i % H) for i in flat]
  threads, thread_secs = pick_torch_threads(ref, d.tokens, d.mask)
  print(f"torch threads: {threads} (one clean forward, median of 3: "
        + ", ".join(f"{k} thread(s) {v:.2f} s" for k, v in thread_secs.items()) + ")")
  t_donor, t_heads, ref_ld, ref_clean = reference_loop(ref, d.tokens, d.abc_tokens, d.mask, d.io, d.s, heads)
  per_head = float(np.median(t_heads))
  ref_total = t_donor + per_head * L * H
  ref_fastest = t_donor + float(t_heads.min()) * L * H          # conservative: every head as fast as the fastest
  idx = (np.array([l for l, _ in heads]), np.array([h for _, h in heads]))
  ref_load = os.getloadavg()[0]
  print(f"reference: PyTorch hook loop timed on {len(heads)} of {L * H} heads (median {per_head:.2f} s / head, "
        f"range {t_heads.min():.2f}-{t_heads.max():.2f}; donor forward {t_donor:.2f} s; 1-min load average after: "
        f"{ref_load:.1f}), EXTRAPOLATED linearly to all heads: {ref_total:.1f} s")
  tl = None if args.skip_transformerlens else run_transformerlens(ref, src, d.tokens, d.abc_tokens, d.io, d.s, L, H)
  rows = compare(ours, ref_total, idx, ref_ld, tl)
  last_r = ours["last"]
  print(f"conservative (every reference head as fast as the fastest timed one, {ref_fastest:.1f} s): "
        f"last {ref_fastest / (last_r['compile_s'] + last_r['run_s']):.1f}x incl. compile, "
        f"{ref_fastest / last_r['run_s']:.1f}x excl.")
  eff = np.abs(ref_ld - ref_clean[None])
  print(f"agreement check on the {len(heads)} reference heads: |patched - clean| logit diff up to "
        f"{eff.max():.3f} (mean {eff.mean():.3f}); clean logit diff ours vs reference max |d| "
        f"{np.abs(clean - ref_clean).max():.2e} (mean clean logit diff {clean.mean():.3f})")
  imp = lambda x: (clean.mean() - x.mean(-1)).reshape(-1)
  corr = float(np.corrcoef(imp(ours["attribution"]["result"]), imp(full))[0, 1])
  print(f"attribution estimate vs exact head importance (mean over prompts): Pearson r = {corr:.3f}")
  if args.json:
    tl_json = None if tl is None else {k: tl[k] for k in ("donor_s", "patch_s", "total_s", "load_avg_1min")}
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "n_prompts": N, "seq": S, "heads": L * H, "cpu_cores": os.cpu_count(),
                 "torch_threads": threads, "torch_threads_forward_s": thread_secs, "reference": {
                     "heads_timed": len(heads), "per_head_s": per_head, "donor_s": t_donor,
                     "total_extrapolated_s": ref_total, "heads": heads, "total_if_all_as_fast_as_fastest_s": ref_fastest,
                     "per_head_range_s": [float(t_heads.min()), float(t_heads.max())], "load_avg_1min": ref_load},
                 "transformerlens": tl_json, "ours": rows, "attribution_importance_corr": corr,
                 "clean_max_abs_diff_vs_reference": float(np.abs(clean - ref_clean).max())}, f, indent=2)


if __name__ == "__main__":
  main()
