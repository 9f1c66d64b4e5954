"""The reusable training loops: `train_loop(params, cfg, train_set, config, workdir)` on tokenised arrays (the
sharded train.engine step with LoRA / full fine-tuning trainables, resume from orbax checkpoints, the CAA reading
vector for LoRRA), and `fit_chunks`, the checkpointed chunked driver of a scanned program (train.scan).

Both take plain values and typed configs (train.train_config.TrainConfig), never a ConfigDict. The CLI around
train_loop is train/lora.py; other studies (IOI phases, the reversion safety phase) call `train_loop` directly,
and the reversion / avoid-the-red studies run their benign arms with `fit_chunks`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from models import params as model_params, tokenizer as tk
from models.readout import last_token_resid
from train import adapters, engine, losses
from train import data as data_lib
from train.checkpoint import Checkpointer, common_step
from train.guard import DivergenceGuard
from train.resume import check_resume
from train.step import stack_states, unstack_state
from train.train_config import TrainConfig
from train.typed_config import to_dict


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


def trainables(params: dict[str, Any], cfg, config: TrainConfig, key) -> tuple[Any, Any, Any]:
  """(trainable tree, update mask tree, LoraSpec or None) for config.mode.

  LoRA: PEFT-initialised factors on the window (train.adapters). Full: the tensors selected by
  config.lora.targets among every parameter name ("all" = everything), float32 master copies; per-layer
  tensors get the layer window as update mask, so layers outside it are not changed.

  Raises:
    AdapterError: a target pattern that matches nothing or a layer range outside the model.
  """
  lc, pdt = config.lora, jnp.dtype(config.param_dtype)
  if config.mode == "lora":
    spec = adapters.LoraSpec.create(cfg, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, layers=lc.layers or None,
                                    depth=lc.depth or None, rslora=lc.rslora, complement=lc.complement)
    lora = adapters.init_lora(spec, cfg, key, pdt)
    m = jnp.asarray(spec.layer_mask())[:, None, None]
    return lora, {t: {"a": m, "b": m} for t in lora}, spec
  present = tuple(n for n in adapters.ALL_PARAM_NAMES if n in params or n in params["layers"])
  names = adapters.resolve_targets(lc.targets, present)
  window = adapters.resolve_layers(cfg.n_layers, lc.layers or None, lc.depth or None, lc.complement)
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


def validate(config: TrainConfig, cfg) -> None:
  """Check everything about a run that needs only the model's shapes (cfg, read without its weights), so a bad
  value stops the run before the model loads: LoRA rank / targets / depth window / layers (LoraSpec.create),
  full fine-tuning targets, LoRRA layers, and that the data and reading-vector files exist.

  Raises AdapterError (bad targets / layers), train.data.DatasetError (a missing data file), ValueError (a
  missing reading-vector file), each naming the config field.
  """
  lc = config.lora
  if config.mode == "lora":
    adapters.LoraSpec.create(cfg, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, layers=lc.layers or None,
                             depth=lc.depth or None, rslora=lc.rslora, complement=lc.complement)
  else:
    shapes = model_params.param_shapes(cfg)
    present = tuple(n for n in adapters.ALL_PARAM_NAMES if n in shapes or n in shapes["layers"])
    adapters.resolve_targets(lc.targets, present)
    adapters.resolve_layers(cfg.n_layers, lc.layers or None, lc.depth or None, lc.complement)
  if config.objective == "lorra" and config.lorra.layers:
    adapters.resolve_layers(cfg.n_layers, config.lorra.layers)
  if config.data.source == "jsonl" and not os.path.isfile(config.data.path):
    raise data_lib.DatasetError(f"config.data.path={config.data.path!r}: no such file")
  if config.objective == "lorra" and config.data.source != "refusal":
    raise data_lib.DatasetError("objective 'lorra' steers harmful prompts and retains benign ones: it needs "
                                f"config.data.source='refusal', got {config.data.source!r}")
  if config.objective == "lorra" and config.lorra.reading_vector != "mean_diff":
    load_reading_vector(config.lorra.reading_vector, cfg)


def load_reading_vector(path: str, cfg) -> np.ndarray:
  """A LoRRA reading vector `[L, D]` float32 from a .npy file (never unpickled: allow_pickle=False).

  Raises train.data.DatasetError naming config.lorra.reading_vector and the file: missing, not a numeric .npy
  array (a pickle or object array is refused unread), wrong shape, or non-finite values.
  """
  where = f"config.lorra.reading_vector={path!r}"
  if not os.path.isfile(path):
    raise data_lib.DatasetError(f"{where}: no such file (or 'mean_diff')")
  try:
    v = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise data_lib.DatasetError(f"{where}: not a numeric .npy array ({e})") from None
  if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiu":
    raise data_lib.DatasetError(f"{where}: expected a numeric array, got {getattr(v, 'dtype', type(v))}")
  if v.shape != (cfg.n_layers, cfg.d_model):
    raise data_lib.DatasetError(f"{where}: shape {v.shape}, the model needs [{cfg.n_layers}, {cfg.d_model}]")
  if not np.isfinite(v).all():
    raise data_lib.DatasetError(f"{where}: holds non-finite values")
  return v.astype(np.float32)


def train_mesh(config: TrainConfig):
  """The training mesh from `config.train` (distributed, coordinator_address, num_processes, process_id, fsdp,
  tensor): initialises multi-host JAX first when asked (engine.maybe_initialize_distributed), then
  `make_mesh(fsdp, tensor=tensor)` over every global device (data = devices / (fsdp * tensor)). Raises ValueError
  naming the sizes if they do not divide the device count."""
  tc = config.train
  engine.maybe_initialize_distributed(True if tc.distributed else None,
                                      coordinator_address=tc.coordinator_address or None,
                                      num_processes=tc.num_processes, process_id=tc.process_id)
  return engine.make_mesh(fsdp=tc.fsdp, tensor=tc.tensor)


def train_loop(params: dict[str, Any], cfg, train_set, config: TrainConfig, workdir: str, *, retain_set=None,
               reading=None, wd=None) -> TrainResult:
  """Train on tokenised data, resuming from `<workdir>/checkpoints` (or config.train.checkpoint_dir) if a
  checkpoint exists.

  Args:
    params, cfg: the frozen base model (models.params layout).
    train_set: train.data.TokenizedSet (tokens / mask / loss_mask `[N, S]`).
    config: the run's TrainConfig (configs/lora.py converted by train.typed_config.from_configdict).
    workdir: run directory (checkpoints/ inside).
    retain_set: LoRRA retain prompts (TokenizedSet; its `mask` marks the scored positions).
    reading: `[L, D]` LoRRA reading vector.
    wd: train.rundir.Workdir for metrics (None: no logging).

  Raises:
    TypeError: config is not a TrainConfig (a ConfigDict is converted once, at the entry point).
    TrainingDivergedError: a non-finite loss / gradient / update, or the divergence guard (train.guard) fired
      (the last good checkpoint stays).
    ResumeConfigError: the checkpoints were written with a config that differs in a field that alters results.
    AdapterError: bad targets / layers. ValueError: batch not divisible by the device count, bad reading vector.
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"train_loop takes a train.train_config.TrainConfig (convert the ConfigDict once with "
                    f"train.typed_config.from_configdict), got {type(config).__name__}")
  tc = config.train
  mesh = train_mesh(config)
  dt = jnp.dtype(config.dtype)
  frozen = jax.tree.map(lambda x: x.astype(dt), params)
  frozen_sh = engine.param_sharding(mesh, frozen, cfg)
  frozen = engine.put_tree(frozen, frozen_sh)

  trainable, umask, spec = trainables(params, cfg, config, jax.random.PRNGKey(config.seed))
  lorra_layers, reading = _lorra_inputs(cfg, config, spec, reading)
  sc = _step_config(config, spec, lorra_layers, train_set)
  tx, sched = engine.make_optimizer(lr=tc.lr, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                                    end_lr_frac=tc.end_lr_frac, weight_decay=tc.weight_decay,
                                    clip_norm=tc.clip_norm)
  state = engine.init_state(trainable, tx, config.seed)
  state_sh = engine.state_sharding(mesh, state, tx, cfg, config.mode)
  state = engine.put_tree(state, state_sh)
  step_fn = engine.make_train_step(cfg, sc, tx, sched, umask, mesh, state_sh, frozen_sh)

  ckpt = Checkpointer(tc.checkpoint_dir or os.path.join(workdir, "checkpoints"), max_to_keep=tc.max_to_keep)
  meta = {"config": to_dict(config), "lora": spec.to_dict() if spec is not None else None,
          "lora_scale": sc.lora_scale, "model_config": dataclasses.asdict(cfg)}
  resumed, state, guard = _resume(ckpt, state, meta, config, cfg)
  start = int(state["step"])

  def log(step, **m):
    if wd is not None and jax.process_index() == 0:
      wd.log(step, **m)

  try:
    state, hist = engine.fit(step_fn, state, frozen, reading, mesh=mesh,
                             get_host_batch=_host_batches(config, train_set, retain_set),
                             micro_batch=tc.micro_batch, total_steps=tc.steps,
                             stop_after=None if tc.stop_after < 0 else tc.stop_after, ckpt=ckpt,
                             save_every=tc.save_every, meta=meta, log=log, log_every=tc.log_every,
                             tokens_per_step=lambda b: b["mask"].sum() + (b["retain_mask"].sum()
                                                                         if "retain_mask" in b else 0),
                             progress=tc.progress, guard=guard)
  finally:
    ckpt.close()
  return TrainResult(state, spec, hist, sc, start, ckpt.directory)


