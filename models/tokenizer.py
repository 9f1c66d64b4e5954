"""Tokenizer helpers: chat-template prompts, left-padded batches, decoding.

Tokenizers come from the model's own files (HF directory or GGUF metadata), never from a hub.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def check_fits(tokenizer, vocab_size: int) -> None:
  """Check that `tokenizer` can be saved beside a model whose embedding has `vocab_size` rows.

  Raises:
    TypeError: the tokenizer has no `save_pretrained` (it is not a transformers tokenizer).
    ValueError: the tokenizer has more tokens than `vocab_size` (its top ids would have no embedding row).
  """
  if not callable(getattr(tokenizer, "save_pretrained", None)):
    raise TypeError(f"tokenizer of type {type(tokenizer).__name__} has no save_pretrained (pass the model's "
                    "transformers tokenizer, e.g. models.loading.load_tokenizer(model))")
  n = len(tokenizer) if hasattr(tokenizer, "__len__") else None
  if n is not None and n > vocab_size:
    raise ValueError(f"the tokenizer has {n} tokens but config field vocab_size is {vocab_size} "
                     f"(ids >= {vocab_size} have no embedding row)")


def save_tokenizer(tokenizer, directory: str) -> None:
  """Write the tokenizer files into `directory` so `AutoTokenizer.from_pretrained(directory)` gives it back.

  `tokenizer.save_pretrained` writes tokenizer.json, tokenizer_config.json (bos / eos / pad / unk tokens) and
  chat_template.jinja; the chat template is also put inside tokenizer_config.json, where transformers < 4.43
  and other loaders look for it.
  """
  tokenizer.save_pretrained(directory)
  template = getattr(tokenizer, "chat_template", None)
  path = os.path.join(directory, TOKENIZER_CONFIG_NAME)
  if not isinstance(template, str) or not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    conf = json.load(f)
  if "chat_template" not in conf:
    conf["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
      json.dump(conf, f, indent=2, ensure_ascii=False)
      f.write("\n")


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


def length_batches(rows: Sequence[Sequence[int]], batch: int, pad: int, multiple: int = 32):
  """Yield (indices, tokens, mask) over token-id rows sorted longest first, in ceil(N / batch) batches of equal
  size, at most `batch` rows each (the last filled with copies of its final row: 100 rows at batch 40 run as
  3 x 34 rows, not 3 x 40), each left-padded by pad_left to a multiple of `multiple`: little padding, and one
  compiled shape per (row count, width) that every call on the same rows shares. `indices` are the positions in
  `rows` of the batch's real rows. Raises ValueError for batch < 1."""
  if batch < 1:
    raise ValueError(f"length_batches: batch must be >= 1, got {batch}")
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  size = -(-len(order) // max(1, -(-len(order) // batch))) if order else batch
  for i in range(0, len(order), size):
    idx = order[i:i + size]
    chunk = [rows[j] for j in idx] + [rows[idx[-1]]] * (size - len(idx))
    toks, mask = pad_left(chunk, pad, multiple)
    yield idx, toks, mask


def decode_generated(tokenizer, new_tokens: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
  """Decode `[B, N]` generated ids, cutting each row at its first EOS."""
  out = []
  for row in np.asarray(new_tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in set(eos_ids)), len(row))
    out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
  return out
