"""Greater-Than: the two-digit probability difference against brute force, and the generator."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from analysis.ioi.greater_than import make_greater_than, prob_diff, year_prob_diff
from models import transformer as T
from tests.reference import ours_from_torch, tiny_hf_model


class DigitTokenizer:
  """Digits are single tokens, words are ' word' tokens (like Llama-3 / SmolLM2 tokenizers)."""
  pad_token_id = 0

  def __init__(self):
    self.vocab = {"<pad>": 0, **{str(d): d + 1 for d in range(10)}}

  def encode(self, text, add_special_tokens=False):
    return [self.vocab.setdefault(p, len(self.vocab)) for p in re.findall(r"\d|\s?[A-Za-z]+|\s|[^\w\s]", text)]


def test_year_prob_diff_matches_enumeration():
  rng = np.random.default_rng(0)
  p1 = rng.dirichlet(np.ones(10), 3)
  p2 = rng.dirichlet(np.ones(10), (3, 10))
  yy = np.array([32, 2, 98])
  got = np.asarray(year_prob_diff(jnp.asarray(p1), jnp.asarray(p2), jnp.asarray(yy)))
  for n in range(3):
    want = sum(p1[n, y // 10] * p2[n, y // 10, y % 10] * np.sign(y - yy[n]) for y in range(100))
    np.testing.assert_allclose(got[n], want, atol=1e-6)
  # all mass above the start year -> +1
  p1 = np.zeros((1, 10)); p1[0, 9] = 1
  assert np.isclose(float(year_prob_diff(jnp.asarray(p1), jnp.asarray(p2[:1]), jnp.array([50]))[0]), 1.0)


def test_generator_and_corruption():
  tok = DigitTokenizer()
  d = make_greater_than(tok, 12, seed=3)
  for i in range(12):
    row = d.tokens[i][d.mask[i] == 1]
    bad = d.corrupt_tokens[i][d.mask[i] == 1]
    century = d.text[i][-2:]
    assert list(row[-2:]) == [tok.vocab[c] for c in century]            # prompt ends in the century digits
    start = d.text[i].index(" year ") + 6
    start_digits = [tok.vocab[c] for c in d.text[i][start:start + 4]]
    j = len(row) - 10                                     # "...|X|X|Y|Y| to| the| year| |X|X"
    assert list(row[j:j + 4]) == start_digits and int(d.text[i][start + 2:start + 4]) == d.yy[i]
    assert list(bad[j:j + 4]) == start_digits[:2] + [tok.vocab["0"], tok.vocab["1"]]
    assert np.array_equal(np.delete(row, [j + 2, j + 3]), np.delete(bad, [j + 2, j + 3]))
    assert 2 <= d.yy[i] <= 98
  np.testing.assert_array_equal(d.digit_ids, np.arange(1, 11))


def test_prob_diff_equals_per_digit_forward_passes():
  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=4))
  digit_ids = jnp.arange(10, 20)
  toks = jnp.asarray(np.random.default_rng(1).integers(20, 97, (2, 6)))
  mask = jnp.ones_like(toks)
  yy = jnp.array([40, 7])
  got = np.asarray(prob_diff(params, cfg, toks, mask, yy, digit_ids))
  out, _ = T.forward_jit(params, toks, cfg, logits="last")
  p1 = np.asarray(jax.nn.softmax(out, -1))[:, 10:20]
  p2 = np.zeros((2, 10, 10))
  for a in range(10):
    ext = jnp.concatenate([toks, jnp.full((2, 1), 10 + a)], 1)
    o2, _ = T.forward_jit(params, ext, cfg, logits="last")
    p2[:, a] = np.asarray(jax.nn.softmax(o2, -1))[:, 10:20]
  want = [sum(p1[n, y // 10] * p2[n, y // 10, y % 10] * np.sign(y - int(yy[n])) for y in range(100)) for n in range(2)]
  np.testing.assert_allclose(got, want, atol=1e-6)