def _resume(ckpt: Checkpointer, state, meta: dict, config: TrainConfig, cfg):
  """(resumed step or None, state, the divergence guard) from the newest checkpoint, after checking that its
  saved config differs from this run's only in fields that cannot change results (train.resume; the run
  directory's config.json check decides whether those may differ). Raises ResumeConfigError naming the fields
  before any state is restored (a changed LoRA rank would otherwise fail inside orbax)."""
  tc = config.train
  step = ckpt.latest_step()
  old = ckpt.restore_meta(step) if step is not None else {}
  if step is not None:
    check_resume(old.get("config", {}), meta["config"], "force", ckpt.directory)
    state, _ = ckpt.restore(step, state)
    logging.info("resumed from %s step %d", ckpt.directory, step)
  guard = DivergenceGuard(loss_factor=tc.diverge_factor, patience=tc.diverge_patience,
                          vocab=cfg.vocab_size if config.objective == "sft" else 0, reference=old.get("first_loss"))
  return step, state, guard


def _step_config(config: TrainConfig, spec, lorra_layers, train_set) -> engine.StepConfig:
  """The engine's StepConfig of a run (LoRA scale and first adapted layer from the spec; SFT scores only the
  data set's `max_targets` positions per row)."""
  return engine.StepConfig(mode=config.mode, objective=config.objective,
                           lora_scale=spec.scale if spec is not None else 1.0, compute_dtype=config.dtype,
                           lorra_layers=tuple(lorra_layers), lorra_alpha=config.lorra.alpha,
                           retain_weight=config.lorra.retain_weight, remat=config.train.remat,
                           n_targets=losses.max_targets(train_set.loss_mask) if config.objective == "sft" else 0,
                           lora_from=min(spec.layers) if spec is not None else 0)


