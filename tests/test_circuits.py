"""IOI generator and circuit tools: identities and loops on tiny random models, a fake word tokenizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.ioi import circuits as C
from analysis.ioi.data import BABA_TEMPLATES, make_ioi, split_names
from models import transformer as T
from tests.reference import WordTokenizer, ours_from_torch, tiny_hf_model


def test_generator_puts_io_and_s_where_the_labels_say():
  tok = WordTokenizer()
  d = make_ioi(tok, 60, seed=1)
  for i in range(len(d)):
    assert d.tokens[i, d.pos_io[i]] == d.io[i]
    assert d.tokens[i, d.pos_s1[i]] == d.s[i] == d.tokens[i, d.pos_s2[i]]
    assert d.pos_s1[i] < d.pos_s2[i] < d.pos_end[i] == d.tokens.shape[1] - 1
    assert (d.pos_io[i] < d.pos_s1[i]) == (d.template[i] >= len(BABA_TEMPLATES))   # ABBA: IO first
    assert d.text[i].endswith(" to") or d.text[i].endswith("said to")
    n = d.mask[i].sum()
    assert len(tok.encode(d.abc_text[i])) == n
    names_abc = set(d.abc_tokens[i][d.mask[i] == 1]) - set(d.tokens[i][d.mask[i] == 1])
    assert len(names_abc) == 3                      # three fresh names in the ABC counterpart
    assert d.io[i] not in d.abc_tokens[i] and d.s[i] not in d.abc_tokens[i]
  again = make_ioi(tok, 60, seed=1)
  assert again.text == d.text
  assert make_ioi(tok, 60, seed=2).text != d.text


def test_disjoint_name_split_and_validation():
  train, held = split_names([f"N{i}" for i in range(20)], 0.3, seed=0)
  assert not set(train) & set(held) and len(train) + len(held) == 20
  d = make_ioi(WordTokenizer(), 10, names=held, kind="BABA")
  assert all(any(n in t for n in held) for t in d.text)
  with pytest.raises(ValueError, match="names"):
    make_ioi(WordTokenizer(), 3, names=["A", "B", "C"])
  with pytest.raises(ValueError, match="kind"):
    make_ioi(WordTokenizer(), 3, kind="ABC")


@pytest.fixture(scope="module")
def tiny():
  params, cfg = ours_from_torch(tiny_hf_model("llama_bias", seed=2))
  # sharpen attention (random init gives q.k ~ 0, i.e. uniform attention, where queries barely matter)
  layers = dict(params["layers"], wq=params["layers"]["wq"] * 8, wk=params["layers"]["wk"] * 8)
  params = {**params, "layers": layers}
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(1, 97, (4, 7)))
  corrupt = jnp.asarray(rng.integers(1, 97, (4, 7)))
  mask = jnp.ones((4, 7), jnp.int32).at[1, :2].set(0)
  io, s = jnp.asarray(rng.integers(1, 97, 4)), jnp.asarray(rng.integers(1, 97, 4))
  return params, cfg, toks, corrupt, mask, io, s


def _clean(tiny):
  params, cfg, toks, _, mask, io, s = tiny
  out, _ = T.forward(params, toks, cfg, attention_mask=mask, logits="last")
  return C.logit_diff(out, io, s)


def test_dla_terms_sum_to_the_logit_difference(tiny):
  params, cfg, toks, _, mask, io, s = tiny
  d = C.direct_logit_attribution(params, cfg, toks, mask, io, s)
  parts = d["heads"].sum((1, 2)) + d["mlp"].sum(1) + d["attn_bias"].sum(1) + d["embed"]
  np.testing.assert_allclose(np.asarray(parts), np.asarray(d["total"]), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(d["total"]), np.asarray(_clean(tiny)), atol=1e-5)
  assert float(jnp.abs(d["attn_bias"]).sum()) > 0          # llama_bias has an o_proj bias


def test_patching_each_head_with_its_own_activation_changes_nothing(tiny):
  params, cfg, toks, _, mask, io, s = tiny
  z = C.head_outputs(params, cfg, toks, mask)
  res = C.patch_each_head(params, cfg, toks, mask, z, io, s)
  assert res.shape == (cfg.n_layers, cfg.n_heads, 4)
  np.testing.assert_allclose(np.asarray(res), np.broadcast_to(np.asarray(_clean(tiny)), res.shape), atol=1e-5)


def test_vmapped_patching_equals_per_head_loop(tiny):
  params, cfg, toks, corrupt, mask, io, s = tiny
  z_bad = C.head_outputs(params, cfg, corrupt, mask)
  pos = jnp.zeros((4, 7)).at[:, -1].set(1.0)
  res = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s, pos_mask=pos, chunk=5)
  for l in range(cfg.n_layers):
    for h in range(cfg.n_heads):
      hm = np.zeros((cfg.n_layers, 4, 7, cfg.n_heads), np.float32)
      hm[l, :, -1, h] = 1
      out, _ = T.forward_jit(params, toks, cfg, attention_mask=mask, logits="last",
                             interventions=T.Interventions(head_mask=jnp.asarray(hm), head_value=z_bad))
      np.testing.assert_allclose(np.asarray(res[l, h]), np.asarray(C.logit_diff(out, io, s)), atol=1e-5)
  assert float(jnp.abs(res - _clean(tiny)).max()) > 1e-3


def test_template_means_and_knockout(tiny):
  params, cfg, toks, corrupt, mask, io, s = tiny
  z = C.head_outputs(params, cfg, corrupt, mask)
  template = jnp.array([0, 1, 0, 1])
  zm = C.template_means(z, template, 2)
  np.testing.assert_allclose(np.asarray(zm[:, 0]), np.asarray((z[:, 0] + z[:, 2]) / 2), atol=1e-6)
  np.testing.assert_allclose(np.asarray(zm[:, 3]), np.asarray((z[:, 1] + z[:, 3]) / 2), atol=1e-6)
  none = C.knockout(params, cfg, toks, mask, zm, jnp.zeros((cfg.n_layers, cfg.n_heads)), io, s)
  np.testing.assert_allclose(np.asarray(none), np.asarray(_clean(tiny)), atol=1e-6)
  each = C.knockout_each_head(params, cfg, toks, mask, zm, io, s)
  one = C.knockout(params, cfg, toks, mask, zm, jnp.zeros((cfg.n_layers, cfg.n_heads)).at[1, 2].set(1), io, s)
  np.testing.assert_allclose(np.asarray(each[1, 2]), np.asarray(one), atol=1e-5)


def test_path_patching_identities(tiny):
  params, cfg, toks, corrupt, mask, io, s = tiny
  z = C.head_outputs(params, cfg, toks, mask)
  z_bad = C.head_outputs(params, cfg, corrupt, mask)
  clean = np.asarray(_clean(tiny))
  same = C.path_patch_to_logits(params, cfg, toks, mask, z, z, io, s)
  np.testing.assert_allclose(np.asarray(same), np.broadcast_to(clean, same.shape), atol=1e-5)
  # last-layer senders have no downstream heads to freeze: path patching == activation patching
  to_logits = C.path_patch_to_logits(params, cfg, toks, mask, z, z_bad, io, s)
  act = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s)
  np.testing.assert_allclose(np.asarray(to_logits[-1]), np.asarray(act[-1]), atol=1e-5)
  assert float(np.abs(np.asarray(to_logits[0]) - clean).max()) > 1e-4
  # receivers in layer 1 only: senders in layers >= 1 cannot reach them
  recv = jnp.zeros((cfg.n_layers, cfg.n_heads)).at[1].set(1.0)
  for channel in ("q", "kv"):
    pp = C.path_patch_to_heads(params, cfg, toks, mask, z, z_bad, recv, io, s, channel=channel)
    np.testing.assert_allclose(np.asarray(pp[1:]), np.broadcast_to(clean, pp[1:].shape), atol=1e-5)
    assert float(np.abs(np.asarray(pp[0]) - clean).max()) > 1e-4


def test_cmap_of_a_model_into_itself_is_a_noop_and_all_heads_transfer(tiny):
  params, cfg, toks, _, mask, io, s = tiny
  everything = jnp.ones((cfg.n_layers, cfg.n_heads))
  same = C.cross_model_patch(params, params, cfg, toks, mask, everything, io, s)
  np.testing.assert_allclose(np.asarray(same), np.asarray(_clean(tiny)), atol=1e-5)
  other = jax.tree.map(lambda x: x * 1.05, params)
  patched = C.cross_model_patch(params, other, cfg, toks, mask, everything, io, s)
  assert float(jnp.abs(patched - _clean(tiny)).max()) > 1e-4


def test_attribution_patching_is_the_first_order_term_of_exact_patching(tiny):
  params, cfg, toks, corrupt, mask, io, s = tiny
  z = C.head_outputs(params, cfg, toks, mask)
  clean = np.asarray(_clean(tiny))
  same = C.attribution_patch(params, cfg, toks, mask, z, io, s)
  np.testing.assert_allclose(np.asarray(same), np.broadcast_to(clean, same.shape), atol=1e-6)
  direction = C.head_outputs(params, cfg, corrupt, mask) - z
  for eps in (1e-2, 1e-3):     # the error of a first-order estimate shrinks like eps^2
    donor = z + eps * direction
    exact = np.asarray(C.patch_each_head(params, cfg, toks, mask, donor, io, s)) - clean
    approx = np.asarray(C.attribution_patch(params, cfg, toks, mask, donor, io, s)) - clean
    err = np.abs(exact - approx).max()
    assert err <= 0.05 * np.abs(exact).max() + 1e-6, (eps, err, np.abs(exact).max())


def test_patching_a_subset_of_heads_equals_the_full_sweep_rows(tiny):
  params, cfg, toks, corrupt, mask, io, s = tiny
  z_bad = C.head_outputs(params, cfg, corrupt, mask)
  full = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s)
  sub = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s, heads=(jnp.array([2, 0]), jnp.array([1, 3])))
  np.testing.assert_allclose(np.asarray(sub), np.asarray(full)[[2, 0], [1, 3]], atol=1e-6)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_last_position_patching_equals_full_forward_patching(variant):
  # GQA (4 heads, 2 KV heads), left padding in two rows; qwen2 has q/k/v biases, qwen3 q/k norms
  params, cfg = ours_from_torch(tiny_hf_model(variant, seed=3))
  layers = dict(params["layers"], wq=params["layers"]["wq"] * 8, wk=params["layers"]["wk"] * 8)
  params = {**params, "layers": layers}
  rng = np.random.default_rng(1)
  toks, corrupt = (jnp.asarray(rng.integers(1, 97, (4, 6))) for _ in range(2))
  mask = jnp.ones((4, 6), jnp.int32).at[1, :2].set(0).at[3, :1].set(0)
  io, s = jnp.asarray(rng.integers(1, 97, 4)), jnp.asarray(rng.integers(1, 97, 4))
  z_bad = C.head_outputs(params, cfg, corrupt, mask)
  last_pos = jnp.zeros((4, 6)).at[:, -1].set(1.0)
  full = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s, pos_mask=last_pos)
  fast = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s, method="last", chunk=5)
  assert fast.shape == (cfg.n_layers, cfg.n_heads, 4)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(full), atol=1e-5, rtol=1e-5)
  out, _ = T.forward_jit(params, toks, cfg, attention_mask=mask, logits="last")
  clean = np.asarray(C.logit_diff(out, io, s))
  assert np.abs(np.asarray(full) - clean).max() > 1e-3               # the patch does something
  same = C.patch_each_head(params, cfg, toks, mask, C.head_outputs(params, cfg, toks, mask), io, s,
                           method="last", chunk=5)
  np.testing.assert_allclose(np.asarray(same), np.broadcast_to(clean, same.shape), atol=1e-5, rtol=1e-5)
  sub = C.patch_each_head(params, cfg, toks, mask, z_bad, io, s, method="last",
                          heads=(jnp.array([2, 0, 1]), jnp.array([1, 3, 0])))
  np.testing.assert_allclose(np.asarray(sub), np.asarray(full)[[2, 0, 1], [1, 3, 0]], atol=1e-5, rtol=1e-5)


def test_last_position_patching_rejects_a_position_mask(tiny):
  params, cfg, toks, _, mask, io, s = tiny
  z = C.head_outputs(params, cfg, toks, mask)
  with pytest.raises(ValueError, match="final position"):
    C.patch_each_head(params, cfg, toks, mask, z, io, s, pos_mask=jnp.ones(toks.shape), method="last")
  with pytest.raises(ValueError, match="method"):
    C.patch_each_head(params, cfg, toks, mask, z, io, s, method="mid")
