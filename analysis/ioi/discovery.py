"""IOI circuit discovery by path patching, position-aware, after Wang et al. 2022 ("Interpretability in the Wild",
Section 3), and the knockout of (head, position-class) pairs outside the circuit (Section 4).

Three steps, each over every head in one compiled program (analysis.ioi.circuits.path_patch_*), each sender's
effect = drop of the mean logit difference logit(IO) - logit(S) (nats) when the sender's output comes from the ABC
run and every other head is frozen at its clean value:

1. name movers (and negative name movers): senders -> logits (the path through the residual stream at END, MLPs
   recomputed); the k heads with the largest |effect|, position class END;
2. S-inhibition: senders -> the name movers' QUERIES at END; the k largest |effect| among the remaining heads,
   position class END;
3. induction / duplicate-token: senders -> the S-inhibition heads' KEYS and VALUES at S2; the k largest |effect|
   among the remaining heads, position class S2.

Only heads whose |effect| exceeds `tol` are taken (a head that cannot reach the receivers has an effect of
exactly 0, so a step with nothing upstream finds nothing). The circuit is the list of (layer, head, position
class) triples; `keep_mask` turns it into the `[L, N, S, H]` mask of the knockout: every (head, position) pair
outside the circuit is mean-ablated.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from analysis.ioi import circuits as C

POSITION_CLASSES = ("END", "S2")
STEPS = ("name_mover", "s_inhibition", "induction_duplicate")


def position_mask(d, position_class: str) -> np.ndarray:
  """`[N, S]` float32 0/1: each prompt's END (last) or S2 (second subject) position (IOIPrompts `d`).
  Raises ValueError for an unknown class."""
  n, S = d.tokens.shape
  out = np.zeros((n, S), np.float32)
  if position_class == "END":
    out[:, -1] = 1
  elif position_class == "S2":
    out[np.arange(n), np.asarray(d.pos_s2)] = 1
  else:
    raise ValueError(f"position class must be one of {POSITION_CLASSES}, got {position_class!r}")
  return out


def _top(effect: np.ndarray, k: int, taken: np.ndarray, tol: float) -> np.ndarray:
  """0/1 `[L, H]`: the k heads with the largest |effect| above tol, not already taken."""
  score = np.where(taken > 0, -np.inf, np.abs(effect))
  out = np.zeros(effect.shape, np.float32)
  for flat in np.argsort(-score, axis=None)[:k]:
    if score.flat[flat] > tol:
      out.flat[flat] = 1
  return out


def discover(params, cfg, d, ks: tuple[int, int, int] = (3, 3, 3), tol: float = 1e-4, chunk: int = 4) -> dict:
  """The three path-patching steps (module docstring) on IOIPrompts `d` (clean prompts and ABC counterparts).

  ks: heads per step (name movers, S-inhibition, induction / duplicate-token); a 0 stops the search there.
  Returns {"effects": {step: `[L, H]` float64 effect (nats)}, "heads": {step: list of [layer, head]},
  "circuit": list of [layer, head, position class]}.
  """
  toks, abc, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.abc_tokens, d.mask, d.io, d.s))
  z, z_abc = C.head_outputs(params, cfg, toks, mask), C.head_outputs(params, cfg, abc, mask)
  ld = float(np.asarray(C.logit_diff(C.forward(params, toks, cfg, attention_mask=mask, logits="last")[0],
                                     io, s)).mean())
  effects, heads = {}, {}
  taken = np.zeros((cfg.n_layers, cfg.n_heads), np.float32)
  receivers = None
  for step, k, (channel, pos) in zip(STEPS, ks, ((None, None), ("q", "END"), ("kv", "S2"))):
    if k <= 0 or (receivers is not None and not receivers.any()):
      break
    if receivers is None:
      out = C.path_patch_to_logits(params, cfg, toks, mask, z, z_abc, io, s, chunk=chunk)
    else:
      out = C.path_patch_to_heads(params, cfg, toks, mask, z, z_abc, jnp.asarray(receivers), io, s,
                                  channel=channel, recv_pos=jnp.asarray(position_mask(d, pos)), chunk=chunk)
    effects[step] = ld - np.asarray(out, np.float64).mean(-1)
    receivers = _top(effects[step], k, taken, tol)
    taken = np.maximum(taken, receivers)
    heads[step] = [[int(l), int(h)] for l, h in np.argwhere(receivers > 0)]
  cls = {"name_mover": "END", "s_inhibition": "END", "induction_duplicate": "S2"}
  circuit = [[l, h, cls[step]] for step in heads for l, h in heads[step]]
  return {"effects": effects, "heads": heads, "circuit": circuit}


def keep_mask(circuit, d, n_layers: int, n_heads: int) -> np.ndarray:
  """`[L, N, S, H]` float32: 1 at every circuit triple's (layer, prompt, position of its class, head), else 0.
  The knockout ablates `1 - keep_mask` (circuits.knockout with a position-aware mask)."""
  n, S = d.tokens.shape
  out = np.zeros((n_layers, n, S, n_heads), np.float32)
  for l, h, pc in circuit:
    out[l, :, :, h] = np.maximum(out[l, :, :, h], position_mask(d, pc))
  return out


def report_section(discovery_k, c, phases) -> list[str]:
  """The report's table of the path-patching circuit of every phase and its position-aware faithfulness (c: the
  report's cell formatter, analysis.ioi.report._Cells)."""
  n_nm, n_si, n_ind = discovery_k
  lines = ["", "### The path-patching circuit (Wang et al. Section 3)", "",
           f"Per phase and seed: {n_nm} name movers (senders -> logits at END), {n_si} S-inhibition heads (senders -> "
           f"the name movers' queries at END), {n_ind} induction / duplicate-token heads (senders -> the S-inhibition "
           "heads' keys and values at S2), each the largest |path-patching effect| among the heads not yet taken. "
           "Knockout: every (head, position) pair outside the circuit mean-ablated (the circuit's heads are kept "
           "only at their position class). Cells: normalised faithfulness (mean [95% t interval]).", "",
           "| phase | circuit-only logit diff | normalised faithfulness | circuit (seed " + str(c.seeds[0]) + ") |",
           "|---|---|---|---|"]
  for p in phases:
    circ = ", ".join(f"{l}.{h}@{pc}" for l, h, pc in c.results[c.seeds[0]][p]["pp_circuit"])
    lines.append(f"| {p} | {c.pm(p + '/pp_circuit_logit_diff')} | {c.pm(p + '/pp_faithfulness_normalised')} | "
                 f"{circ} |")
  return lines
