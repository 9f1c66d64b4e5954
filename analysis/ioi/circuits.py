"""Circuit tools over ALL attention heads, each as one compiled program (lax.map over vmapped head indices).

Definitions follow Wang et al. 2022 ("Interpretability in the Wild", IOI) and Chhabra et al. 2025 (CMAP):

- activation patching: replace one head's output z (before o_proj) with a donor run's, measure the metric
  (at the final position only, `method="last"` computes it exactly from single-token decodes over a KV cache);
- mean ablation / knockout: replace heads' z by their mean over a reference distribution (the ABC prompts,
  per template), Section 3;
- path patching (Section 3.1): sender head h gets the corrupted activation while every other head is frozen to
  its clean value; the change reaches either the logits directly (MLPs recompute) or chosen receiver heads'
  queries / keys+values, which are then recomputed from the patched residual stream in a clean run;
- direct logit attribution: each component's write to the final residual stream, projected on the
  (final-norm-scaled) unembedding difference W_U[:, IO] - W_U[:, S], with the final RMSNorm scale frozen at
  its value in the run, so the terms sum exactly to the logit difference;
- cross-model activation patching (CMAP): run model B, cache per-head z, substitute it into model A at chosen
  heads and positions.

The metric throughout is the logit difference logit(IO) - logit(S) at the last position.
Shapes: N prompts, S positions, L layers, H heads, hd head_dim, D d_model. Parameters must not carry LoRA
(merge adapters first).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.interventions import head_mask, one_head
from models.transformer import (Interventions, KVCache, default_positions, forward, forward_cached,
                                rms_norm)


FAITHFULNESS_FLOOR = 0.1   # nats of mean logit difference: below it the full model does not do the task


def normalised_faithfulness(f_circuit: float, f_full: float, f_empty: float,
                            floor: float = FAITHFULNESS_FLOOR) -> float:
  """Circuit faithfulness normalised between the empty circuit and the full model:
  (F(C) - F(empty)) / (F(M) - F(empty)), with F the mean logit difference (nats) when every head outside C (for
  F(empty): every head) is mean-ablated; 1 = the circuit does all the model does, 0 = no more than nothing.
  (Wang et al. 2022 Sec. 4 compare F(C) with F(M) and F(empty) of the same knockout; the normalised form is
  issue 19's.) Returns NaN, undefined, when |F(M) - F(empty)| < floor: the full model does not do the task, and
  a ratio over that gap is noise."""
  gap = float(f_full) - float(f_empty)
  return float("nan") if abs(gap) < floor else (float(f_circuit) - float(f_empty)) / gap


def logit_diff(logits_last: jax.Array, io: jax.Array, s: jax.Array) -> jax.Array:
  """logit(IO) - logit(S): logits_last `[N, V]`, io / s `[N]` int -> `[N]` float32."""
  pick = lambda ids: jnp.take_along_axis(logits_last, ids[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return pick(io) - pick(s)


def head_outputs(params, cfg: ModelConfig, tokens, mask, **kw) -> jax.Array:
  """Per-head attention outputs z `[L, N, S, H, hd]` of a run (models.transformer capture "heads")."""
  return forward(params, tokens, cfg, attention_mask=mask, capture=("heads",), logits="none", **kw)[1]["heads"]


def _all_heads(cfg: ModelConfig):
  L, H = cfg.n_layers, cfg.n_heads
  return jnp.repeat(jnp.arange(L), H), jnp.tile(jnp.arange(H), L)


def _one_head(cfg: ModelConfig, layer, head, pos_mask):
  """Mask `[L, N|1, S|1, H]` selecting one head at `pos_mask` `[N, S]` positions (or all if None)."""
  return one_head(cfg.n_layers, cfg.n_heads, layer, head, pos_mask)


def _logit_diff_of_resid(params, cfg: ModelConfig, h_last: jax.Array, io: jax.Array, s: jax.Array) -> jax.Array:
  """logit(IO) - logit(S) from the final residual stream h_last `[N, D]` (before the final norm).

  Equals `logit_diff(final_logits(...))` up to float rounding: the difference of two logits is the normed
  residual dotted with W_U[:, IO] - W_U[:, S], so only two unembedding columns are read instead of V.
  """
  hn = rms_norm(h_last, params["final_norm"], cfg.rms_eps).astype(jnp.float32)           # [N, D]
  w = (params["embed"] if cfg.tie_embeddings else params["lm_head"].T)                   # [V, D]
  u = jnp.take(w, io, axis=0).astype(jnp.float32) - jnp.take(w, s, axis=0).astype(jnp.float32)
  return jnp.sum(hn * u, axis=-1)


def _patch_last(params, cfg: ModelConfig, tokens, mask, donor_z, io, s, layers, idx, chunk):
  """Exact per-head patching at the final position by single-token decodes over the base run's KV cache.

  Identity: replacing z of head (l, h) at position S-1 only changes the residual stream at position S-1 and
  only from layer l on (causal attention: positions < S-1 never read position S-1). So every layer's keys /
  values at positions < S-1 and the residual entering layer l at S-1 are the base run's. Each head is one
  decode step of the last token through all L layers, reading the base run's K/V cache (slots 0..S-2, the
  step writes its own slot S-1), with the residual at the output of layers j < l pinned to the base run's
  (resid_mask, so layer l starts from exactly the cached base residual) and head h's z at layer l replaced
  by the donor's; the metric is read off two unembedding columns (_logit_diff_of_resid).
  Cost per head: N tokens through L layers (plus attention over S cached slots) instead of N * S tokens,
  i.e. about S times less than method="full"; the layers j < l are recomputed and then discarded (masking
  keeps one compiled shape for every head), about half of the work on average.
  """
  N, S = tokens.shape
  L = cfg.n_layers
  positions = default_positions(mask)
  cache = KVCache.init(cfg, N, S, params["embed"].dtype)
  _, acts, cache = forward_cached(params, tokens, cfg, attention_mask=mask, positions=positions,
                                  cache=cache, capture=("resid_post",), logits="none")
  base_out = acts["resid_post"][:, :, -1:]                                       # [L, N, 1, D] layer outputs
  cache = cache._replace(index=jnp.asarray(S - 1, jnp.int32))                    # decode writes slot S-1
  donor_last = donor_z[:, :, -1:]                                                # [L, N, 1, H, hd]
  last_tok, last_pos = tokens[:, -1:], positions[:, -1:]

  def one(lh):
    l, h = lh
    before = (jnp.arange(L) < l).astype(jnp.float32)[:, None, None]              # [L, 1, 1]
    iv = Interventions(head_mask=_one_head(cfg, l, h, None), head_value=donor_last,
                       resid_mask=before, resid_value=base_out)
    _, out, _ = forward_cached(params, last_tok, cfg, attention_mask=jnp.ones_like(last_tok),
                               positions=last_pos, cache=cache, capture=("resid",), logits="none",
                               interventions=iv)
    return _logit_diff_of_resid(params, cfg, out["resid"][-1][:, -1], io, s)

  return jax.lax.map(one, (layers, idx), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "method"))
def patch_each_head(params, cfg: ModelConfig, tokens, mask, donor_z, io, s, pos_mask=None, chunk: int = 8,
                    heads=None, method: str = "full"):
  """Activation patching of every head in turn: z_h <- donor_z_h (at pos_mask positions, default all).

  Args:
    tokens, mask: `[N, S]` the run being patched (e.g. the ABC prompts to patch clean activations into,
      or the clean prompts to patch corrupted ones into). Left padding only (position S-1 is every
      prompt's final token).
    donor_z: `[L, N, S, H, hd]` z of the donor run (head_outputs); method "last" reads only position S-1.
    io, s: `[N]` answer token ids. pos_mask: `[N, S]` 0/1 positions to patch, or None for every position.
    chunk: heads per vmapped batch inside the lax.map (memory / speed trade-off).
    heads: optional (layers `[K]`, heads `[K]`) int arrays: patch only these K heads.
    method: "full" (default): each head is a full forward with the head mask (any pos_mask).
      "last": patch the final position only (pos_mask must be None; the result equals method="full" with
      pos_mask = 1 at position S-1), computed exactly by single-token decodes over the base run's KV cache
      (see _patch_last): about S times cheaper per head.

  Returns:
    `[L, H, N]` logit difference of the patched run for each head, or `[K, N]` when `heads` is given.

  Raises:
    ValueError: an unknown method, or a pos_mask with method="last".
  """
  layers, idx = _all_heads(cfg) if heads is None else heads
  if method == "last":
    if pos_mask is not None:
      raise ValueError('patch_each_head(method="last") always patches the final position; pass pos_mask=None')
    res = _patch_last(params, cfg, tokens, mask, donor_z, io, s, layers, idx, chunk)
  elif method == "full":
    def one(lh):
      hm = _one_head(cfg, lh[0], lh[1], pos_mask)
      out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last",
                       interventions=Interventions(head_mask=hm, head_value=donor_z))
      return logit_diff(out, io, s)

    res = jax.lax.map(one, (layers, idx), batch_size=chunk)
  else:
    raise ValueError(f'method must be "full" or "last", got {method!r}')
  return res if heads is not None else res.reshape(cfg.n_layers, cfg.n_heads, -1)


def template_means(z: jax.Array, template: jax.Array, n_templates: int) -> jax.Array:
  """Mean of z over prompts sharing a template, broadcast back to each prompt.

  z: `[L, N, S, H, hd]` (e.g. heads of the ABC prompts; a template's prompts share length and positions);
  template: `[N]` int in [0, n_templates). Returns `[L, N, S, H, hd]` where prompt i holds its template's mean
  (Wang et al.'s per-template mean ablation).
  """
  onehot = jax.nn.one_hot(template, n_templates, dtype=z.dtype)                 # [N, T]
  sums = jnp.einsum("nt,lnshd->ltshd", onehot, z)
  counts = jnp.maximum(onehot.sum(0), 1.0)
  means = sums / counts[None, :, None, None, None]
  return jnp.einsum("nt,ltshd->lnshd", onehot, means)


@functools.partial(jax.jit, static_argnames=("cfg", "n_templates"))
def _template_sums(params, cfg: ModelConfig, tokens, mask, template, weight, n_templates: int):
  """Sum of z over the rows of each template, `[T, L, S, H, hd]`, and the rows counted `[T]` (weight 0 = a
  padding row)."""
  z = head_outputs(params, cfg, tokens, mask).astype(jnp.float32)
  onehot = jax.nn.one_hot(template, n_templates, dtype=jnp.float32) * weight[:, None]
  return jnp.einsum("nt,lnshd->tlshd", onehot, z), onehot.sum(0)


def reference_means(params, cfg: ModelConfig, tokens, mask, template, n_templates: int,
                    chunk: int = 64) -> jax.Array:
  """Per-template mean of every head's z over a separate reference set (analysis.ioi.data.make_abc_reference),
  Wang et al. 2022 Sec. 3's mean ablation over the ABC distribution.

  tokens, mask: `[M, S]` (left-padded to the evaluation prompts' S, so positions line up within a template);
  template: `[M]` int in [0, n_templates). Runs in fixed chunks of `chunk` rows (one compiled shape).
  Returns `[T, L, S, H, hd]` float32 (zeros for a template with no rows). Index it with `means_for`.
  """
  tokens, mask, template = (np.asarray(x) for x in (tokens, mask, template))
  M = len(tokens)
  sums, counts = 0.0, 0.0
  for i in range(0, M, chunk):
    n = min(chunk, M - i)
    pad = lambda x: np.concatenate([x[i:i + n], np.repeat(x[i:i + 1], chunk - n, axis=0)])
    weight = (np.arange(chunk) < n).astype(np.float32)
    s, c = _template_sums(params, cfg, jnp.asarray(pad(tokens)), jnp.asarray(pad(mask)),
                          jnp.asarray(pad(template)), jnp.asarray(weight), n_templates)
    sums, counts = sums + s, counts + c
  return sums / jnp.maximum(counts, 1.0)[:, None, None, None, None]


def means_for(means: jax.Array, template) -> jax.Array:
  """`reference_means` `[T, L, S, H, hd]` broadcast to prompts: `[L, N, S, H, hd]`, prompt i getting its
  template's mean (template `[N]` int in [0, T))."""
  return jnp.moveaxis(jnp.take(means, jnp.asarray(template), axis=0), 0, 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def knockout(params, cfg: ModelConfig, tokens, mask, z_mean, ablate, io, s):
  """Mean-ablate a set of heads: z_h <- z_mean_h for heads with ablate[l, h] = 1.

  ablate: `[L, H]` 0/1 (or fractional), every position; or `[L, N, S, H]`: (head, position) pairs (the
  position-aware knockout of a path-patching circuit, analysis.ioi.discovery.keep_mask). z_mean:
  `[L, N, S, H, hd]` (the ABC means). Returns `[N]` logit difference. Circuit faithfulness =
  mean(knockout(1 - circuit)) / mean(clean) (Wang et al. Section 4: everything outside the circuit is
  mean-ablated).
  """
  hm = ablate.astype(jnp.float32)
  hm = hm if hm.ndim == 4 else hm[:, None, None, :]
  out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last",
                   interventions=Interventions(head_mask=hm, head_value=z_mean))
  return logit_diff(out, io, s)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def knockout_each_head(params, cfg: ModelConfig, tokens, mask, z_mean, io, s, chunk: int = 8):
  """Mean-ablate every head alone. Returns `[L, H, N]` logit differences."""
  layers, heads = _all_heads(cfg)

  def one(lh):
    ablate = head_mask(cfg.n_layers, cfg.n_heads, lh[0], lh[1])
    return knockout(params, cfg, tokens, mask, z_mean, ablate, io, s)

  return jax.lax.map(one, (layers, heads), batch_size=chunk).reshape(cfg.n_layers, cfg.n_heads, -1)


def _frozen_except(cfg, layer, head, z_orig, z_new):
  """Interventions freezing every head to z_orig except (layer, head), which gets z_new."""
  sel = _one_head(cfg, layer, head, None)                                       # [L, 1, 1, H]
  value = z_orig + sel[..., None] * (z_new - z_orig)
  return Interventions(head_mask=jnp.ones((cfg.n_layers, 1, 1, cfg.n_heads)), head_value=value)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def path_patch_to_logits(params, cfg: ModelConfig, tokens, mask, z_orig, z_new, io, s, chunk: int = 8):
  """Path patching sender -> logits for every sender head.

  Each sender h gets z_new (the corrupted run's z) while all other heads are frozen at z_orig (the clean
  run's); MLPs recompute. Returns `[L, H, N]` logit differences (compare with the clean logit difference).
  """
  layers, heads = _all_heads(cfg)

  def one(lh):
    out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last",
                     interventions=_frozen_except(cfg, lh[0], lh[1], z_orig, z_new))
    return logit_diff(out, io, s)

  return jax.lax.map(one, (layers, heads), batch_size=chunk).reshape(cfg.n_layers, cfg.n_heads, -1)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "channel"))
def path_patch_to_heads(params, cfg: ModelConfig, tokens, mask, z_orig, z_new, receivers, io, s,
                        channel: str = "q", recv_pos=None, chunk: int = 4):
  """Path patching sender -> receiver heads' queries ("q") or keys and values ("kv"), for every sender.

  Step 1 (per sender): clean run with the sender set to z_new and all other heads frozen at z_orig; record
  the residual stream entering each layer. Step 2: clean run in which only the receivers' q (or k, v) are
  computed from that residual stream (Interventions.qkv_source), at `recv_pos` positions (default all).

  Args:
    receivers: `[L, H]` 0/1 receiver heads. For "kv" a KV head is a receiver if any of its query heads is
      (grouped-query attention shares k, v within a group).
    recv_pos: `[N, S]` 0/1 positions where receivers read the patched input, or None.

  Returns:
    `[L, H, N]` logit differences of step 2 for each sender.
  """
  layers, heads = _all_heads(cfg)
  L, H, KV = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
  pos = jnp.ones(tokens.shape, jnp.float32) if recv_pos is None else recv_pos.astype(jnp.float32)
  if channel == "q":
    field, rmask = "q_from_source", receivers.astype(jnp.float32)
  elif channel == "kv":
    field, rmask = "kv_from_source", receivers.reshape(L, KV, H // KV).max(-1).astype(jnp.float32)
  else:
    raise ValueError(f"channel must be 'q' or 'kv', got {channel!r}")
  recv = rmask[:, None, None, :] * pos[None, :, :, None]

  def one(lh):
    _, acts = forward(params, tokens, cfg, attention_mask=mask, logits="none", capture=("resid_pre",),
                      interventions=_frozen_except(cfg, lh[0], lh[1], z_orig, z_new))
    iv = Interventions(qkv_source=acts["resid_pre"], **{field: recv})
    out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last", interventions=iv)
    return logit_diff(out, io, s)

  return jax.lax.map(one, (layers, heads), batch_size=chunk).reshape(L, H, -1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def direct_logit_attribution(params, cfg: ModelConfig, tokens, mask, io, s) -> dict[str, jax.Array]:
  """Decompose the logit difference at the last position into per-component direct effects.

  With the final RMSNorm scale c = 1 / rms(h_L) frozen at its value in this run, logit(IO) - logit(S) =
  sum over residual components x of  x . (c * final_norm * (W_U[:, IO] - W_U[:, S])), and the residual
  h_L = embed + sum_l (sum_h z_h W_O^h + b_O + mlp_l).

  Returns (float32):
    heads `[N, L, H]`, mlp `[N, L]`, attn_bias `[N, L]` (o_proj bias; zero without one), embed `[N]`,
    total `[N]` (the model's logit difference). heads + mlp + attn_bias + embed sums to total (an identity,
    up to float error).
  """
  _, acts = forward(params, tokens, cfg, attention_mask=mask, logits="none",
                    capture=("resid", "heads", "mlp_out"))
  last = lambda x: x[..., -1, :].astype(jnp.float32)
  h_final = last(acts["resid"][-1])                                                # [N, D]
  scale = jax.lax.rsqrt(jnp.mean(h_final * h_final, -1, keepdims=True) + cfg.rms_eps)
  w_u = (params["embed"].T if cfg.tie_embeddings else params["lm_head"]).astype(jnp.float32)   # [D, V]
  u = (jnp.take(w_u, io, axis=1) - jnp.take(w_u, s, axis=1)).T                        # [N, D]
  u = u * scale * params["final_norm"].astype(jnp.float32)
  z = acts["heads"][:, :, -1].astype(jnp.float32)                                   # [L, N, H, hd]
  wo = params["layers"]["wo"].astype(jnp.float32).reshape(cfg.n_layers, cfg.n_heads, cfg.head_dim, -1)
  heads = jnp.einsum("lnhd,lhde,ne->nlh", z, wo, u)
  mlp = jnp.einsum("lne,ne->nl", last(acts["mlp_out"]), u)
  if cfg.o_bias:
    attn_bias = jnp.einsum("le,ne->nl", params["layers"]["bo"].astype(jnp.float32), u)
  else:
    attn_bias = jnp.zeros_like(mlp)
  embed = jnp.einsum("ne,ne->n", last(acts["resid"][0]), u)
  out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last")
  return {"heads": heads, "mlp": mlp, "attn_bias": attn_bias, "embed": embed, "total": logit_diff(out, io, s)}


@functools.partial(jax.jit, static_argnames=("cfg",))
def cross_model_patch(params_a, params_b, cfg: ModelConfig, tokens, mask, heads, io, s, pos_mask=None):
  """CMAP: run model B, cache its per-head z, substitute it into model A at `heads` `[L, H]` (0/1) and at
  `pos_mask` `[N, S]` positions (default all). Both models share the architecture (e.g. before / after
  fine-tuning). Returns `[N]` logit differences of the patched model A."""
  z_b = head_outputs(params_b, cfg, tokens, mask)
  hm = heads.astype(jnp.float32)[:, None, None, :]
  if pos_mask is not None:
    hm = hm * pos_mask.astype(jnp.float32)[None, :, :, None]
  out, _ = forward(params_a, tokens, cfg, attention_mask=mask, logits="last",
                   interventions=Interventions(head_mask=hm, head_value=z_b))
  return logit_diff(out, io, s)



@functools.partial(jax.jit, static_argnames=("cfg",))
def attribution_patch(params, cfg: ModelConfig, tokens, mask, donor_z, io, s, pos_mask=None):
  """Attribution patching: first-order estimate of `patch_each_head` from one forward and one backward pass.

  effect(l, h, n) ~= sum_{s, d} (donor_z - z)[l, n, s, h, d] * d logit_diff_n / d z[l, n, s, h, d]
  (Nanda 2023, "Attribution Patching"; Syed et al. 2023). Cheap enough to screen every head of every phase;
  confirm the top heads with exact `patch_each_head` (the estimate is exact when the metric is linear in z
  and degrades for large, saturating changes).

  Returns:
    `[L, H, N]` estimated patched logit difference (clean + estimated change), comparable with
    `patch_each_head`.
  """
  z = head_outputs(params, cfg, tokens, mask)

  def metric(add):
    out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last",
                     interventions=Interventions(head_add=add))
    ld = logit_diff(out, io, s)
    return jnp.sum(ld), ld

  grad, clean = jax.grad(metric, has_aux=True)(jnp.zeros_like(z))
  delta = (donor_z - z).astype(jnp.float32) * grad.astype(jnp.float32)          # [L, N, S, H, hd]
  if pos_mask is not None:
    delta = delta * pos_mask.astype(jnp.float32)[None, :, :, None, None]
  est = jnp.einsum("lnshd->lhn", delta)
  return clean[None, None, :] + est
