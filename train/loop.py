"""The reusable training loop: `train_loop(params, cfg, train_set, config, workdir)` on tokenised arrays, with
LoRA / full fine-tuning trainables, resume from orbax checkpoints, and the CAA reading vector for LoRRA.

The CLI around it is train/lora.py; other studies (IOI phases, reversion) call `train_loop` directly.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging


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
                                    depth=_tuple(config.lora.depth), rslora=config.lora.rslora,
                                    complement=bool(config.lora.get("complement", False)))
    lora = adapters.init_lora(spec, cfg, key, pdt)
    m = jnp.asarray(spec.layer_mask())[:, None, None]
    return lora, {t: {"a": m, "b": m} for t in lora}, spec
  if config.mode == "full":
    present = tuple(n for n in adapters.ALL_PARAM_NAMES
                    if n in params or n in params["layers"])
    names = adapters.resolve_targets(config.lora.targets, present)
    window = adapters.resolve_layers(cfg.n_layers, _tuple(config.lora.layers), _tuple(config.lora.depth),
                                     bool(config.lora.get("complement", False)))
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


def train_mesh(config):
  """The training mesh from `config.train` (fields distributed, coordinator_address, num_processes,
  process_id, fsdp, tensor; the last five optional): initialises multi-host JAX first when asked
  (engine.maybe_initialize_distributed), then `make_mesh(fsdp, tensor=tensor)` over every global device
  (data = devices / (fsdp * tensor)). Raises ValueError naming the sizes if they do not divide the device count."""
  from train import engine
  tc = config.train
  engine.maybe_initialize_distributed(True if tc.distributed else None,
                                      coordinator_address=tc.get("coordinator_address") or None,
                                      num_processes=tc.get("num_processes", -1),
                                      process_id=tc.get("process_id", -1))
  return engine.make_mesh(fsdp=int(tc.fsdp), tensor=int(tc.get("tensor", 1)))


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
    wd: train.rundir.Workdir for metrics (None: no logging).

  Raises:
    TrainingDivergedError: a non-finite loss / gradient / update (the last good checkpoint stays).
    AdapterError: bad targets / layers. ValueError: batch not divisible by the device count, bad objective.
  """
  import jax
  import jax.numpy as jnp

  from train import checkpoint, engine, losses

  tc = config.train
  mesh = train_mesh(config)
  dt = jnp.dtype(config.dtype)
  frozen = jax.tree.map(lambda x: x.astype(dt), params)
  frozen_sh = engine.param_sharding(mesh, frozen, cfg)
  frozen = engine.put_tree(frozen, frozen_sh)

  trainable, umask, spec = trainables(params, cfg, config, jax.random.PRNGKey(config.seed))
  if config.objective not in ("sft", "lorra"):
    raise ValueError(f"config.objective must be 'sft' or 'lorra', got {config.objective!r}")
  lorra_layers, reading = _lorra_inputs(cfg, config, spec, reading)
  sc = engine.StepConfig(mode=config.mode, objective=config.objective,
                         lora_scale=spec.scale if spec is not None else 1.0, compute_dtype=config.dtype,
                         lorra_layers=tuple(lorra_layers), lorra_alpha=float(config.lorra.alpha),
                         retain_weight=float(config.lorra.retain_weight),
                         remat=bool(tc.get("remat", False)),
                         n_targets=losses.max_targets(train_set.loss_mask) if config.objective == "sft" else 0,
                         lora_from=min(spec.layers) if spec is not None else 0)
  tx, sched = engine.make_optimizer(lr=tc.lr, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                                    end_lr_frac=tc.end_lr_frac, weight_decay=tc.weight_decay,
                                    clip_norm=tc.clip_norm)
  state = engine.init_state(trainable, tx, config.seed)
  state_sh = engine.state_sharding(mesh, state, tx, cfg, config.mode)
  state = engine.put_tree(state, state_sh)
  step_fn = engine.make_train_step(cfg, sc, tx, sched, umask, mesh, state_sh, frozen_sh)

  ckpt = checkpoint.Checkpointer(tc.get("checkpoint_dir") or os.path.join(workdir, "checkpoints"),
                             max_to_keep=tc.max_to_keep)
  meta = {"config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
          "lora": spec.to_dict() if spec is not None else None, "lora_scale": sc.lora_scale,
          "model_config": dataclasses.asdict(cfg)}
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(start, state)
    logging.info("resumed from %s step %d", ckpt.directory, start)
  start = int(state["step"])

  micro = tc.micro_batch
  host_batch = _host_batches(config, train_set, retain_set)

  def log(step, **m):
    if wd is not None and jax.process_index() == 0:
      wd.log(step, **m)

  try:
    state, hist = engine.fit(step_fn, state, frozen, reading, mesh=mesh, get_host_batch=host_batch,
                             micro_batch=micro, total_steps=tc.steps,
                             stop_after=None if tc.stop_after < 0 else tc.stop_after, ckpt=ckpt,
                             save_every=tc.save_every, meta=meta, log=log, log_every=tc.log_every,
                             tokens_per_step=lambda b: b["mask"].sum() + (b["retain_mask"].sum()
                                                                         if "retain_mask" in b else 0),
                             progress=tc.progress)
  finally:
    ckpt.close()
  return TrainResult(state, spec, hist, sc, start, ckpt.directory)


