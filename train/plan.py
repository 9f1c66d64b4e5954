"""Per-device memory plan of a training run on a (data, fsdp, tensor) mesh, without devices or weights.

    python -m train.plan --config=configs/plan.py:llama3_8b [--config.mode=full --config.mesh.fsdp=8 ...]

The ConfigDict of configs/plan.py is converted once into a train.plan_config.PlanConfig (typed, frozen);
`make_plan` takes the PlanConfig.

Prints the mesh, every parameter's shape / PartitionSpec (models.sharding) / bytes per device, the mesh axes
dropped for divisibility, and per device: frozen weights, trainables (LoRA factors or full-fine-tuning master
copies), optimizer state (AdamW moments from `jax.eval_shape(tx.init, ...)` laid out by
train.engine.state_specs), the gradient accumulator, activations saved for the backward pass of one
micro-batch (with remat: each layer's input plus one layer's recomputed activations), and the largest set of
weights all-gathered at once over fsdp (a layer, the embedding or the LM head). Exits with status 1 and a message
naming the parts and the excess when the total exceeds `memory_gib`.

Everything is computed from shapes (`jax.ShapeDtypeStruct`, `jax.eval_shape`, `jax.make_jaxpr`); nothing is
allocated, so an 8B plan runs on a laptop in seconds.

Activations: the residuals `jax.vjp` of the training objective (train.engine.objective) keeps for the backward
pass, read from the jaxpr of `vjp` traced on ShapeDtypeStructs (what `jax.ad_checkpoint.print_saved_residuals`
lists), excluding residuals that are arguments (weights, batch). They are traced on the per-device problem:
micro-batch / (data x fsdp) sequences and, where the plan splits them over "tensor", heads, MLP columns and vocab
divided by tensor (the residual stream stays replicated over tensor, as in Megatron without sequence
parallelism). This is the memory of the program before XLA's own rematerialisation and fusion, so it is an upper
estimate of what `compiled.memory_analysis()` reports on TPU / GPU; XLA's runtime reserve is not included.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from models import registry
from models import sharding as sh
from models.config import KNOWN_SHAPES, ModelConfig
from models.errors import ModelError
from models.gguf_io import config_from_gguf
from models.params import param_shapes
from train import adapters, engine
from train.plan_config import PlanConfig
from train.typed_config import ConfigError, from_configdict

GIB = 2 ** 30


class PlanError(ValueError):
  """A plan that does not fit in device memory, or a config field with a bad value (the message names it)."""


@dataclasses.dataclass
class Row:
  """One tensor of the plan: group (weights / trainable / optimizer / gradients), name, shape, dtype, spec, bytes
  per device."""
  group: str
  name: str
  shape: tuple
  dtype: str
  spec: str
  bytes: int


@dataclasses.dataclass
class Plan:
  """What `make_plan` computes. totals: bytes per device by part (weights, trainable, optimizer, gradients,
  activations, layer_working_set, gathered); notes: mesh axes dropped for divisibility (models.sharding) and estimate caveats."""
  cfg: Any
  mesh: dict
  rows: list
  totals: dict
  notes: list
  memory_bytes: int
  config: PlanConfig

  @property
  def total(self) -> int:
    return sum(self.totals.values())


PARTS = {"weights": "frozen weights", "trainable": "trainable tensors", "optimizer": "optimizer state (AdamW)",
         "gradients": "gradient accumulator", "activations": "activations saved for backward (one micro-batch)",
         "layer_working_set": "one layer's recomputed activations (remat only)",
         "gathered": "largest fsdp-gathered weights (layer / embed / head)"}


def model_config(config: PlanConfig) -> ModelConfig:
  """The ModelConfig of `config.model` with `config.dims` overrides, read without weights.

  Raises PlanError naming the field: an unknown model, or "custom" with a dims field unset.
  """
  dims = config.dims_overrides()
  model = config.model
  if model == "custom":
    missing = [f for f in ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")
               if f not in dims]
    if missing:
      raise PlanError(f"config.model='custom' needs config.dims.{missing[0]} (unset: {missing})")
    return ModelConfig(**dims)
  if model in KNOWN_SHAPES:
    cfg = KNOWN_SHAPES[model]
  else:
    try:
      src = registry.resolve(model, assemble_missing=False)
    except ModelError as e:
      raise PlanError(f"config.model={model!r}: not in models.config.KNOWN_SHAPES {sorted(KNOWN_SHAPES)} and not "
                      f"a registry model, HF directory or .gguf file ({e})") from e
    if src.kind == "gguf":
      cfg = config_from_gguf(src.path)
    else:
      cfg = ModelConfig.from_hf_file(os.path.join(src.path, "config.json"))   # checks `architectures` too
  return cfg.replace(**dims) if dims else cfg


def _check(config: PlanConfig) -> dict[str, int]:
  """The mesh as {axis: size}; raises PlanError naming a bad field (values make_plan cannot plan)."""
  mesh = {}
  for ax in ("data", "fsdp", "tensor"):
    v = getattr(config.mesh, ax)
    if not isinstance(v, int) or v < 1:
      raise PlanError(f"config.mesh.{ax}={v!r} must be an integer >= 1")
    mesh[ax] = v
  if config.mode not in ("lora", "full"):
    raise PlanError(f"config.mode must be 'lora' or 'full', got {config.mode!r}")
  for f in ("micro_batch", "accum", "seq_len"):
    if getattr(config.batch, f) < 1:
      raise PlanError(f"config.batch.{f}={getattr(config.batch, f)!r} must be >= 1")
  nb = mesh["data"] * mesh["fsdp"]
  if config.batch.micro_batch % nb:
    raise PlanError(f"config.batch.micro_batch={config.batch.micro_batch} is not divisible by "
                    f"mesh.data x mesh.fsdp = {nb}")
  if not config.memory_gib > 0:
    raise PlanError(f"config.memory_gib={config.memory_gib!r} must be > 0")
  for f in ("dtype", "param_dtype"):
    try:
      jnp.dtype(getattr(config, f))
    except TypeError as e:
      raise PlanError(f"config.{f}={getattr(config, f)!r} is not a dtype") from e
  return mesh


def _trainable_shapes(cfg, config: PlanConfig, dtype):
  """ShapeDtypeStructs of the trainables (train.loop.trainables without arrays) and the LoRA spec or None."""
  if config.mode == "lora":
    spec = adapters.LoraSpec.create(cfg, rank=config.lora.rank, alpha=2.0 * config.lora.rank,
                                    targets=config.lora.targets)
    return jax.eval_shape(lambda k: adapters.init_lora(spec, cfg, k, dtype), jax.random.PRNGKey(0)), spec
  shapes = param_shapes(cfg)
  present = tuple(n for n in adapters.ALL_PARAM_NAMES if n in shapes or n in shapes["layers"])
  out: dict[str, Any] = {}
  for n in adapters.resolve_targets(config.lora.targets, present):
    if n in shapes["layers"]:
      out.setdefault("layers", {})[n] = jax.ShapeDtypeStruct(shapes["layers"][n], jnp.dtype(dtype))
    else:
      out[n] = jax.ShapeDtypeStruct(shapes[n], jnp.dtype(dtype))
  return out, None


def _local_config(cfg, t: int):
  """The per-device problem of a tensor split t (whole heads, MLP columns, vocab), and a note if approximate."""
  H, KV = cfg.n_heads, cfg.n_kv_heads
  note = None
  if H % t == 0 and KV % t == 0:
    h, kv = H // t, KV // t
  elif H % t == 0:
    h = H // t
    kv = math.gcd(h, KV)
    note = (f"activations: kv heads ({KV}) are replicated over tensor={t} but counted as {kv} per device "
            "(the per-device model needs n_heads % n_kv_heads == 0); k/v residuals are underestimated")
  else:
    h, kv = H, KV
  return cfg.replace(n_heads=h, n_kv_heads=kv, d_ff=cfg.d_ff // t if cfg.d_ff % t == 0 else cfg.d_ff,
                     vocab_size=cfg.vocab_size // t if cfg.vocab_size % t == 0 else cfg.vocab_size), note


def _saved_bytes(local, config: PlanConfig, b: int, remat: bool) -> int:
  """Bytes of the residuals vjp keeps for the objective on the per-device problem `local` with b sequences."""
  S = config.batch.seq_len
  dt = jnp.dtype(config.dtype)
  frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), param_shapes(local),
                        is_leaf=lambda x: isinstance(x, tuple))
  # full fine-tuning: trace the trainables in the compute dtype, so their casts (weights, not activations) are
  # arguments of the vjp and not counted as residuals
  trainable, spec = _trainable_shapes(local, config, jnp.dtype(config.param_dtype if config.mode == "lora"
                                                               else config.dtype))
  mb = {"tokens": jax.ShapeDtypeStruct((b, S), jnp.int32), "mask": jax.ShapeDtypeStruct((b, S), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((b, S), jnp.float32)}
  weights = {"main": jax.ShapeDtypeStruct((), jnp.float32)}
  sc = engine.StepConfig(mode=config.mode, lora_scale=spec.scale if spec is not None else 1.0,
                         compute_dtype=config.dtype, remat=remat,
                         lora_from=min(spec.layers) if spec is not None else 0)

  def with_vjp(tr, fr, batch, w):
    return jax.vjp(lambda t: engine.objective(t, fr, batch, w, None, local, sc), tr)

  closed, out_shape = jax.make_jaxpr(with_vjp, return_shape=True)(trainable, frozen, mb, weights)
  jaxpr = closed.jaxpr
  n_res = len(jax.tree.leaves(out_shape[1]))
  produced = {v for e in jaxpr.eqns for v in e.outvars}
  seen, total = set(), 0
  for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:]:
    if v in produced and v not in seen:          # not an argument (weights, batch), literal or constant
      seen.add(v)
      total += math.prod(v.aval.shape) * v.aval.dtype.itemsize
  return total


def activation_bytes(cfg, config: PlanConfig, mesh: dict[str, int]) -> tuple[dict[str, int], list[str]]:
  """Per-device activation memory of one micro-batch (module docstring), traced on ShapeDtypeStructs.

  Returns ({"activations": residuals kept for the backward pass, "layer_working_set": with config.remat, the
  residuals of the one layer being recomputed (saved(2 layers) - saved(1 layer) without remat), else 0}, notes).
  """
  local, note = _local_config(cfg, mesh["tensor"])
  b = config.batch.micro_batch // (mesh["data"] * mesh["fsdp"])
  out = {"activations": _saved_bytes(local, config, b, config.remat), "layer_working_set": 0}
  if config.remat:
    one = _saved_bytes(local.replace(n_layers=1), config, b, False)
    out["layer_working_set"] = _saved_bytes(local.replace(n_layers=2), config, b, False) - one
  return out, [note] if note else []


def make_plan(config: PlanConfig) -> Plan:
  """The plan for a PlanConfig (configs/plan.py converted; see module docstring). Raises PlanError for a bad
  field."""
  mesh = _check(config)
  cfg = model_config(config)
  dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  rows: list[Row] = []
  shapes = param_shapes(cfg)
  pspecs, notes = sh.param_specs(mesh, cfg, shapes)

  def add(group, tree, specs, dtype=None, record=True):
    fspecs = dict(sh.flat_items(specs))
    total = 0
    for name, x in sh.flat_items(tree):
      shape = tuple(x) if isinstance(x, tuple) else tuple(x.shape)
      d = jnp.dtype(dtype if dtype is not None else x.dtype)
      n = sh.per_device_bytes(shape, d, fspecs[name], mesh)
      if record:
        rows.append(Row(group, name, shape, d.name, _fmt_spec(fspecs[name]), n))
      total += n
    return total

  totals = {"weights": add("weights", shapes, pspecs, dt)}
  trainable, _ = _trainable_shapes(cfg, config, pdt)
  tx, _ = engine.make_optimizer(lr=1e-4, total_steps=10)
  state = jax.eval_shape(lambda t: engine.init_state(t, tx, 0), trainable)
  sspecs, _ = engine.state_specs(mesh, state, tx, cfg, config.mode)
  totals["trainable"] = add("trainable", trainable, sspecs["trainable"])
  opt_total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
    spec = _leaf_at(sspecs["opt_state"], path)
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    n = sh.per_device_bytes(leaf.shape, leaf.dtype, spec, mesh)
    rows.append(Row("optimizer", name, tuple(leaf.shape), jnp.dtype(leaf.dtype).name, _fmt_spec(spec), n))
    opt_total += n
  totals["optimizer"] = opt_total
  # train.engine accumulates gradients in float32, laid out like the trainables
  totals["gradients"] = add("gradients", trainable, sspecs["trainable"], jnp.float32, record=False)
  act, act_notes = activation_bytes(cfg, config, mesh)
  totals.update(act)
  totals["gathered"] = gathered_bytes(cfg, mesh, dt) if mesh["fsdp"] > 1 else 0
  return Plan(cfg, mesh, rows, totals, notes + act_notes, int(config.memory_gib * GIB), config)


def gathered_bytes(cfg, mesh: dict[str, int], dtype) -> int:
  """The FSDP working set: the largest set of weights XLA all-gathers over "fsdp" at once (tensor split kept):
  one decoder layer's weights, the token embedding or the LM head, whichever is largest (bytes per device)."""
  no_fsdp = dict(mesh, fsdp=1)
  shapes = param_shapes(cfg)
  layer = 0
  for k, v in shapes["layers"].items():
    one = (1,) + tuple(v[1:])
    layer += sh.per_device_bytes(one, dtype, sh.param_spec(f"layers/{k}", one, no_fsdp, cfg)[0], no_fsdp)
  heads = [sh.per_device_bytes(shapes[k], dtype, sh.param_spec(k, shapes[k], no_fsdp, cfg)[0], no_fsdp)
           for k in ("embed", "lm_head") if k in shapes]
  return max([layer] + heads)


