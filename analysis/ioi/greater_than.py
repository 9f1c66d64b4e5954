"""Greater-Than (Hanna, Liu, Variengien 2023, "How does GPT-2 compute greater-than?").

Prompt: "The war lasted from the year 1732 to the year 17"; the model should continue with a year > 32.
Metric: probability mass on end years greater than the start year YY minus mass on smaller ones;
corrupted prompts use start year "01" (Hanna et al.'s 01-dataset).

GPT-2 writes "32" as one token; Llama-3 / SmolLM2 / Qwen tokenizers write single digits. We therefore score the
two-digit continuation exactly: P(Y1 Y2) = P(Y1 | prompt) * P(Y2 | prompt, Y1) over the digit tokens 0-9,
with one extra batched pass for the 10 possible first digits. Mass on non-digit continuations is ignored, as
Hanna et al. ignore mass outside the year tokens.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.transformer import forward

NOUNS = ("war", "expedition", "siege", "reign", "dynasty", "campaign", "journey", "voyage", "treaty", "plague",
         "project", "trial", "marriage", "rivalry", "pilgrimage", "insurgency", "quest", "tour", "study", "riot")
TEMPLATE = "The {noun} lasted from the year {xx}{yy} to the year {xx}"


@dataclasses.dataclass
class GreaterThanPrompts:
  """tokens / corrupt_tokens / mask `[N, S]` int32 (left-padded), yy `[N]` int32 start year (two digits),
  digit_ids `[10]` int32 token ids of "0".."9", text: the clean prompt strings."""
  tokens: np.ndarray
  corrupt_tokens: np.ndarray
  mask: np.ndarray
  yy: np.ndarray
  digit_ids: np.ndarray
  text: list[str]


def digit_token_ids(tokenizer) -> np.ndarray:
  """Token ids of the digits 0-9. Raises ValueError if a digit is not a single token."""
  ids = []
  for d in "0123456789":
    enc = tokenizer.encode(d, add_special_tokens=False)
    if len(enc) != 1:
      raise ValueError(f"digit {d!r} is not a single token ({enc}); Greater-Than needs digit tokens")
    ids.append(enc[0])
  return np.asarray(ids, np.int32)


def make_greater_than(tokenizer, n: int, *, seed: int = 0, centuries=(11, 12, 13, 14, 15, 16, 17)) -> GreaterThanPrompts:
  """`n` seeded prompts with YY uniform in 02..98 and their "01" corruptions (same noun and century).

  Raises ValueError if the tokenizer does not split the year into single digits after the century, i.e. the
  clean and corrupted prompts tokenize to different lengths.
  """
  rng = np.random.default_rng(seed)
  digits = digit_token_ids(tokenizer)
  rows, bad, yys = [], [], []
  for _ in range(n):
    noun, xx, yy = NOUNS[rng.integers(len(NOUNS))], int(rng.choice(centuries)), int(rng.integers(2, 99))
    rows.append(TEMPLATE.format(noun=noun, xx=xx, yy=f"{yy:02d}"))
    bad.append(TEMPLATE.format(noun=noun, xx=xx, yy="01"))
    yys.append(yy)
  enc = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
  benc = [tokenizer.encode(r, add_special_tokens=False) for r in bad]
  S = max(len(e) for e in enc)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  toks, btoks = np.full((n, S), pad, np.int32), np.full((n, S), pad, np.int32)
  mask = np.zeros((n, S), np.int32)
  for i, (e, b) in enumerate(zip(enc, benc)):
    if len(e) != len(b):
      raise ValueError(f"prompt {i}: {rows[i]!r} and its 01-corruption tokenize to different lengths")
    toks[i, S - len(e):], btoks[i, S - len(b):], mask[i, S - len(e):] = e, b, 1
  return GreaterThanPrompts(toks, btoks, mask, np.asarray(yys, np.int32), digits, rows)


def year_prob_diff(p1: jax.Array, p2: jax.Array, yy: jax.Array) -> jax.Array:
  """sum_{Y > yy} P(Y) - sum_{Y < yy} P(Y) with P(10 a + b) = p1[a] * p2[a, b].

  p1: `[N, 10]` first-digit probabilities; p2: `[N, 10, 10]` second digit given the first; yy: `[N]` int.
  Returns `[N]` float32 (Hanna et al.'s probability difference, over two-digit years).
  """
  years = jnp.arange(100).reshape(10, 10)
  joint = p1[:, :, None] * p2                                          # [N, 10, 10]
  sign = jnp.sign(years[None] - yy[:, None, None])
  return jnp.sum(joint * sign, axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("cfg",))
def prob_diff(params, cfg: ModelConfig, tokens, mask, yy, digit_ids, interventions=None) -> jax.Array:
  """The Greater-Than probability difference `[N]` of a model on prompts ending in the century ("...year 17").

  One pass for P(first digit), one batched pass over the 10 first digits appended for P(second | first).
  `interventions` (models.transformer.Interventions with batch and sequence axes 1, i.e. the same for every
  prompt and position) apply to both passes.
  """
  N, S = tokens.shape
  out, _ = forward(params, tokens, cfg, attention_mask=mask, logits="last", interventions=interventions)
  p1 = jax.nn.softmax(out, -1)[:, digit_ids]                               # [N, 10]
  ext = jnp.concatenate([jnp.repeat(tokens, 10, 0), jnp.tile(digit_ids, N)[:, None]], axis=1)
  ext_mask = jnp.concatenate([jnp.repeat(mask, 10, 0), jnp.ones((N * 10, 1), mask.dtype)], axis=1)
  out2, _ = forward(params, ext, cfg, attention_mask=ext_mask, logits="last", interventions=interventions)
  p2 = jax.nn.softmax(out2, -1)[:, digit_ids].reshape(N, 10, 10)
  return year_prob_diff(p1, p2, yy)
