"""Tokenizer helpers: chat-template prompts, left-padded batches, decoding.

Tokenizers come from the model's own files (HF directory or GGUF metadata), never from a hub.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pad_id(tokenizer) -> int:
  """The padding id: the tokenizer's pad token, else its EOS token, else 0."""
  for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if tid is not None:
      return int(tid)
  return 0


def eos_ids(tokenizer, cfg) -> tuple[int, ...]:
  """Sorted stop ids for generation: the model config's EOS ids plus the tokenizer's EOS token."""
  ids = set(cfg.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
  """The model's chat template applied to one user turn, ending with the assistant generation prompt.

  Raises ValueError if the tokenizer has no chat template.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("tokenizer has no chat template; pass raw prompts instead")
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_left_padded(tokenizer, texts: Sequence[str], max_len: int | None = None,
                       add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Tokenize and left-pad a batch.

  Returns:
    tokens `[B, S]` int32 and attention mask `[B, S]` int32 (1 = real token), S = longest row (or max_len;
    longer rows keep their last max_len tokens).
  """
  rows = [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
  if max_len is not None:
    rows = [r[-max_len:] for r in rows]
  return pad_left(rows, pad_id(tokenizer))


def pad_left(rows: Sequence[Sequence[int]], pad: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token-id rows to S = the longest row rounded up to a multiple of `multiple` (a few shapes, so a
  jitted consumer compiles a few times instead of once per batch length). Returns tokens / mask `[B, S]` int32."""
  S = -(-max(len(r) for r in rows) // multiple) * multiple
  toks = np.full((len(rows), S), pad, np.int32)
  mask = np.zeros((len(rows), S), np.int32)
  for i, r in enumerate(rows):
    toks[i, S - len(r):] = r
    mask[i, S - len(r):] = 1
  return toks, mask


def decode_generated(tokenizer, new_tokens: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
  """Decode `[B, N]` generated ids, cutting each row at its first EOS."""
  out = []
  for row in np.asarray(new_tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in set(eos_ids)), len(row))
    out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
  return out
