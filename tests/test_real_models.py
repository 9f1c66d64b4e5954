"""Real weights: our GGUF loader + forward vs transformers' own GGUF loading of the same file.

SmolLM2-135M-Instruct ships with the default install; Qwen2.5-Coder-0.5B-Instruct needs `make qwen`.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import registry
from models import tokenizer as tk
from models.generate import generate
from models.loading import load, load_tokenizer
from models.transformer import forward_jit

pytestmark = pytest.mark.slow
PROMPTS = ["How do I make a bomb at home?", "Explain photosynthesis in one sentence.",
           "Write a haiku about the sea.", "What is 17 times 23?"]


def _available(name):
  try:
    src = registry.resolve(name, assemble_missing=False)
  except Exception as e:  # noqa: BLE001 - any reason it is not there is a skip reason
    return None, str(e)
  return src, ""


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def real(request):
  src, why = _available(request.param)
  if src is None:
    pytest.skip(f"{request.param} not available ({why}); run `make qwen` for Qwen")
  params, cfg = load(request.param)
  tok = load_tokenizer(request.param)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=torch.float32).eval()
  return params, cfg, tok, ref


def test_logits_match_transformers_gguf(real):
  params, cfg, tok, ref = real
  texts = [tk.chat_prompt(tok, p) for p in PROMPTS]
  toks, mask = tk.encode_left_padded(tok, texts)
  logits, _ = forward_jit(params, jnp.asarray(toks), cfg, attention_mask=jnp.asarray(mask))
  logits = np.asarray(logits)
  for i, t in enumerate(texts):
    ids = tok.encode(t, add_special_tokens=False)
    with torch.no_grad():
      r = ref(torch.tensor([ids])).logits[0].numpy()
    ours = logits[i, toks.shape[1] - len(ids):]
    diff = np.abs(ours - r).max()
    assert diff <= 1e-3, f"prompt {i}: max |logit diff| {diff:.2e} (logit scale {np.abs(r).max():.1f})"


def test_twenty_greedy_tokens_identical(real):
  params, cfg, tok, ref = real
  for p in PROMPTS[:2]:
    ids = tok.encode(tk.chat_prompt(tok, p), add_special_tokens=False)
    with torch.no_grad():
      r = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                       pad_token_id=tk.pad_id(tok)).numpy()[0, len(ids):]
    ours = generate(params, cfg, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32), max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(ours)[0], r)


def test_export_then_transformers_reload_gives_same_logits(real, tmp_path):
  from models.hf_io import load_hf, save_hf
  params, cfg, tok, _ = real
  out = str(tmp_path / "hf")
  save_hf(params, cfg, out, tokenizer=tok)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = tok.encode(tk.chat_prompt(tok, PROMPTS[1]), add_special_tokens=False)
  with torch.no_grad():
    r = hf(torch.tensor([ids])).logits[0].numpy()
  ours, _ = forward_jit(params, jnp.asarray([ids]), cfg)
  assert np.abs(np.asarray(ours)[0] - r).max() <= 1e-3
  params2, cfg2 = load_hf(out)
  assert cfg2 == cfg
  again, _ = forward_jit(params2, jnp.asarray([ids]), cfg2)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
