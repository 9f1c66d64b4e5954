"""IOI circuit discovery by path patching, position-aware, after Wang et al. 2022 ("Interpretability in the Wild",
Section 3), and the knockout of (head, position-class) pairs outside the circuit (Section 4).

Three steps, each over every sender in one compiled program (`path_patch_fast`), each sender's
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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from analysis.ioi import circuits as C
from models.transformer import Interventions, KVCache, default_positions, forward_cached

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


# ---- Path patching through one position (exact, much cheaper than circuits.path_patch_*)
#
# With every head but the sender frozen at its clean output, the residual stream at a position p reads nothing
# from other positions (attention outputs are fixed), so the sender's path into position p's residual is one
# token through the L layers with every head's z overridden: embed + frozen heads + MLPs recomputed. At END
# (receivers' queries, or the logits) the rest of the run is a single-token decode over the clean run's KV cache;
# at S2 (receivers' keys and values) the clean run is decoded from the earliest S2 on. Equal to
# circuits.path_patch_to_logits / path_patch_to_heads with recv_pos at that position (tests).


def _frozen_resid(params, cfg, tok1, pos1, z1, z1_new, l, h):
  """resid_pre `[L, N, 1, D]` and final residual `[N, D]` of one position with every head frozen at z1
  `[L, N, 1, H, hd]` except head (l, h), which gets z1_new."""
  value = z1 + C._one_head(cfg, l, h, None)[..., None] * (z1_new - z1)
  iv = Interventions(head_mask=jnp.ones((cfg.n_layers, 1, 1, cfg.n_heads)), head_value=value)
  _, acts, _ = forward_cached(params, tok1, cfg, attention_mask=jnp.ones_like(tok1), positions=pos1,
                              capture=("resid_pre", "resid"), logits="none", interventions=iv)
  return acts["resid_pre"], acts["resid"][-1][:, -1]


@functools.partial(jax.jit, static_argnames=("cfg", "target", "chunk", "start"))
def path_patch_fast(params, cfg, tokens, mask, z, z_new, io, s, senders, receivers=None, pos_s2=None,
                    target: str = "logits", chunk: int = 8, start: int = 0) -> jax.Array:
  """Path patching of each sender (`senders` = (layers `[K]`, heads `[K]`)) into `target`: "logits" (the
  direct path at END), "q_end" (the receivers' `[L, H]` queries at END) or "kv_s2" (their keys and values at
  S2, `pos_s2` `[N]`; `start` <= min(pos_s2), static: the positions before it are read from the clean run's
  cache). z / z_new: `[L, N, S, H, hd]` clean / corrupted head outputs. Returns `[K, N]` logit differences
  (compare with the clean one). Left padding: END = position S - 1."""
  N, S = tokens.shape
  positions = default_positions(mask)
  rows = jnp.arange(N)
  if target == "kv_s2":
    at = lambda x: x[:, rows, pos_s2][:, :, None]                                  # [L, N, 1, ...] at S2
    tok1, pos1 = tokens[rows, pos_s2][:, None], positions[rows, pos_s2][:, None]
    kv = receivers.reshape(cfg.n_layers, cfg.n_kv_heads, -1).max(-1).astype(jnp.float32)   # [L, KV]
    recv = kv[:, None, None, :] * jax.nn.one_hot(pos_s2 - start, S - start)[None, :, :, None]
  else:
    at = lambda x: x[:, :, -1:]
    tok1, pos1 = tokens[:, -1:], positions[:, -1:]
  z1, z1_new = at(z), at(z_new)
  if target != "logits":
    cache = KVCache.init(cfg, N, S, params["embed"].dtype)
    _, _, cache = forward_cached(params, tokens, cfg, attention_mask=mask, positions=positions, cache=cache,
                                 logits="none")
    cache = cache._replace(index=jnp.asarray(S - 1 if target == "q_end" else start, jnp.int32))

  def one(lh):
    pre, final = _frozen_resid(params, cfg, tok1, pos1, z1, z1_new, lh[0], lh[1])
    if target == "logits":
      return C._logit_diff_of_resid(params, cfg, final, io, s)
    if target == "q_end":
      iv = Interventions(qkv_source=pre, q_from_source=receivers.astype(jnp.float32)[:, None, None, :])
      _, out, _ = forward_cached(params, tokens[:, -1:], cfg, attention_mask=jnp.ones_like(tok1),
                                 positions=positions[:, -1:], cache=cache, capture=("resid",), logits="none",
                                 interventions=iv)
      return C._logit_diff_of_resid(params, cfg, out["resid"][-1][:, -1], io, s)
    # positions before the earliest S2 (`start`) are the clean run's: decode the rest over its cache
    src = pre * jax.nn.one_hot(pos_s2 - start, S - start)[None, :, :, None]       # resid_pre placed at S2
    _, out, _ = forward_cached(params, tokens[:, start:], cfg, attention_mask=mask[:, start:],
                               positions=positions[:, start:], cache=cache, capture=("resid",), logits="none",
                               interventions=Interventions(qkv_source=src, kv_from_source=recv))
    return C._logit_diff_of_resid(params, cfg, out["resid"][-1][:, -1], io, s)

  return jax.lax.map(one, senders, batch_size=chunk)


def _top(effect: np.ndarray, k: int, taken: np.ndarray, tol: float) -> np.ndarray:
  """0/1 `[L, H]`: the k heads with the largest |effect| above tol, not already taken."""
  score = np.where(taken > 0, -np.inf, np.abs(effect))
  out = np.zeros(effect.shape, np.float32)
  for flat in np.argsort(-score, axis=None)[:k]:
    if score.flat[flat] > tol:
      out.flat[flat] = 1
  return out


def discover(params, cfg, d, ks: tuple[int, int, int] = (3, 3, 3), tol: float = 1e-4, chunk: int = 8) -> dict:
  """The three path-patching steps (module docstring) on IOIPrompts `d` (clean prompts and ABC counterparts),
  by `path_patch_fast`; a step patches only the senders in layers below its deepest receiver (the others cannot
  reach the receivers: their effect is exactly 0).

  ks: heads per step (name movers, S-inhibition, induction / duplicate-token); a 0 stops the search there.
  Returns {"effects": {step: `[L, H]` float64 effect (nats)}, "heads": {step: list of [layer, head]},
  "circuit": list of [layer, head, position class]}.
  """
  toks, abc, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.abc_tokens, d.mask, d.io, d.s))
  z, z_abc = C.head_outputs(params, cfg, toks, mask), C.head_outputs(params, cfg, abc, mask)
  ld = float(np.asarray(C.logit_diff(C.forward(params, toks, cfg, attention_mask=mask, logits="last")[0],
                                     io, s)).mean())
  L, H = cfg.n_layers, cfg.n_heads
  effects, heads = {}, {}
  taken = np.zeros((L, H), np.float32)
  receivers = None
  for step, k, target in zip(STEPS, ks, ("logits", "q_end", "kv_s2")):
    depth = L if receivers is None else int(np.argwhere(receivers > 0)[:, 0].max()) if receivers.any() else 0
    if k <= 0:
      break
    if depth == 0:                                  # receivers in layer 0: nothing upstream can reach them
      effects[step], heads[step] = np.zeros((L, H)), []
      break
    senders = (jnp.repeat(jnp.arange(depth), H), jnp.tile(jnp.arange(H), depth))
    out = path_patch_fast(params, cfg, toks, mask, z, z_abc, io, s, senders,
                          receivers=None if receivers is None else jnp.asarray(receivers),
                          pos_s2=jnp.asarray(d.pos_s2), target=target, chunk=chunk, start=int(np.min(d.pos_s2)))
    effects[step] = np.zeros((L, H))
    effects[step][:depth] = (ld - np.asarray(out, np.float64).mean(-1)).reshape(depth, H)
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
