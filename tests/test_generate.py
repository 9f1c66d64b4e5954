"""Generation with a KV cache against transformers' generate and against the cache-free forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import transformer as T
from models.generate import generate
from tests.reference import ours_from_torch, tiny_hf_model


def _left_padded(rows, pad=0):
  S = max(len(r) for r in rows)
  toks = np.full((len(rows), S), pad, np.int64)
  mask = np.zeros((len(rows), S), np.int64)
  for i, r in enumerate(rows):
    toks[i, S - len(r):], mask[i, S - len(r):] = r, 1
  return toks, mask


def test_greedy_equals_transformers_generate_on_left_padded_batch():
  model = tiny_hf_model("llama", seed=3)
  params, cfg = ours_from_torch(model)
  rng = np.random.default_rng(0)
  toks, mask = _left_padded([rng.integers(1, 97, n) for n in (6, 3, 8)])
  with torch.no_grad():
    ref = model.generate(torch.tensor(toks), attention_mask=torch.tensor(mask), max_new_tokens=12,
                         do_sample=False, pad_token_id=0, eos_token_id=None).numpy()[:, toks.shape[1]:]
  ours = generate(params, cfg, jnp.asarray(toks), jnp.asarray(mask), max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(ours), ref)


def test_cached_decoding_equals_full_recompute():
  model = tiny_hf_model("qwen2", seed=4)
  params, cfg = ours_from_torch(model)
  prompt = np.random.default_rng(1).integers(1, 97, (2, 5))
  ours = np.asarray(generate(params, cfg, jnp.asarray(prompt), jnp.ones_like(jnp.asarray(prompt)),
                             max_new_tokens=8))
  seq = prompt
  for _ in range(8):
    logits, _ = T.forward_jit(params, jnp.asarray(seq), cfg, logits="last")
    seq = np.concatenate([seq, np.asarray(jnp.argmax(logits, -1))[:, None]], axis=1)
  np.testing.assert_array_equal(ours, seq[:, 5:])


def test_eos_stops_row_and_pads():
  model = tiny_hf_model("llama", seed=3)
  params, cfg = ours_from_torch(model)
  prompt = jnp.asarray(np.random.default_rng(0).integers(1, 97, (1, 6)))
  free = np.asarray(generate(params, cfg, prompt, jnp.ones_like(prompt), max_new_tokens=10))[0]
  eos = int(free[3])
  first = int(np.argmax(free == eos))
  stopped = np.asarray(generate(params, cfg, prompt, jnp.ones_like(prompt), max_new_tokens=10,
                                eos_ids=(eos,), pad_id=96))[0]
  np.testing.assert_array_equal(stopped[:first + 1], free[:first + 1])
  assert np.all(stopped[first + 1:] == 96)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
  model = tiny_hf_model("qwen2", seed=5)
  params, cfg = ours_from_torch(model)
  prompt = jnp.asarray(np.random.default_rng(2).integers(1, 97, (2, 4)))
  mask = jnp.ones_like(prompt)
  a = generate(params, cfg, prompt, mask, max_new_tokens=6, temperature=1.0, key=jax.random.key(1))
  b = generate(params, cfg, prompt, mask, max_new_tokens=6, temperature=1.0, key=jax.random.key(1))
  c = generate(params, cfg, prompt, mask, max_new_tokens=6, temperature=1.0, key=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  nucleus = generate(params, cfg, prompt, mask, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                     key=jax.random.key(3))
  greedy = generate(params, cfg, prompt, mask, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))


def test_steered_generation_matches_hooked_transformers_generate():
  model = tiny_hf_model("llama", seed=6)
  params, cfg = ours_from_torch(model)
  vec = np.random.default_rng(9).normal(size=cfg.d_model).astype(np.float32)
  layer, alpha = 1, 3.0

  def hook(module, args, output):
    if isinstance(output, tuple):
      return (output[0] + alpha * torch.tensor(vec),) + output[1:]
    return output + alpha * torch.tensor(vec)

  prompt = np.random.default_rng(3).integers(1, 97, (1, 5))
  h = model.model.layers[layer].register_forward_hook(hook)
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0,
                         eos_token_id=None).numpy()[:, 5:]
  h.remove()
  add = (alpha * jax.nn.one_hot(layer, cfg.n_layers)[:, None] * vec[None])[:, None, None, :]
  ours = generate(params, cfg, jnp.asarray(prompt), jnp.ones((1, 5), jnp.int32), max_new_tokens=8,
                  interventions=T.Interventions(resid_add=add))
  np.testing.assert_array_equal(np.asarray(ours), ref)


def test_length_batches_are_equal_sized_longest_first_and_cover_every_row():
  from models import tokenizer as tk
  rows = [[1] * n for n in range(1, 101)]                             # 100 rows of lengths 1..100
  got = list(tk.length_batches(rows, 40, 0, 32))
  assert [t.shape for _, t, _ in got] == [(34, 128), (34, 96), (34, 32)]      # 3 x 34 rows, not 3 x 40
  assert sorted(i for idx, _, _ in got for i in idx) == list(range(100))
  assert [len(idx) for idx, _, _ in got] == [34, 34, 32] and got[0][0][0] == 99
  np.testing.assert_array_equal(got[2][2].sum(1)[32:], [1, 1])      # the last batch's fillers copy its last row
  assert [t.shape[0] for _, t, _ in tk.length_batches(rows[:70], 40, 0)] == [35, 35]
  with pytest.raises(ValueError, match="batch must be >= 1"):
    list(tk.length_batches(rows, 0, 0))


def test_generate_answers_keeps_prompt_order_across_length_sorted_batches():
  """train.evaluate.generate_answers batches prompts by length and pads to 32-token buckets; every answer must
  still be the greedy continuation of its own prompt, in the caller's order."""
  from models import tokenizer as tk
  from tests.reference import WordTokenizer
  from train.evaluate import generate_answers

  class ChatTokenizer(WordTokenizer):
    chat_template = "plain"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
      return " ".join(m["content"] for m in messages) + " :"

    def decode(self, ids, skip_special_tokens=True):
      return " ".join(str(i) for i in ids)

  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=5))
  tok = ChatTokenizer()
  prompts = ["a b", "c d e f g h i", "j", "k l m n", "o p q r s t u v w x y z"]
  got = generate_answers(params, cfg, tok, prompts, max_new_tokens=5, batch=2)
  for p, answer in zip(prompts, got):
    ids = tok.encode(tk.chat_prompt(tok, p))
    alone = generate(params, cfg, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32), max_new_tokens=5)
    assert answer == tok.decode(np.asarray(alone)[0].tolist()), p
