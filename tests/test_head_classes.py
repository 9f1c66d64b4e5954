"""Head-class evidence: repeated-sequence scores and IOI attention against direct indexing of the attention
probabilities, and the classification rules on planted scores."""
import jax
import jax.numpy as jnp
import numpy as np

from analysis.ioi.head_classes import classify_heads, ioi_attention, repeated_sequence_scores, top_heads
from models import transformer as T
from tests.reference import ours_from_torch, tiny_hf_model


def test_repeated_sequence_scores_index_the_right_offsets():
  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=1))
  key = jax.random.key(3)
  sc = repeated_sequence_scores(params, cfg, key, seq_len=6, batch=2, low=5)
  first = jax.random.randint(key, (2, 6), 5, cfg.vocab_size)
  toks = jnp.concatenate([first, first], 1)
  _, acts = T.forward_jit(params, toks, cfg, capture=("attn_probs",))
  p = np.asarray(acts["attn_probs"])
  for name, off in (("prev_token", 1), ("duplicate_token", 6), ("induction", 5)):
    want = np.mean([p[:, b, :, i, i - off] for b in range(2) for i in range(7, 12)], axis=0)
    np.testing.assert_allclose(np.asarray(sc[name]), want, atol=1e-6)
    assert np.all((np.asarray(sc[name]) >= 0) & (np.asarray(sc[name]) <= 1))


def test_ioi_attention_indexes_per_prompt_positions():
  params, cfg = ours_from_torch(tiny_hf_model("qwen2", seed=1))
  toks = jnp.asarray(np.random.default_rng(0).integers(1, 97, (3, 8)))
  mask = jnp.ones_like(toks)
  pio, ps1, ps2, pend = (jnp.array(x) for x in ([1, 2, 0], [2, 1, 3], [5, 6, 4], [7, 7, 7]))
  got = ioi_attention(params, cfg, toks, mask, pio, ps1, ps2, pend)
  _, acts = T.forward_jit(params, toks, cfg, attention_mask=mask, capture=("attn_probs",))
  p = np.asarray(acts["attn_probs"])
  want = np.mean([p[:, n, :, 7, int(pio[n])] for n in range(3)], axis=0)
  np.testing.assert_allclose(np.asarray(got["end_to_io"]), want, atol=1e-6)
  want = np.mean([p[:, n, :, int(ps2[n]), int(ps1[n])] for n in range(3)], axis=0)
  np.testing.assert_allclose(np.asarray(got["s2_to_s1"]), want, atol=1e-6)


def test_classify_heads_on_planted_scores():
  L, H = 6, 4
  de = np.zeros((L, H))
  de[5, 1], de[4, 2], de[5, 3], de[3, 0] = 3.0, 2.0, -1.5, 2.5         # (3,0) has no END->IO attention
  attn = {"end_to_io": np.full((L, H), 0.05), "end_to_s2": np.full((L, H), 0.05)}
  attn["end_to_io"][[5, 4, 5], [1, 2, 3]] = 0.6
  attn["end_to_s2"][2, 1], attn["end_to_s2"][5, 0] = 0.5, 0.9       # (5,0) is after the first name mover
  rep = {"induction": np.zeros((L, H)), "duplicate_token": np.zeros((L, H))}
  rep["induction"][1, 3], rep["duplicate_token"][0, 2] = 0.7, 0.4
  got = classify_heads(de, attn, rep)
  assert got["name_mover"] == [(5, 1), (4, 2)]
  assert got["negative_name_mover"] == [(5, 3)]
  assert got["s_inhibition"] == [(2, 1)]
  assert got["induction"] == [(1, 3)] and got["duplicate_token"] == [(0, 2)]
  assert top_heads(de, 2) == [(5, 1), (3, 0)]
  # k larger than the number of qualified heads: (3,0) has a large positive effect but no END->IO attention, so
  # it must not fill the name-mover list (nor a qualified head with the wrong sign the other list)
  got = classify_heads(de, attn, rep, k=L * H)
  assert got["name_mover"] == [(5, 1), (4, 2)]
  assert got["negative_name_mover"] == [(5, 3)]