def _lorra_inputs(cfg, config: TrainConfig, spec, reading):
  """(LoRRA layers, reading vector `[L, D]` float32) for objective "lorra"; ((), reading) otherwise.

  Raises ValueError for a missing reading vector or one of the wrong shape."""
  if config.objective != "lorra":
    return (), reading
  layers = config.lorra.layers
  lorra_layers = (adapters.resolve_layers(cfg.n_layers, layers) if layers
                  else (spec.layers if spec is not None else tuple(range(cfg.n_layers))))
  if reading is None:
    raise ValueError("objective 'lorra' needs a reading vector [L, D]")
  reading = jnp.asarray(reading, jnp.float32)
  if reading.shape != (cfg.n_layers, cfg.d_model):
    raise ValueError(f"reading vector must be [{cfg.n_layers}, {cfg.d_model}], got {reading.shape}")
  return lorra_layers, reading


def _host_batches(config: TrainConfig, train_set, retain_set):
  """`host_batch(step, rows) -> {name: [accum, len(rows), S]}`: this process's rows of step's global
  micro-batches (train.data.step_rows order), with the LoRRA retain rows when the objective has them."""
  micro, accum = config.train.micro_batch, config.train.accum

  def rows_of(data, seed, s, rows):
    """Rows `rows` of step s's global micro-batches [accum, micro], gathered from the tokenised set without
    building the other processes' rows."""
    idx = data_lib.step_rows(data, seed, s, accum * micro).reshape(accum, micro)[:, rows]
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


