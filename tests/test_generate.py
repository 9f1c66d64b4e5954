"""Generation with a KV cache against transformers' generate and against the cache-free forward."""
import jax
import jax.numpy as jnp
import numpy as np
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
