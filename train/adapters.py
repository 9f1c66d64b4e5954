"""LoRA adapters on the stacked parameter pytree: target selection, depth windows, PEFT init, merge, PEFT export.

An adapter `{target: {"a": [L, in, r], "b": [L, r, out]}}` enters the forward as `models.lora.adapt(params, lora,
scale)`, with targets in `LORA_TARGETS` (wq, wk, wv, wo, w_gate, w_up, w_down) and the layer axis spanning the WHOLE
depth. A depth window (`layers=(lo, hi)` or `depth=(f_lo, f_hi)`, or the complement of one) is implemented by
storing A and B as exact zeros outside the window and masking their updates there (`LoraSpec.layer_mask`), so those
layers stay exactly zero for the whole run (the gradient of both factors is also zero there, since the other factor
is zero). Storing full depth costs `L / window` times the (small) adapter memory and keeps one layer axis everywhere
(scan, export, merge).

Initialisation follows PEFT (`peft.tuners.lora.layer.LoraLayer.reset_lora_parameters`, init_lora_weights=True):
lora_A.weight `[r, in]` ~ `nn.init.kaiming_uniform_(a=sqrt(5))` = U(-1/sqrt(in), 1/sqrt(in)), lora_B zeros.
The scale is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023; PEFT `use_rslora`).
PEFT layout: lora_A.weight = a[l].T (`[r, in]`), lora_B.weight = b[l].T (`[out, r]`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from models.config import ModelConfig
from models.hf_io import atomic_dir
from models.params import LAYER_SPECS, layer_shapes
from models.lora import LORA_TARGETS

# Short names (PEFT / HF module names) -> our parameter names.
SHORT_NAMES = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down",
               "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
               "up_proj": "w_up", "down_proj": "w_down"}
# Our names -> HF module path inside a decoder layer.
HF_MODULES = {name: LAYER_SPECS[name].hf.split("{i}.", 1)[1].removesuffix(".weight") for name in LORA_TARGETS}
ALL_PARAM_NAMES = ("embed", "final_norm", "lm_head") + tuple(LAYER_SPECS)


class AdapterError(ValueError):
  """A LoRA specification that cannot apply to the model (unknown target, empty match, bad layer range)."""


def resolve_targets(patterns: Sequence[str] | str, candidates: Sequence[str] = LORA_TARGETS) -> tuple[str, ...]:
  """Our parameter names selected by `patterns`, in `candidates` order.

  Each pattern is a short name (q, k, v, o, gate, up, down, or the HF module names q_proj ... down_proj), one of
  our names (wq ... w_down), "all" / "all-linear" (every candidate), or a regular expression full-matched against
  our names (e.g. "w(q|v)", "w_.*"). A comma-separated string is split.

  Raises:
    AdapterError: a pattern matches no candidate (the message lists the candidates), or nothing is selected.
  """
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(",") if p.strip()]
  chosen: set[str] = set()
  for pat in patterns:
    if pat in ("all", "all-linear"):
      hits = set(candidates)
    elif SHORT_NAMES.get(pat) in candidates:
      hits = {SHORT_NAMES[pat]}
    else:
      try:
        rx = re.compile(pat)
      except re.error as e:
        raise AdapterError(f"target pattern {pat!r} is not a valid regular expression ({e})") from e
      hits = {c for c in candidates if rx.fullmatch(c)}
    if not hits:
      raise AdapterError(f"target pattern {pat!r} matches no module; choose from {tuple(candidates)} or the "
                         f"short names {tuple(k for k in SHORT_NAMES if '_' not in k)}")
    chosen |= hits
  if not chosen:
    raise AdapterError("no target modules given")
  return tuple(c for c in candidates if c in chosen)


def resolve_layers(n_layers: int, layers: Sequence[int] | None = None,
                   depth: Sequence[float] | None = None, complement: bool = False) -> tuple[int, ...]:
  """Decoder layer indices to adapt.

  Args:
    n_layers: model depth L.
    layers: `(lo, hi)` inclusive range of layer indices, or an explicit list of >2 indices; None = all.
    depth: `(f_lo, f_hi)` fractions of depth in [0, 1]: layer l is chosen when f_lo <= l / L <= f_hi (the
      rho-eval convention "depth = layer / n_layers"; e.g. (0.35, 0.52) on 30 layers -> 11..15).
    complement: return the layers OUTSIDE the window given by `layers` / `depth` instead (e.g. depth
      (0.73, 0.87) on 30 layers -> 0..21 and 27..29), sorted.

  Raises:
    AdapterError: both given, an index outside [0, L), lo > hi, fractions outside [0, 1], an empty window, or
      an empty complement (the window covers every layer, or no window was given).
  """
  if complement:
    window = set(resolve_layers(n_layers, layers, depth))
    out = tuple(l for l in range(n_layers) if l not in window)
    if not out:
      raise AdapterError(f"the complement of layers {sorted(window)} is empty: the window covers all "
                         f"{n_layers} layers (or no window was given)")
    return out
  if layers is not None and depth is not None:
    raise AdapterError("give either a layer range or a depth window, not both")
  if depth is not None:
    if len(depth) != 2 or not (0.0 <= depth[0] <= depth[1] <= 1.0):
      raise AdapterError(f"depth window {tuple(depth)} must be (f_lo, f_hi) with 0 <= f_lo <= f_hi <= 1")
    out = tuple(l for l in range(n_layers) if depth[0] - 1e-9 <= l / n_layers <= depth[1] + 1e-9)
    if not out:
      raise AdapterError(f"depth window {tuple(depth)} contains no layer of a {n_layers}-layer model")
    return out
  if layers is None or len(layers) == 0:
    return tuple(range(n_layers))
  layers = [int(l) for l in layers]
  if len(layers) == 2:
    lo, hi = layers
    if lo > hi:
      raise AdapterError(f"layer range ({lo}, {hi}) has lo > hi")
    layers = list(range(lo, hi + 1))
  bad = [l for l in layers if not 0 <= l < n_layers]
  if bad:
    raise AdapterError(f"layer(s) {bad} outside the model: it has {n_layers} layers (0..{n_layers - 1})")
  return tuple(sorted(set(layers)))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how. Hashable (static under jit).

  Attributes:
    rank: r. alpha: lora_alpha. rslora: scale alpha/sqrt(r) instead of alpha/r.
    targets: our parameter names (subset of LORA_TARGETS, see resolve_targets).
    layers: decoder layer indices that carry an adapter (see resolve_layers); others stay exactly zero.
    n_layers: model depth L (the adapters' layer axis).
  """
  rank: int
  alpha: float
  targets: tuple[str, ...]
  layers: tuple[int, ...]
  n_layers: int
  rslora: bool = False

  @classmethod
  def create(cls, cfg: ModelConfig, *, rank: int, alpha: float, targets="q,k,v,o,gate,up,down",
             layers=None, depth=None, rslora: bool = False, complement: bool = False) -> "LoraSpec":
    """Resolve patterns and windows against `cfg` (`complement`: adapt the layers outside the window, see
    resolve_layers). Raises AdapterError for bad targets / layers / rank."""
    if int(rank) < 1:
      raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    return cls(int(rank), float(alpha), resolve_targets(targets),
               resolve_layers(cfg.n_layers, layers, depth, complement), cfg.n_layers, bool(rslora))

  @property
  def scale(self) -> float:
    """The LoRA multiplier: alpha / r (PEFT default) or alpha / sqrt(r) (rsLoRA)."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def layer_mask(self) -> np.ndarray:
    """`[L]` float32, 1.0 at adapted layers, 0.0 elsewhere."""
    m = np.zeros(self.n_layers, np.float32)
    m[list(self.layers)] = 1.0
    return m

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "dtype"))
def init_lora(spec: LoraSpec, cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:
  """PEFT-initialised adapters `{target: {"a": [L, in, r], "b": [L, r, out]}}` (B = 0; A = 0 outside the window).

  A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's `kaiming_uniform_(lora_A.weight, a=sqrt(5))` has gain sqrt(2/(1+5)) and
  bound gain * sqrt(3 / fan_in) = 1/sqrt(fan_in), with fan_in = in (lora_A.weight is `[r, in]`).
  """
  shapes = layer_shapes(cfg)
  mask = jnp.asarray(spec.layer_mask())[:, None, None]
  out = {}
  for t, k in zip(spec.targets, jax.random.split(key, len(spec.targets))):
    d_in, d_out = shapes[t]
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(k, (cfg.n_layers, d_in, spec.rank), jnp.float32, -bound, bound) * mask
    out[t] = {"a": a.astype(dtype), "b": jnp.zeros((cfg.n_layers, spec.rank, d_out), dtype)}
  return out


def merge_lora(params: dict[str, Any], lora: dict[str, dict[str, jax.Array]], scale: float) -> dict[str, Any]:
  """Base params with the adapters folded in: W' = W + scale * A @ B per layer (`[L, in, out]`, W's dtype).

  The merged model's forward equals the adapter forward `forward(adapt(params, lora, scale))` up to
  rounding (tests/test_lora.py).
  """
  layers = dict(params["layers"])
  for t, ab in lora.items():
    delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)) * scale
    layers[t] = (layers[t].astype(jnp.float32) + delta).astype(params["layers"][t].dtype)
  return {**params, "layers": layers}


def peft_config(spec: LoraSpec, base_model: str = "") -> dict[str, Any]:
  """The adapter_config.json dict PEFT 0.21 reads (`LoraConfig` fields)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": spec.rank, "lora_alpha": spec.alpha, "use_rslora": spec.rslora, "lora_dropout": 0.0, "bias": "none",
      "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in spec.targets),
      "layers_to_transform": list(spec.layers), "layers_pattern": "layers",
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
  }


