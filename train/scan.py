"""LoRA fine-tuning as ONE compiled program that measures the model after every update.

`make_program` returns a jitted function that runs a chunk of T SFT steps as a `jax.lax.scan`, vmapped over
seeds (a leading seed axis on the train state and the batches), and after each update measures the mean residual
activation of a fixed probe-prompt set at every layer boundary, its drift from a reference (theta_aligned) and
the drift's cosine with a reference direction (v_rev): the gravitational-reversion measurement of Poppi & Lukas
2026 (arXiv 2606.28525), analysis/reversion/metrics.py. The same program serves four arms (static `arm`):

  baseline  SFT loss only.
  block     SFT + lam * relu(p)^2, p = motion of the probe activations along v_rev (train.losses.block_loss).
  push      SFT - lam * s * tanh(p / s), the bounded reinforcing objective (train.losses.push_loss).
  project   SFT gradient g with its component along h = grad p removed whenever a descent step would increase p
            (<g, h> < 0): g <- g - <g, h> / |h|^2 h (gradient projection, as PCGrad, Yu et al. 2020, with one
            fixed "task" h). After the projection a first-order SGD step leaves p unchanged; AdamW rescales
            per coordinate, so this is a block, not a guarantee.

All arms use the same optimizer, the same data order and the same LoRA initialisation per seed; block with
lam = 0 is the baseline bit for bit (tests/test_reversion.py). The state is train.step's {step, trainable,
opt_state, rng} (trainable = the LoRA factors; `init_state` / `stack_states` there), the SFT task loss and the
update are train.step's (as in train.engine's sharded step), and the block / push / project terms are
train.losses'. Chunks of the scan are resumable: train.loop.fit_chunks checkpoints the state between chunks; a
chunk of length T is the whole run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from models.config import ModelConfig
from models.lora import adapt
from models.readout import cosine, mean_activation
from models.transformer import forward
from train import losses
from train.step import apply_gradients, sft_loss

ARMS = ("baseline", "block", "push", "project")


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """Static description of one arm (hashable).

  arm: one of ARMS. lam: weight of the block / push term (ignored by baseline and project). push_scale: s of
  push's tanh. lora_scale: LoRA alpha / r. position: probe token position for mean_activation ("last" | "mean").
  aux_layers: layer boundaries (indices into the `[L+1]` residual axis) the block / push projection averages
  over; () = all decoder-layer outputs 1..L. n_targets: scored positions per row at which the LM head runs
  (train.losses.sft_rows; `losses.max_targets` of the batches); 0 = every position.
  """
  arm: str = "baseline"
  lam: float = 0.0
  push_scale: float = 1.0
  lora_scale: float = 1.0
  position: str = "last"
  aux_layers: tuple[int, ...] = ()
  n_targets: int = 0

  def __post_init__(self):
    if self.arm not in ARMS:
      raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")


def probe_mean(params: dict[str, Any], lora: dict | None, cfg: ModelConfig, probe: dict[str, jax.Array],
               lora_scale: float = 1.0, position: str = "last") -> jax.Array:
  """Mean residual activation `[L+1, D]` float32 of the probe prompts (tokens / mask `[P, S]`, left-padded)
  under params + LoRA (models.readout.mean_activation)."""
  _, acts = forward(adapt(params, lora, lora_scale), probe["tokens"], cfg, attention_mask=probe["mask"],
                    capture=("resid",), logits="none")
  return mean_activation(acts["resid"], probe["mask"], position)


def _layer_weights(n: int, aux_layers: tuple[int, ...]) -> jax.Array:
  idx = jnp.asarray(aux_layers if aux_layers else tuple(range(1, n)))
  return jnp.zeros(n, jnp.float32).at[idx].set(1.0 / len(idx))


def _arm_gradients(cfg: ModelConfig, sc: ScanConfig) -> Callable:
  """`grads(lora, frozen, batch, probe, ref) -> (grads, task, aux, cos_gh)` of the arm (make_step's metrics)."""
  lw = _layer_weights(cfg.n_layers + 1, sc.aux_layers)

  def task_loss(lora, frozen, batch):
    return sft_loss(adapt(frozen, lora, sc.lora_scale), cfg, batch, losses.sft_weight(batch["loss_mask"]),
                    sc.n_targets)

  def aux_term(lora, frozen, probe, ref):
    """block / push: the term added to the loss; project: p, the motion along v_rev whose gradient is h."""
    m = probe_mean(frozen, lora, cfg, probe, sc.lora_scale, sc.position)
    if sc.arm == "block":
      return losses.block_loss(m, ref["mean_aligned"], ref["v_rev"], sc.lam, lw)
    if sc.arm == "push":
      return losses.push_loss(m, ref["mean_aligned"], ref["v_rev"], sc.lam, sc.push_scale, lw)
    return losses.projection_on_vrev(m, ref["mean_aligned"], ref["v_rev"], lw)

  def grads_of(lora, frozen, batch, probe, ref):
    zero = jnp.zeros((), jnp.float32)
    if sc.arm in ("block", "push"):
      def total(lr_):
        t, a = task_loss(lr_, frozen, batch), aux_term(lr_, frozen, probe, ref)
        return t + a, (t, a)
      (_, (task, aux)), grads = jax.value_and_grad(total, has_aux=True)(lora)
      return grads, task, aux, zero
    task, grads = jax.value_and_grad(task_loss)(lora, frozen, batch)
    if sc.arm == "project":
      grads, cos_gh = losses.project_gradient(grads, jax.grad(aux_term)(lora, frozen, probe, ref))
      return grads, task, zero, cos_gh
    return grads, task, zero, zero

  return grads_of


def split_probe(probe: dict) -> tuple[dict, dict]:
  """(objective prompts, measurement prompts) of a probe argument: {"objective": batch, "measure": batch}, or one
  batch {"tokens", "mask"} that serves as both."""
  return (probe["objective"], probe["measure"]) if "objective" in probe else (probe, probe)


def drift_metrics(m: jax.Array, mean_ref: jax.Array, v_rev: jax.Array) -> dict[str, jax.Array]:
  """The reversion readout of mean activations m `[L+1, D]` against theta_aligned's mean_ref on the same prompts:
  align `[L]` = cos(d(l), v_rev(l)), proj `[L]` = <d(l), v_rev(l) / |v_rev(l)|> at the decoder-layer outputs
  l = 1..L (the embeddings are not adapted), and align_all = the cosine over their concatenation (float32)."""
  d, v = (m - mean_ref)[1:], v_rev[1:]
  u = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  return {"align": cosine(d, v), "proj": jnp.sum(d * u, axis=-1), "align_all": cosine(d.reshape(-1), v.reshape(-1))}


def make_step(cfg: ModelConfig, sc: ScanConfig, tx: optax.GradientTransformation) -> Callable:
  """One fine-tuning update `step(state, frozen, batch, probe, ref) -> (state, metrics)` (pure, unjitted), and
  the measurement after it is `measure(state, frozen, probe, ref)` (make_measure).

  state: train.step's {"step": int32, "trainable": {target: {"a", "b"}} (the LoRA), "opt_state", "rng"}.
  frozen: model params (theta_aligned). batch: tokens / mask `[B, S]` int32, loss_mask `[B, S]` float32
  (right-padded SFT rows). probe: tokens / mask `[P, Sp]` (left-padded prompts), or {"objective": ..., "measure":
  ...} (split_probe): the block / push / project terms see only the objective prompts. ref: {"mean_aligned":
  `[L+1, D]` on the objective prompts, "v_rev": `[L+1, D]`} float32, and "mean_measure" `[L+1, D]` (theta_aligned
  on the measurement prompts) when they differ.
  metrics (float32): task (SFT nats / target token), aux (block / push term, 0 otherwise), grad_norm (the
  applied gradient), cos_gh (cosine of the task gradient with grad p; project arm, else 0).
  """
  grads_of = _arm_gradients(cfg, sc)

  def step(state, frozen, batch, probe, ref):
    grads, task, aux, cos_gh = grads_of(state["trainable"], frozen, batch, split_probe(probe)[0], ref)
    new, gnorm, _ = apply_gradients(state, grads, tx)
    return new, {"task": task, "aux": aux, "grad_norm": gnorm, "cos_gh": cos_gh}

  return step


def make_measure(cfg: ModelConfig, sc: ScanConfig) -> Callable:
  """`measure(trainable, frozen, probe, ref) -> metrics` after an update: drift_metrics on the measurement prompts
  (align `[L]`, proj `[L]`, align_all) and, on the objective prompts, align_all_objective (what block / push /
  project act on; equal to align_all when one batch serves both)."""
  def measure(trainable, frozen, probe, ref):
    obj, meas = split_probe(probe)
    m = probe_mean(frozen, trainable, cfg, meas, sc.lora_scale, sc.position)
    out = drift_metrics(m, ref.get("mean_measure", ref["mean_aligned"]), ref["v_rev"])
    if obj is meas:
      out["align_all_objective"] = out["align_all"]
    else:
      mo = probe_mean(frozen, trainable, cfg, obj, sc.lora_scale, sc.position)
      out["align_all_objective"] = drift_metrics(mo, ref["mean_aligned"], ref["v_rev"])["align_all"]
    return out
  return measure


def make_program(cfg: ModelConfig, sc: ScanConfig, tx: optax.GradientTransformation,
                 per_run_frozen: bool = False) -> Callable:
  """The chunk program `run(state, frozen, batches, probe, ref, measure_at) -> (state, metrics)`, jitted: a
  `lax.scan` over the T steps whose body updates every run (seeds, or grid points) at once (`jax.vmap` of
  make_step) and then, where `measure_at[t]`, measures them (make_measure; a `lax.cond` on the unbatched flag, so
  unmeasured steps skip the measurement's forward passes and report NaN).

  state: leading run axis `[R, ...]` on every leaf (train.step.stack_states). batches: tokens / mask / loss_mask
  `[R, T, B, S]`. probe: shared (see make_step). frozen (theta_aligned) and ref ({"mean_aligned", "v_rev"[,
  "mean_measure"]} `[L+1, D]`): shared, or with the leading run axis when `per_run_frozen` (every run fine-tunes
  its own theta_aligned against its own v_rev). measure_at: `[T]` bool, or None = every step. Returns the state after T steps and
  metrics with shape `[R, T, ...]` (align / proj `[R, T, L]`). One compilation per (T, shapes).
  """
  step, measure = make_step(cfg, sc, tx), make_measure(cfg, sc)
  ax = 0 if per_run_frozen else None
  vstep = jax.vmap(step, in_axes=(0, ax, 0, None, ax))
  vmeasure = jax.vmap(measure, in_axes=(0, ax, None, ax))

  def run(state, frozen, batches, probe, ref, measure_at=None):
    def body(s, x):
      b, flag = x
      s, m = vstep(s, frozen, b, probe, ref)
      if flag is None:
        m.update(vmeasure(s["trainable"], frozen, probe, ref))
        return s, m
      shapes = jax.eval_shape(vmeasure, s["trainable"], frozen, probe, ref)
      m.update(jax.lax.cond(flag, lambda: vmeasure(s["trainable"], frozen, probe, ref),
                            lambda: jax.tree.map(lambda z: jnp.full(z.shape, jnp.nan, z.dtype), shapes)))
      return s, m
    steps = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batches)        # [T, R, ...]
    flags = None if measure_at is None else jnp.asarray(measure_at, bool)
    state, m = jax.lax.scan(body, state, (steps, flags))
    return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), m)         # [R, T, ...]

  return jax.jit(run)