def _leaf_at(tree, path):
  for k in path:
    tree = tree[k.key] if hasattr(k, "key") else (tree[k.idx] if hasattr(k, "idx") else getattr(tree, k.name))
  return tree


def _fmt_spec(spec) -> str:
  parts = []
  for s in spec:
    parts.append("-" if s is None else (s if isinstance(s, str) else "(" + ",".join(s) + ")"))
  return "(" + ", ".join(parts) + ")" if parts else "replicated"


def _gib(n: int) -> str:
  return f"{n / GIB:8.3f} GiB"


def format_plan(plan: Plan, per_tensor: bool = True) -> str:
  """The printout: header, per-parameter table (weights and trainables; optimizer moments summarised), notes,
  per-device totals and the verdict."""
  c, m = plan.cfg, plan.mesh
  conf = plan.config
  n_dev = m["data"] * m["fsdp"] * m["tensor"]
  lines = [f"model {conf.model}: {c.arch}, vocab {c.vocab_size}, d_model {c.d_model}, {c.n_layers} layers, "
           f"{c.n_heads} heads / {c.n_kv_heads} kv heads x {c.head_dim}, d_ff {c.d_ff}, "
           f"{'tied' if c.tie_embeddings else 'untied'} embeddings{', qkv bias' if c.qkv_bias else ''}",
           f"mesh data={m['data']} x fsdp={m['fsdp']} x tensor={m['tensor']} = {n_dev} devices; mode {conf.mode}"
           + (f" (rank {conf.lora.rank}, targets {conf.lora.targets})" if conf.mode == "lora"
              else f" (targets {conf.lora.targets})")
           + f"; dtype {conf.dtype}, trainables {conf.param_dtype}; micro-batch {conf.batch.micro_batch} x "
           f"{conf.batch.seq_len} tokens (x{conf.batch.accum} accumulation); remat {conf.remat}", ""]
  if per_tensor:
    lines += [f"{'group':<10} {'tensor':<22} {'shape':<24} {'dtype':<9} {'spec':<26} {'bytes/device':>14}"]
    for r in plan.rows:
      if r.group == "optimizer" and r.bytes < 1024:
        continue
      lines.append(f"{r.group:<10} {r.name:<22} {str(list(r.shape)):<24} {r.dtype:<9} {r.spec:<26} {r.bytes:>14,}")
    lines.append("")
  if plan.notes:
    lines += ["notes:"] + [f"  {n}" for n in plan.notes] + [""]
  lines.append("per device:")
  for k, label in PARTS.items():
    lines.append(f"  {label:<52} {_gib(plan.totals[k])}  ({plan.totals[k]:,} bytes)")
  lines.append(f"  {'total':<52} {_gib(plan.total)}")
  lines.append(f"  {'device memory':<52} {_gib(plan.memory_bytes)}")
  over = plan.total - plan.memory_bytes
  lines.append("fits: " + (f"yes ({(plan.memory_bytes - plan.total) / GIB:.3f} GiB free)" if over <= 0
                           else f"NO (over by {over / GIB:.3f} GiB)"))
  return "\n".join(lines)