def peft_tensors(spec: LoraSpec, lora: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
  """PEFT state-dict tensors `{base_model.model.model.layers.{i}.<module>.lora_{A,B}.weight: array}` (fp32).

  Only the window's layers are written (matching `layers_to_transform`).
  """
  out = {}
  for t in spec.targets:
    a = np.asarray(jax.device_get(lora[t]["a"]), np.float32)
    b = np.asarray(jax.device_get(lora[t]["b"]), np.float32)
    for i in spec.layers:
      stem = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
      out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  return out


def save_peft(spec: LoraSpec, lora: dict[str, dict[str, Any]], out_dir: str, *, base_model: str = "",
              extra: dict[str, Any] | None = None, overwrite: bool = True) -> str:
  """Write a PEFT adapter directory: adapter_config.json + adapter_model.safetensors (+ gravlab_lora.json).

  `peft.PeftModel.from_pretrained(hf_model, out_dir)` loads it (tests/test_lora.py). Atomic: written into a
  temporary sibling directory renamed onto `out_dir`. `extra` (e.g. the run config) goes to gravlab_lora.json.
  Returns the absolute path.
  """
  out_dir = os.path.abspath(out_dir)
  with atomic_dir(out_dir, overwrite) as tmp:
    save_file(peft_tensors(spec, lora), os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(peft_config(spec, base_model), f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "gravlab_lora.json"), "w") as f:
      json.dump({"spec": spec.to_dict(), "scale": spec.scale, **(extra or {})}, f, indent=2, default=str)
  return out_dir


def load_peft(adapter_dir: str, cfg: ModelConfig) -> tuple[LoraSpec, dict[str, dict[str, jax.Array]]]:
  """Read a PEFT LoRA adapter directory into (LoraSpec, stacked adapters). Inverse of `save_peft`.

  Raises:
    AdapterError: missing files, a non-LoRA or unsupported config (DoRA, bias, fan_in_fan_out, rank/alpha
      patterns), or a tensor whose shape does not fit the model (messages name the file and key).
  """
  cfg_path = os.path.join(adapter_dir, "adapter_config.json")
  w_path = os.path.join(adapter_dir, "adapter_model.safetensors")
  for p in (cfg_path, w_path):
    if not os.path.isfile(p):
      raise AdapterError(f"{p}: missing")
  with open(cfg_path) as f:
    pc = json.load(f)
  if pc.get("peft_type") != "LORA" or pc.get("use_dora") or pc.get("bias", "none") != "none" \
      or pc.get("fan_in_fan_out") or pc.get("rank_pattern") or pc.get("alpha_pattern"):
    raise AdapterError(f"{cfg_path}: only plain LoRA adapters are supported")
  tensors = load_file(w_path)
  rx = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
  inv = {v: k for k, v in HF_MODULES.items()}
  targets, layers = set(), set()
  for k in tensors:
    m = rx.fullmatch(k)
    if not m or m.group(2) not in inv:
      raise AdapterError(f"{w_path}: unexpected tensor {k!r}")
    targets.add(inv[m.group(2)])
    layers.add(int(m.group(1)))
  bad = sorted(l for l in layers if l >= cfg.n_layers)
  if bad:
    raise AdapterError(f"{w_path}: layer(s) {bad} outside the model ({cfg.n_layers} layers)")
  spec = LoraSpec(int(pc["r"]), float(pc["lora_alpha"]), tuple(t for t in LORA_TARGETS if t in targets),
                  tuple(sorted(layers)), cfg.n_layers, bool(pc.get("use_rslora", False)))
  shapes = layer_shapes(cfg)
  lora = {}
  for t in spec.targets:
    d_in, d_out = shapes[t]
    a = np.zeros((cfg.n_layers, d_in, spec.rank), np.float32)
    b = np.zeros((cfg.n_layers, spec.rank, d_out), np.float32)
    for i in spec.layers:
      stem = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
      ka, kb = tensors.get(f"{stem}.lora_A.weight"), tensors.get(f"{stem}.lora_B.weight")
      if ka is None or kb is None or ka.shape != (spec.rank, d_in) or kb.shape != (d_out, spec.rank):
        raise AdapterError(f"{w_path}: {stem} lora_A/lora_B missing or not shaped ({spec.rank}, {d_in}) / "
                           f"({d_out}, {spec.rank})")
      a[i], b[i] = ka.T, kb.T
    lora[t] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
  return spec, lora