def mean_diff_reading(params, cfg, tokenizer, harmful, benign, system=None, batch: int = 16) -> np.ndarray:
  """`[L, D]` float32 reading vector per decoder layer: mean last-prompt-token residual (output of layer l) of
  harmful minus benign chat prompts (CAA, Rimsky et al. 2024; models.readout.last_token_resid), scaled to unit
  norm per layer."""
  def mean_last(prompts):
    toks, mask = tk.encode_left_padded(tokenizer, [tk.chat_prompt(tokenizer, p, system) for p in prompts])
    return last_token_resid(params, cfg, toks, mask, batch, site="resid_post").mean(axis=1)
  d = mean_last(list(harmful)) - mean_last(list(benign))
  return d / np.linalg.norm(d, axis=-1, keepdims=True)


def objective_sets(config: TrainConfig, params, cfg, tok, examples, train_pairs, system):
  """(train_set, retain_set, reading) for train_loop from Examples and config.objective.

  SFT: every example, tokenised (retain and reading None). LoRRA: harmful examples steered toward the
  reading vector (`config.lorra.reading_vector`: "mean_diff" = train.loop.mean_diff_reading of the pairs'
  harmful vs benign prompts, or a `[L, D]` .npy path), benign examples retained. `system` (a system prompt or
  None) is prepended to every example. Raises ValueError for LoRRA without refusal pairs.
  """
  if system:
    examples = [dataclasses.replace(e, messages=(("system", system),) + e.messages) for e in examples]
  pid, ml = tk.pad_id(tok), config.data.max_len
  if config.objective != "lorra":
    return data_lib.tokenize_dataset(tok, examples, ml, pid), None, None
  if train_pairs is None:
    raise ValueError("the LoRRA objective uses refusal pairs (harmful prompts steered, benign prompts retained)")
  if config.lorra.reading_vector == "mean_diff":
    reading = mean_diff_reading(params, cfg, tok, [p["harmful"] for p in train_pairs],
                                [p["benign"] for p in train_pairs], system)
  else:
    reading = load_reading_vector(config.lorra.reading_vector, cfg)
  return (data_lib.tokenize_dataset(tok, [e for e in examples if e.kind == "harmful"], ml, pid),
          data_lib.tokenize_dataset(tok, [e for e in examples if e.kind == "benign"], ml, pid), reading)


