"""The sharding plan: a `(data, fsdp, tensor)` device mesh, a PartitionSpec for every weight of the stacked
parameter pytree and of LoRA factors, and sharding constraints on activations inside the forward pass.

Mesh axes (`make_mesh`; jax.jit + GSPMD insert every collective, no pmap):
  data    data parallelism: the batch is split, weights are replicated.
  fsdp    fully sharded data parallelism (ZeRO-3; Rajbhandari et al. 2020): the batch is split AND each weight is
          split on its "other" big axis; XLA all-gathers a layer's weights inside the layer scan and
          reduce-scatters their gradients.
  tensor  Megatron tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", Section 3): q/k/v/gate/up are
          column-parallel (output features split, whole attention heads per shard), o/down row-parallel (input
          features split, one all-reduce per block), token embedding and LM head vocab-parallel.

Parameter specs (models.params layout, weights stored `[in, out]`; L = the stacked layer axis, never split
because `lax.scan` runs over it):

    embed      [V, D]         (tensor, fsdp)         vocab-parallel embedding
    lm_head    [D, V]         (fsdp, tensor)         vocab-parallel (column-parallel) LM head
    final_norm [D]            replicated
    wq         [L, D, H*hd]   (-, fsdp, tensor)      column-parallel, split in whole q heads
    wk, wv     [L, D, KV*hd]  (-, fsdp, tensor)      column-parallel, split in whole kv heads
    wo         [L, H*hd, D]   (-, tensor, fsdp)      row-parallel, split in whole q heads
    w_gate,
    w_up       [L, D, F]      (-, fsdp, tensor)      column-parallel
    w_down     [L, F, D]      (-, tensor, fsdp)      row-parallel
    bq         [L, H*hd]      (-, tensor)            follows wq's output split
    bk, bv     [L, KV*hd]     (-, tensor)            follows wk / wv
    bo         [L, D]         replicated             added after the row-parallel all-reduce
    attn_norm, mlp_norm [L, D], q_norm, k_norm [L, hd]: replicated

LoRA factors (`{target: {"a": [L, in, r], "b": [L, r, out]}}`) follow their base weight: `a` takes the weight's
input-dim axis, `b` its output-dim axis, the rank axis is never split. Full fine-tuning trainables and every
optimizer moment take the spec of the tensor they shadow (train.engine.state_sharding).

Divisibility: a mesh axis of size n is kept on a dimension only if n divides it (for tensor splits of attention
weights: n divides the number of heads the dimension holds, so no head is cut). Otherwise that mesh axis is
dropped from the tensor's spec, i.e. the tensor is replicated over it, and the plan records a note naming the
tensor, the dimension and the sizes (`param_specs` returns them; `python -m train.plan` prints them). Example:
Qwen2.5-7B has 4 kv heads, so with tensor=8 wk/wv/bk/bv are replicated over "tensor" (Megatron does the same for
GQA with fewer kv heads than tensor shards).

Activations (`constrain`, called by models.transformer): the residual stream `[B, S, D]` is split over
(data, fsdp) on the batch and replicated over tensor; q/k/v and per-head outputs `[B, S, heads, hd]` and the MLP
hidden `[B, S, F]` are additionally split over tensor; logits `[B, S, V]` over tensor on the vocab. Constraints
apply only while a mesh is active (`jax.sharding.use_abstract_mesh` / `jax.set_mesh`, which train.engine and
probes.steering enter when they are given a mesh), so code without a mesh runs exactly as before.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.params import param_shapes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
TENSOR = "tensor"

_COL = (None, "fsdp", TENSOR)      # [L, in, out] column-parallel
_ROW = (None, TENSOR, "fsdp")      # [L, in, out] row-parallel
RULES: dict[str, tuple] = {
    "embed": (TENSOR, "fsdp"),
    "lm_head": ("fsdp", TENSOR),
    "final_norm": (None,),
    "layers/attn_norm": (None, None), "layers/mlp_norm": (None, None),
    "layers/q_norm": (None, None), "layers/k_norm": (None, None),
    "layers/wq": _COL, "layers/wk": _COL, "layers/wv": _COL, "layers/w_gate": _COL, "layers/w_up": _COL,
    "layers/wo": _ROW, "layers/w_down": _ROW,
    "layers/bq": (None, TENSOR), "layers/bk": (None, TENSOR), "layers/bv": (None, TENSOR),
    "layers/bo": (None, None),
}


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None, *, tensor: int = 1,
              data: int | None = None) -> Mesh:
  """The `(data, fsdp, tensor)` mesh over `devices` (default: all global devices, every host's after
  `jax.distributed.initialize`). The one way gravlab builds a mesh.

  Args:
    fsdp, tensor: axis sizes (>= 1). data: axis size, default n_devices / (fsdp * tensor).
    devices: the devices, in any order; `jax.make_mesh` orders them for the physical topology (on TPU the
      last axis, tensor, gets the nearest neighbours).
  Returns:
    `jax.sharding.Mesh` with axis names MESH_AXES and Auto axis types (GSPMD propagation).
  Raises:
    ValueError: a size < 1, or data * fsdp * tensor != the device count (the message names the sizes).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, v in (("fsdp", fsdp), ("tensor", tensor)) + ((("data", data),) if data is not None else ()):
    if int(v) < 1:
      raise ValueError(f"mesh axis {name}={v} must be >= 1")
  if n % (fsdp * tensor):
    raise ValueError(f"fsdp={fsdp} x tensor={tensor} must divide the device count {n}")
  d = n // (fsdp * tensor) if data is None else int(data)
  if d * fsdp * tensor != n:
    raise ValueError(f"data={d} x fsdp={fsdp} x tensor={tensor} = {d * fsdp * tensor} != device count {n}")
  return jax.make_mesh((d, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
  """`{axis name: size}` of a Mesh, an AbstractMesh or a plain mapping (axes it lacks count as size 1)."""
  return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


def _head_units(name: str, cfg: ModelConfig | None) -> dict[int, int]:
  """{dim: number of attention heads that dim holds} for the tensor split of attention tensors."""
  if cfg is None:
    return {}
  h, kv = cfg.n_heads, cfg.n_kv_heads
  return {"layers/wq": {2: h}, "layers/wk": {2: kv}, "layers/wv": {2: kv}, "layers/wo": {1: h},
          "layers/bq": {1: h}, "layers/bk": {1: kv}, "layers/bv": {1: kv}}.get(name, {})


def param_spec(name: str, shape: Sequence[int], mesh: Mesh | Mapping[str, int],
               cfg: ModelConfig | None = None) -> tuple[P, list[str]]:
  """PartitionSpec of one parameter and the notes on mesh axes dropped for divisibility.

  Args:
    name: "embed", "lm_head", "final_norm" or "layers/<name>" (models.params layout).
    shape: its full shape (with the leading layer axis for layers/*).
    mesh: a Mesh / AbstractMesh / `{axis: size}`; axes of size 1 or absent are left out of the spec.
    cfg: the model config, to split attention tensors over "tensor" only in whole heads (None: check the
      dimension size only).
  Returns:
    (spec, notes); each note reads "<name> dim <d> (<size>[ = <k> heads]) not divisible by <axis>=<n>:
    replicated over <axis>".
  Raises:
    ValueError: no rule for `name` (the message lists the known names), or a rank that does not match the rule.
  """
  if name not in RULES:
    raise ValueError(f"no sharding rule for parameter {name!r}; known: {sorted(RULES)}")
  rule = RULES[name]
  if len(rule) != len(shape):
    raise ValueError(f"parameter {name!r} has shape {tuple(shape)}; its sharding rule expects rank {len(rule)}")
  sizes = axis_sizes(mesh)
  units = _head_units(name, cfg)
  spec, notes = [], []
  for d, axis in enumerate(rule):
    n = sizes.get(axis, 1) if axis is not None else 1
    if n == 1:
      spec.append(None)
      continue
    count = units[d] if (axis == TENSOR and d in units) else shape[d]
    if count % n:
      what = f"{shape[d]} = {count} heads" if count != shape[d] else f"{shape[d]}"
      notes.append(f"{name} dim {d} ({what}) not divisible by {axis}={n}: replicated over {axis}")
      spec.append(None)
    else:
      spec.append(axis)
  return P(*spec), notes


def flat_items(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  """`[("embed", x), ("layers/wq", x), ...]`: the leaves of a nested dict with "/"-joined paths, in order."""
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += flat_items(v, f"{prefix}{k}/")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def _unflatten(items: list[tuple[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in items:
    *parents, leaf = path.split("/")
    d = out
    for p in parents:
      d = d.setdefault(p, {})
    d[leaf] = v
  return out


def _shape(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, tuple) else tuple(x.shape)


def param_specs(mesh: Mesh | Mapping[str, int], cfg: ModelConfig | None = None,
                tree: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
  """PartitionSpecs for a parameter pytree (or any subset of it, e.g. full fine-tuning trainables).

  Args:
    mesh: see `param_spec`. cfg: the model config (needed when `tree` is None).
    tree: nested dict of arrays / ShapeDtypeStructs / shape tuples in the models.params layout; default
      `models.params.param_shapes(cfg)` (no arrays are created).
  Returns:
    (tree of PartitionSpec with the same structure, list of divisibility notes).
  """
  if tree is None:
    if cfg is None:
      raise ValueError("param_specs needs cfg or tree")
    tree = param_shapes(cfg)
  items, notes = [], []
  for path, x in flat_items(tree):
    spec, n = param_spec(path, _shape(x), mesh, cfg)
    items.append((path, spec))
    notes += n
  return _unflatten(items), notes


def lora_specs(mesh: Mesh | Mapping[str, int], lora: Mapping[str, Any],
               cfg: ModelConfig | None = None) -> tuple[dict[str, Any], list[str]]:
  """PartitionSpecs for LoRA factors `{target: {"a": [L, in, r], "b": [L, r, out]}}` (arrays, ShapeDtypeStructs
  or shape tuples): `a` gets its base weight's input-dim axis, `b` its output-dim axis (see module docstring).

  Returns (tree of PartitionSpec, notes from the base weights' divisibility checks).
  Raises ValueError for a target without a base-weight rule or factors whose shapes do not fit together.
  """
  out, notes = {}, []
  for t, ab in lora.items():
    sa, sb = _shape(ab["a"]), _shape(ab["b"])
    if len(sa) != 3 or len(sb) != 3 or sa[2] != sb[1] or sa[0] != sb[0]:
      raise ValueError(f"LoRA target {t!r}: factors a {sa} and b {sb} must be [L, in, r] and [L, r, out]")
    w, n = param_spec(f"layers/{t}", (sa[0], sa[1], sb[2]), mesh, cfg)
    out[t] = {"a": P(None, w[1], None), "b": P(None, None, w[2])}
    notes += n
  return out, notes


def named(mesh: Mesh, specs: Any) -> Any:
  """A tree of PartitionSpecs -> the same tree of `NamedSharding(mesh, spec)`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(mesh: Mesh, cfg: ModelConfig | None = None, tree: Mapping[str, Any] | None = None) -> Any:
  """NamedShardings for a parameter pytree (see `param_specs`; notes dropped)."""
  return named(mesh, param_specs(mesh, cfg, tree)[0])


def sharding_fn(mesh: Mesh, cfg: ModelConfig):
  """`(path, shape) -> NamedSharding` for models.loading.load(sharding_fn=...): each stacked parameter is placed
  on the mesh by the plan as it is read, so no device ever holds the whole model."""
  return lambda path, shape: NamedSharding(mesh, param_spec(path, shape, mesh, cfg)[0])


def shard_shape(shape: Sequence[int], spec: P, mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
  """Per-device shape of a `shape` array laid out by `spec` on `mesh` (ceil division, as XLA pads)."""
  sizes = axis_sizes(mesh)
  out = []
  for d, n in enumerate(shape):
    axes = spec[d] if d < len(spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    k = math.prod(sizes.get(a, 1) for a in axes)
    out.append(-(-int(n) // k))
  return tuple(out)


def constrain(x: jax.Array, *dims) -> jax.Array:
  """`jax.lax.with_sharding_constraint(x, P(*dims))` while a mesh is active; `x` unchanged otherwise.

  Args:
    x: an array (under jit / vmap / scan).
    dims: per axis of x, None, a mesh axis name or a tuple of names (e.g. BATCH_AXES).
  Axis names the active mesh lacks (or holds as non-Auto axes, e.g. inside shard_map) are ignored; of a tuple,
  trailing names are dropped until the product of the sizes divides the dimension. If nothing is left to
  split, x is returned unconstrained (GSPMD chooses). With no active mesh (`jax.sharding.get_abstract_mesh()`
  empty) this is the identity, so single-device programs are unchanged bit for bit.
  """
  am = jax.sharding.get_abstract_mesh()
  if am.empty:
    return x
  sizes = {n: s for n, s, t in zip(am.axis_names, am.axis_sizes, am.axis_types) if t == AxisType.Auto}
  spec, split = [], False
  for size, names in zip(x.shape, dims):
    names = () if names is None else ((names,) if isinstance(names, str) else tuple(names))
    keep = [n for n in names if n in sizes]
    while keep and size % math.prod(sizes[n] for n in keep):
      keep.pop()
    keep = [n for n in keep if sizes[n] > 1]
    split |= bool(keep)
    spec.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
  if not split:
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_spec(ndim: int, batch_dim: int = 0) -> P:
  """Spec of an input whose axis `batch_dim` is the batch: split over BATCH_AXES, other axes replicated."""
  s: list[Any] = [None] * ndim
  s[batch_dim] = BATCH_AXES
  return P(*s)


def per_device_bytes(shape: Sequence[int], dtype, spec: P, mesh: Mesh | Mapping[str, int]) -> int:
  """Bytes one device holds of a `shape` / `dtype` array laid out by `spec` (see `shard_shape`)."""
  return math.prod(shard_shape(shape, spec, mesh)) * jnp.dtype(dtype).itemsize