def check_fits(plan: Plan) -> None:
  """Raise PlanError when the per-device total exceeds device memory, naming the largest parts and the excess."""
  over = plan.total - plan.memory_bytes
  if over <= 0:
    return
  parts = sorted(plan.totals.items(), key=lambda kv: -kv[1])
  big = ", ".join(f"{PARTS[k]} {v / GIB:.2f} GiB" for k, v in parts[:3] if v)
  raise PlanError(f"plan does not fit: {plan.total / GIB:.2f} GiB per device needed, device memory "
                  f"{plan.memory_bytes / GIB:.2f} GiB (config.memory_gib), over by {over / GIB:.2f} GiB; largest "
                  f"parts: {big}. Shrink config.batch.micro_batch or seq_len, or raise mesh.fsdp / mesh.tensor.")


def main(argv) -> None:
  """Convert --config once into a PlanConfig, print the plan, exit 1 with a message if it does not fit."""
  del argv
  try:
    plan = make_plan(from_configdict(PlanConfig, flags.FLAGS.config))
  except (ConfigError, PlanError) as e:
    sys.exit(f"error: {e}")
  print(format_plan(plan))
  try:
    check_fits(plan)
  except PlanError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/plan.py", "Config file (path:preset).", lock_config=True)
  app.run(main)