# --------------------------------------------------------------------------------- the chunked scanned driver
def fit_chunks(program: Callable, init, frozen, ref: dict, batches: dict, probe: dict, dirs: Sequence[str],
               chunk: int, evaluate: Callable[[int, Any], dict], stop_after: int | None = None,
               progress: Callable[[int, dict | None], None] | None = None,
               measure_at=None, export: Callable[[int, int, Any], None] | None = None) -> list[dict] | None:
  """Run a scan program (train.scan.make_program) over T steps in chunks of `chunk`, checkpointing every run
  (seed or grid point) after each chunk in `<dir>/checkpoints` (train.checkpoint.Checkpointer) and resuming from
  the newest step all runs share.

  Args:
    program: make_program(..., per_run_frozen) for these runs. init: stacked initial states `[R, ...]`
      (train.step.stack_states). frozen, ref: as the program takes them (shared, or with the leading run axis R).
    batches: tokens / mask / loss_mask `[R, T, B, S]`. probe: tokens / mask `[P, Sp]`. dirs: R run directories.
    evaluate: (run index, that run's trainables, i.e. its LoRA) -> dict, recorded after every chunk.
    stop_after: run at most this many steps in this call; None is returned (all checkpointed) when steps are
      left after them.
    progress: called after every chunk with (steps done in this chunk, its metrics `[R, chunk, ...]`), and once
      with (the resumed step, None) after a resume.
    measure_at: `[T]` bool, the steps after which the program measures (its `measure_at`); None = every step.
    export: optional (run index, step, that run's trainables) -> None after every chunk, before its checkpoint
      (e.g. a PEFT adapter per step, as a Trainer run leaves them).
  Returns:
    per run {"metrics": {name: `[T, ...]` numpy} (make_step's), "evals": [{"step", **evaluate}], "seconds"
    (its share of the program time plus its evaluations)}; None when stopped early.
  Raises ValueError when chunk does not divide T or the directories disagree with the state's run axis.
  """
  T, R = int(batches["tokens"].shape[1]), int(batches["tokens"].shape[0])
  if chunk < 1 or T % chunk:
    raise ValueError(f"the chunk length eval_every = {chunk} must divide the number of steps {T}")
  if len(dirs) != R:
    raise ValueError(f"{len(dirs)} run directories for {R} runs")
  cks = [Checkpointer(os.path.join(d, "checkpoints"), max_to_keep=2) for d in dirs]
  try:
    start, state, recs = _resume_runs(cks, init, dirs)
    if start and progress is not None:
      progress(start, None)
    done = 0
    for c0 in range(start, T, chunk):
      if stop_after is not None and done >= stop_after:
        logging.info("stopped after benign step %d (checkpointed); rerun to resume", c0)
        return None
      t0 = time.time()
      flags = None if measure_at is None else np.asarray(measure_at, bool)[c0:c0 + chunk]
      state, m = program(state, frozen, jax.tree.map(lambda x: x[:, c0:c0 + chunk], batches), probe, ref, flags)
      m = jax.device_get(m)
      dt = (time.time() - t0) / R
      for i, (ck, rec) in enumerate(zip(cks, recs)):
        for k, v in m.items():
          rec["metrics"].setdefault(k, []).append(np.asarray(v[i]).tolist())
        t1 = time.time()
        trainable = unstack_state(state["trainable"], i)
        rec["evals"].append({"step": c0 + chunk, **evaluate(i, trainable)})
        if export is not None:
          export(i, c0 + chunk, trainable)
        rec["seconds"] += dt + time.time() - t1
        ck.save(c0 + chunk, unstack_state(state, i), {"record": rec})
      done += chunk
      if progress is not None:
        progress(chunk, m)
  finally:
    for c in cks:
      c.close()
  return [{"metrics": {k: np.concatenate([np.asarray(c) for c in v], axis=0) for k, v in r["metrics"].items()},
           "evals": r["evals"], "seconds": r["seconds"]} for r in recs]


def _resume_runs(cks: Sequence[Checkpointer], init, dirs: Sequence[str]) -> tuple[int, Any, list[dict]]:
  """(start step, stacked state, per-run records) at the newest step every run saved, or (0, init, empty
  records) when they share none."""
  start = common_step(cks)
  if start is None:
    if any(c.latest_step() is not None for c in cks):
      logging.warning("checkpoints of %s do not share a step; restarting these runs", list(dirs))
    return 0, init, [{"metrics": {}, "evals": [], "seconds": 0.0} for _ in dirs]
  restored = [c.restore(start, unstack_state(init, i)) for i, c in enumerate(cks)]
  logging.info("%s: resumed at step %d", [os.path.basename(d) for d in dirs], start)
  return start, stack_states([s for s, _ in restored]), [m["record"] for _, m in restored]
