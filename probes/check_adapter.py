"""Which layers of a PEFT adapter fall in a layer map's windows, with the map's evidence for each.

    python -m probes.check_adapter path/to/adapter_config.json --map=runs/smollm2-map/map.json [--out=check.json]

Reads only the adapter's config (no weights): `target_modules` (a list matched as PEFT does, exact name or ".name"
suffix; a string full-matched as a regular expression, in which case PEFT ignores `layers_to_transform`; "all-linear"
= every linear module of a decoder layer), `layers_to_transform` (an int or list; None = every layer) with
`layers_pattern`, and `exclude_modules` (peft.tuners.tuners_utils.check_target_module_exists, PEFT 0.21). Module
names are those of the Llama / Qwen2 layout that gravlab loads (model.layers.{i}.self_attn.q_proj ...,
model.embed_tokens, lm_head). A decoder layer is adapted when any of its modules is; an adapted layer l changes
resid_post[l], the site the map steers (probes.layer_map), and everything after it.

Prints a markdown table (behavior, window, adapted layers inside it, the window's peak slope [95% CI], z and q, the
exact cells there) and, with --out, writes it as JSON. Exit status 0 on success, 2 for bad input (one line naming the
file and field).
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from absl import app, flags

from probes import layer_map
from train.adapters import HF_MODULES
from train.rundir import write_json

EMBED, LM_HEAD = "model.embed_tokens", "lm_head"


def module_names(n_layers: int) -> dict[str, int | None]:
  """Every adaptable module name of the Llama / Qwen2 layout -> its decoder layer (None for embed_tokens and
  lm_head)."""
  out: dict[str, int | None] = {EMBED: None, LM_HEAD: None}
  for i in range(n_layers):
    for path in HF_MODULES.values():
      out[f"model.layers.{i}.{path}"] = i
  return out


def _in_list(key: str, names) -> bool:
  return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_ok(key: str, pc: dict, path: str) -> bool:
  """PEFT's layers_to_transform / layers_pattern filter for a list-matched key."""
  idx = pc.get("layers_to_transform")
  if idx is None or (isinstance(idx, list) and not idx):
    return True
  if not isinstance(idx, (int, list)) or (isinstance(idx, list) and not all(isinstance(i, int) for i in idx)):
    raise ValueError(f"{path}: layers_to_transform must be an int or a list of ints, got {idx!r}")
  pats = pc.get("layers_pattern") or []
  pats = [pats] if isinstance(pats, str) else pats
  m = None
  if not pats:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  for p in pats:
    m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
    if m:
      break
  if not m:
    return False
  return int(m["idx"]) == idx if isinstance(idx, int) else int(m["idx"]) in idx


def adapted_modules(pc: dict, n_layers: int, path: str = "adapter_config.json") -> dict[str, int | None]:
  """The modules of an `n_layers` model that the PEFT config `pc` adapts -> their decoder layer (module docstring).

  Raises ValueError naming `path` and the field for a config that is not LoRA-like, a target_modules that is
  neither a string nor a list, or one that adapts nothing in this model."""
  tm = pc.get("target_modules")
  if tm is None:
    raise ValueError(f"{path}: target_modules missing (target_parameters adapters are not mapped to layers)")
  if isinstance(tm, str) and tm.lower() == "all-linear":
    tm = sorted({p.split(".")[-1] for p in HF_MODULES.values()})
  if not isinstance(tm, (str, list)):
    raise ValueError(f"{path}: target_modules must be a string or a list, got {type(tm).__name__}")
  ex = pc.get("exclude_modules") or []
  out = {}
  for key, layer in module_names(n_layers).items():
    if (re.fullmatch(ex, key) if isinstance(ex, str) else _in_list(key, ex)):
      continue
    hit = re.fullmatch(tm, key) if isinstance(tm, str) else (_in_list(key, tm) and _layer_ok(key, pc, path))
    if hit:
      out[key] = layer
  layers = pc.get("layers_to_transform")
  bad = [l for l in ([layers] if isinstance(layers, int) else layers or []) if not 0 <= l < n_layers]
  if bad:
    raise ValueError(f"{path}: layers_to_transform {bad} outside the mapped model's {n_layers} layers")
  if not out:
    raise ValueError(f"{path}: target_modules {tm!r} adapt no module of a {n_layers}-layer Llama / Qwen2 model")
  return out