def _lorra_inputs(cfg, config, spec, reading):
  """(LoRRA layers, reading vector `[L, D]` float32) for objective "lorra"; ((), reading) otherwise.

  Raises ValueError for a missing reading vector or one of the wrong shape."""
  import jax.numpy as jnp

  from train.adapters import resolve_layers
  if config.objective != "lorra":
    return (), reading
  lorra_layers = (resolve_layers(cfg.n_layers, _tuple(config.lorra.layers)) if _tuple(config.lorra.layers)
                  else (spec.layers if spec is not None else tuple(range(cfg.n_layers))))
  if reading is None:
    raise ValueError("objective 'lorra' needs a reading vector [L, D]")
  reading = jnp.asarray(reading, jnp.float32)
  if reading.shape != (cfg.n_layers, cfg.d_model):
    raise ValueError(f"reading vector must be [{cfg.n_layers}, {cfg.d_model}], got {reading.shape}")
  return lorra_layers, reading


def _host_batches(config, train_set, retain_set):
  """`host_batch(step, rows) -> {name: [accum, len(rows), S]}`: this process's rows of step's global
  micro-batches (train.data.step_rows order), with the LoRRA retain rows when the objective has them."""
  from train import data as D
  tc = config.train
  micro, accum = tc.micro_batch, tc.accum

  def rows_of(data, seed, s, rows):
    """Rows `rows` of step s's global micro-batches [accum, micro], gathered from the tokenised set without
    building the other processes' rows."""
    idx = D.step_rows(data, seed, s, accum * micro).reshape(accum, micro)[:, rows]
    return {"tokens": data.tokens[idx], "mask": data.mask[idx], "loss_mask": data.loss_mask[idx]}

  def host_batch(s, rows):
    b = rows_of(train_set, config.seed, s, rows)
    if config.objective == "lorra":
      if config.lorra.positions == "all":
        b["loss_mask"] = b["mask"].astype(np.float32)
      if retain_set is not None:
        r = rows_of(retain_set, config.seed + 1, s, rows)
        b["retain_tokens"], b["retain_mask"] = r["tokens"], r["mask"].astype(np.float32)
    return b
  return host_batch


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


def objective_sets(config, params, cfg, tok, examples, train_pairs, system):
  """(train_set, retain_set, reading) for train_loop from Examples and config.objective.

  SFT: every example, tokenised (retain and reading None). LoRRA: harmful examples steered toward the
  reading vector (`config.lorra.reading_vector`: "mean_diff" = train.loop.mean_diff_reading of the pairs'
  harmful vs benign prompts, or a `[L, D]` .npy path), benign examples retained. `system` (a system prompt or
  None) is prepended to every example. Raises ValueError for LoRRA without refusal pairs.
  """
  from models import tokenizer as tk
  from train import data as D
  if system:
    examples = [dataclasses.replace(e, messages=(("system", system),) + e.messages) for e in examples]
  pid, ml = tk.pad_id(tok), config.data.max_len
  if config.objective != "lorra":
    return D.tokenize_dataset(tok, examples, ml, pid), None, None
  if train_pairs is None:
    raise ValueError("the LoRRA objective uses refusal pairs (harmful prompts steered, benign prompts retained)")
  if config.lorra.reading_vector == "mean_diff":
    reading = mean_diff_reading(params, cfg, tok, [p["harmful"] for p in train_pairs],
                                [p["benign"] for p in train_pairs], system)
  else:
    reading = np.load(config.lorra.reading_vector, allow_pickle=False)
  return (D.tokenize_dataset(tok, [e for e in examples if e.kind == "harmful"], ml, pid),
          D.tokenize_dataset(tok, [e for e in examples if e.kind == "benign"], ml, pid), reading)
