"""Attention-pattern evidence for the standard IOI head classes (Wang et al. 2022, Section 3 and Appendix).

- previous-token, duplicate-token and induction scores from random token sequences repeated twice
  (Olsson et al. 2022): for a token at position i in the second copy (sequence length T),
  previous-token = attention to i-1, duplicate-token = attention to i-T (the same token earlier),
  induction = attention to i-T+1 (the token after the earlier occurrence);
- IOI attention at the END position to IO and to S2, and from S2 to S1;
- `classify_heads` combines them with path-patching / direct effects into name movers, negative name movers,
  S-inhibition, induction and duplicate-token heads, by thresholds that are arguments (documented defaults).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.transformer import forward


@functools.partial(jax.jit, static_argnames=("cfg", "seq_len", "batch", "low", "high"))
def repeated_sequence_scores(params, cfg: ModelConfig, key: jax.Array, seq_len: int = 20, batch: int = 8,
                             low: int = 1000, high: int | None = None) -> dict[str, jax.Array]:
  """Previous-token, duplicate-token and induction scores `[L, H]` on random tokens repeated twice.

  Tokens are uniform in [low, high) (default high = vocab size; low skips special tokens). Scores are mean
  attention probabilities over the second copy's positions and the batch, so each lies in [0, 1].
  """
  high = cfg.vocab_size if high is None else high
  low = min(low, high - 1)
  first = jax.random.randint(key, (batch, seq_len), low, high)
  tokens = jnp.concatenate([first, first], axis=1)
  _, acts = forward(params, tokens, cfg, capture=("attn_probs",), logits="none")
  p = acts["attn_probs"]                                          # [L, B, H, 2T, 2T]
  q = jnp.arange(seq_len + 1, 2 * seq_len)                        # second copy, skipping its first token
  take = lambda offs: jnp.mean(p[:, :, :, q, q - offs], axis=(1, 3))   # [L, H]
  return {"prev_token": take(1), "duplicate_token": take(seq_len), "induction": take(seq_len - 1)}


@functools.partial(jax.jit, static_argnames=("cfg",))
def ioi_attention(params, cfg: ModelConfig, tokens, mask, pos_io, pos_s1, pos_s2, pos_end) -> dict[str, jax.Array]:
  """Mean attention `[L, H]` over IOI prompts: END->IO, END->S2, S2->S1 (positions `[N]` int)."""
  _, acts = forward(params, tokens, cfg, attention_mask=mask, capture=("attn_probs",), logits="none")
  p = acts["attn_probs"]                                          # [L, N, H, S, S]
  n = jnp.arange(tokens.shape[0])
  at = lambda qpos, kpos: jnp.mean(p[:, n, :, qpos, kpos], axis=0)     # advanced indices first: [N, L, H]
  return {"end_to_io": at(pos_end, pos_io), "end_to_s2": at(pos_end, pos_s2), "s2_to_s1": at(pos_s2, pos_s1)}


def top_heads(scores: np.ndarray, k: int, min_value: float | None = None) -> list[tuple[int, int]]:
  """The k heads with the largest scores `[L, H]` (optionally only those >= min_value), as (layer, head)."""
  scores = np.asarray(scores)
  order = np.argsort(-scores, axis=None)[:k]
  out = [tuple(int(x) for x in np.unravel_index(i, scores.shape)) for i in order]
  return [lh for lh in out if min_value is None or scores[lh] >= min_value]


def classify_heads(direct_effect: np.ndarray, attn: dict, rep: dict, *, s_inhibition_effect: np.ndarray | None = None,
                   k: int = 3, attn_min: float = 0.2, rep_min: float = 0.3) -> dict[str, list[tuple[int, int]]]:
  """Head classes by the standard criteria.

  Args:
    direct_effect: `[L, H]` drop in logit difference when the head's path to the logits is patched with the
      ABC activation (clean - patched; positive = the head pushes IO over S), e.g. from
      circuits.path_patch_to_logits, or a head's direct logit attribution.
    attn: ioi_attention output; rep: repeated_sequence_scores output (numpy or jax, `[L, H]` each).
    s_inhibition_effect: `[L, H]` drop in logit difference from path patching into the name movers' queries
      (optional; without it S-inhibition is by END->S2 attention alone).
    k: at most k heads per class. attn_min / rep_min: minimum attention score to qualify.

  Returns:
    {"name_mover", "negative_name_mover", "s_inhibition", "induction", "duplicate_token"} -> [(layer, head)].
    Name movers: largest positive direct effect with END->IO attention >= attn_min; negative name movers:
    most negative direct effect with END->IO attention >= attn_min; S-inhibition: largest
    s_inhibition_effect (or END->S2 attention) among heads before the first name mover; induction and
    duplicate-token: largest repeated-sequence scores >= rep_min.
  """
  de = np.asarray(direct_effect)
  to_io = np.asarray(attn["end_to_io"])
  qualified = to_io >= attn_min                  # heads below the END->IO threshold never enter either list
  movers = [lh for lh in top_heads(np.where(qualified, de, -np.inf), k) if qualified[lh] and de[lh] > 0]
  negative = [lh for lh in top_heads(np.where(qualified, -de, -np.inf), k) if qualified[lh] and de[lh] < 0]
  first_mover = min((l for l, _ in movers), default=de.shape[0])
  s_score = np.asarray(s_inhibition_effect if s_inhibition_effect is not None else attn["end_to_s2"], float).copy()
  s_score[first_mover:] = -np.inf
  if s_inhibition_effect is None:
    s_score[s_score < attn_min] = -np.inf
  s_inhib = [lh for lh in top_heads(s_score, k) if np.isfinite(s_score[lh])]
  return {"name_mover": movers, "negative_name_mover": negative, "s_inhibition": s_inhib,
          "induction": top_heads(np.asarray(rep["induction"]), k, rep_min),
          "duplicate_token": top_heads(np.asarray(rep["duplicate_token"]), k, rep_min)}