def check(pc: dict, m: dict[str, Any], path: str = "adapter_config.json") -> dict[str, Any]:
  """The adapted layers of `pc` against the layer map `m` (probes.layer_map.load): {"adapted_layers",
  "modules_by_layer", "embeddings_adapted", "lm_head_adapted", "base_model" (the adapter's), "map_model",
  "overlaps": [{"behavior", "window" [start, end], "sign", "adapted" [layers], "evidence" (the map's window)}],
  "outside": adapted layers in no window of any behavior}."""
  mods = adapted_modules(pc, m["model"]["n_layers"], path)
  by_layer: dict[int, list[str]] = {}
  for key, l in mods.items():
    if l is not None:
      by_layer.setdefault(l, []).append(key.rsplit(".", 1)[-1])
  adapted = sorted(by_layer)
  overlaps, inside = [], set()
  for b, r in m["behaviors"].items():
    for w in r["windows"]:
      hit = [l for l in adapted if w["start"] <= l <= w["end"]]
      if hit:
        inside |= set(hit)
        overlaps.append({"behavior": b, "window": [w["start"], w["end"]], "sign": w["sign"], "adapted": hit,
                         "evidence": w})
  return {"adapter": path, "base_model": pc.get("base_model_name_or_path"), "map_model": m["model"]["name"],
          "adapted_layers": adapted, "modules_by_layer": {str(l): sorted(v) for l, v in by_layer.items()},
          "embeddings_adapted": EMBED in mods, "lm_head_adapted": LM_HEAD in mods, "overlaps": overlaps,
          "outside": [l for l in adapted if l not in inside]}


def markdown(res: dict[str, Any]) -> str:
  """The check as a markdown table with one line per overlapping window."""
  lines = [f"Adapter {res['adapter']} (base {res['base_model']!r}) against the layer map of {res['map_model']!r}.",
           f"Adapted decoder layers: {_ranges(res['adapted_layers'])}"
           + ("; token embeddings adapted (every layer's input changes)" if res["embeddings_adapted"] else "")
           + ("; lm_head adapted" if res["lm_head_adapted"] else "") + ".", ""]
  if not res["overlaps"]:
    return "\n".join(lines + ["No adapted layer falls in a mapped window (q < the map's q_level)."])
  lines += ["| behavior | window (sign) | adapted layers in it | peak layer: slope [95% CI], z, p, q | exact cells |",
            "|---|---|---|---|---|"]
  for o in res["overlaps"]:
    w = o["evidence"]
    cells = "; ".join(layer_map.fmt_cell(c) for c in w["exact_cells"]) or "-"
    lines.append(f"| {o['behavior']} | {_ranges(list(range(w['start'], w['end'] + 1)))} ({w['sign']}) | "
                 f"{_ranges(o['adapted'])} | "
                 f"{layer_map.fmt_peak(w)} | {cells} |")
  if res["outside"]:
    lines += ["", f"Adapted layers in no window: {_ranges(res['outside'])}."]
  return "\n".join(lines)


def _ranges(ls: list[int]) -> str:
  """[1, 2, 3, 7] -> '1-3, 7'."""
  out, i = [], 0
  while i < len(ls):
    j = i
    while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
      j += 1
    out.append(f"{ls[i]}-{ls[j]}" if j > i else f"{ls[i]}")
    i = j + 1
  return ", ".join(out) or "none"


def main(argv) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m probes.check_adapter ADAPTER_CONFIG_JSON_OR_DIR --map=map.json")
  path = argv[1]
  path = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
  try:
    with open(path) as f:
      pc = json.load(f)
    res = check(pc, layer_map.load(flags.FLAGS.map), path)
  except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(markdown(res))
  if flags.FLAGS.out:
    write_json(flags.FLAGS.out, res)


if __name__ == "__main__":
  flags.DEFINE_string("map", None, "A probes.map map.json.", required=True)
  flags.DEFINE_string("out", None, "Also write the check as JSON here.")
  app.run(main)
