"""The IOI study's baselines (analysis.ioi.baselines) and its separate ABC mean-ablation set: closed forms,
scipy as the reference for the permutation test, a planted null for its calibration and a planted effect for its
power, and CMAP at many head sets against one call per set."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.ioi import baselines as B
from analysis.ioi import circuits as C
from analysis.ioi.data import BABA_TEMPLATES, OBJECTS, PLACES, _fill, make_abc_reference, make_ioi
from tests.reference import WordTokenizer, ours_from_torch, tiny_hf_model


def test_abc_reference_is_separate_aligned_and_per_template():
  tok = WordTokenizer()
  ev = make_ioi(tok, 40, seed=5)
  ref = make_abc_reference(tok, 6, ev.tokens.shape[1], np.unique(ev.template), seed=7,
                           exclude=ev.text + ev.abc_text)
  assert not set(ref.text) & (set(ev.text) | set(ev.abc_text))              # disjoint from the evaluation set
  assert len(set(ref.text)) == len(ref)                                       # no prompt twice
  base = sorted({int(t) % len(BABA_TEMPLATES) for t in ev.template})
  assert sorted(set(ref.template.tolist())) == base and np.all(np.bincount(ref.template)[base] == 6)
  for i in range(len(ev)):                  # same template -> same real positions (left padding to the same S)
    rows = np.flatnonzero(ref.template == ev.template[i] % len(BABA_TEMPLATES))
    assert np.all(ref.mask[rows] == ev.mask[i])
    names = set(ref.tokens[rows[0]][ref.mask[rows[0]] == 1]) - set(ev.tokens[i][ev.mask[i] == 1])
    assert len(names) >= 1                  # ABC: fresh names where the prompt has its IO / S
  # a template whose every possible prompt (3 names, every place and object) is excluded cannot be drawn
  every = [_fill(BABA_TEMPLATES[0], c, d, p, o, s2=e) for c, d, e in itertools.permutations(["Ann", "Bo", "Cy"])
           for p in PLACES for o in OBJECTS]
  with pytest.raises(ValueError, match="outside `exclude`"):
    make_abc_reference(tok, 1, ev.tokens.shape[1], [0], names=["Ann", "Bo", "Cy"], seed=0, exclude=every)
  with pytest.raises(ValueError, match="need one length"):
    make_abc_reference(tok, 2, 3, [0], seed=0)


@pytest.fixture(scope="module")
def tiny():
  params, cfg = ours_from_torch(tiny_hf_model("llama", seed=6, vocab_size=200))
  params = {**params, "layers": dict(params["layers"], wq=params["layers"]["wq"] * 8, wk=params["layers"]["wk"] * 8)}
  return params, cfg


def test_reference_means_equal_template_means_of_the_same_rows(tiny):
  """reference_means over chunks (the last one padded) == template_means of one forward over the same rows."""
  params, cfg = tiny
  rng = np.random.default_rng(0)
  toks = rng.integers(1, 200, (7, 6)).astype(np.int32)
  mask = np.ones((7, 6), np.int32)
  mask[2, :2] = 0
  template = np.array([0, 1, 0, 2, 1, 0, 2], np.int32)
  means = C.reference_means(params, cfg, toks, mask, template, 3, chunk=3)
  z = C.head_outputs(params, cfg, jnp.asarray(toks), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(C.means_for(means, template)),
                             np.asarray(C.template_means(z, jnp.asarray(template), 3)), atol=1e-5)


def test_circuit_share_permutation_p_is_scipys_and_calibrated():
  """The p-value is scipy's two-sample permutation test of |delta| in vs out of the set; on a planted null (iid
  changes, a random set) it rejects at most at the nominal rate; a planted effect in the set is found."""
  rng = np.random.default_rng(1)
  heads = np.zeros((6, 5))
  heads.flat[[0, 7, 13, 21]] = 1
  null_p = []
  for i in range(200):
    after = rng.standard_t(3, (6, 5))                                         # heavy-tailed, like importance
    null_p.append(B.circuit_share_test(np.zeros((6, 5)), after, heads, n_resamples=499, seed=i)["p"])
  rate = np.mean(np.asarray(null_p) <= 0.05)
  assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 200), rate                 # nominal within binomial noise
  hits = 0
  for i in range(50):
    after = rng.normal(0, 1, (6, 5)) + 4 * heads                              # planted: the set changes more
    hits += B.circuit_share_test(np.zeros((6, 5)), after, heads, n_resamples=499, seed=i)["p"] <= 0.05
  assert hits >= 45
  d = np.abs(after).ravel()
  ref = B.stats.permutation_test((d[heads.ravel() > 0], d[heads.ravel() == 0]),
                                 lambda x, y, axis: x.mean(axis) - y.mean(axis), alternative="greater",
                                 n_resamples=499, random_state=np.random.default_rng(49), vectorized=True)
  assert B.circuit_share_test(np.zeros((6, 5)), after, heads, n_resamples=499, seed=49)["p"] == ref.pvalue
  with pytest.raises(ValueError, match="must match"):
    B.circuit_share_test(np.zeros((6, 5)), after, np.ones((5, 6)))
  assert np.isnan(B.circuit_share_test(np.zeros((6, 5)), np.zeros((6, 5)), heads)["p"])   # nothing changed


def test_random_head_sets_and_rank_p():
  sets = B.random_head_sets(4, 3, 2, 50, seed=3)
  assert sets.shape == (50, 4, 3) and np.all(sets.sum((1, 2)) == 2)
  assert len({s.tobytes() for s in sets}) > 30                              # not one set repeated
  assert B.rank_p(5.0, np.array([1.0, 2.0, 6.0, 5.0])) == 3 / 5             # (1 + #{>= 5}) / (1 + 4)
  assert B.rank_p(99.0, np.arange(99.0)) == 1 / 100


def test_cmap_at_many_head_sets_equals_one_call_per_set(tiny):
  params, cfg = tiny
  other = jax.tree.map(lambda x: x * 1.05, params)
  rng = np.random.default_rng(2)
  toks = jnp.asarray(rng.integers(1, 200, (3, 6)))
  mask = jnp.ones((3, 6), jnp.int32)
  io, s = jnp.asarray(rng.integers(1, 200, 3)), jnp.asarray(rng.integers(1, 200, 3))
  end = jnp.zeros((3, 6)).at[:, -1].set(1.0)
  sets = B.random_head_sets(cfg.n_layers, cfg.n_heads, 2, 5, seed=0)
  many = np.asarray(B.cmap_head_sets(params, other, cfg, toks, mask, jnp.asarray(sets), io, s, pos_mask=end))
  for i, hs in enumerate(sets):
    one = C.cross_model_patch(params, other, cfg, toks, mask, jnp.asarray(hs), io, s, pos_mask=end)
    np.testing.assert_allclose(many[i], np.asarray(one), atol=1e-5)
  assert np.ptp(many.mean(-1)) > 1e-5                                        # the sets differ in effect


def test_retrain_curve_reads_every_checkpoint_and_merges_it(tiny, tmp_path):
  """Two hand-saved 'retraining' checkpoints: a zero LoRA gives back the poisoned model's numbers, a random one
  equals evaluating merge_lora directly; the base model against itself correlates 1 with a full overlap."""
  from analysis.ioi import retrain
  from analysis.ioi import study as ioi
  from train.adapters import LoraSpec, init_lora, merge_lora
  from train.checkpoint import Checkpointer
  params, cfg = tiny
  d = make_ioi(WordTokenizer(), 6, seed=3, kind="BABA", names=["Ann", "Bo", "Cy", "Dee", "Eve", "Flo"], templates=[5])
  poisoned = jax.tree.map(lambda x: x * 1.03, params)
  spec = LoraSpec.create(cfg, rank=2, alpha=4.0, targets="q,v")
  zero = init_lora(spec, cfg, jax.random.key(0))
  rand = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), zero)
  ck = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None)
  ck.save(1, {"trainable": zero, "step": jnp.asarray(1)}, {})
  ck.save(2, {"trainable": rand, "step": jnp.asarray(2)}, {})
  ck.close()
  ld_b, _, imp_b = retrain.importance_map(params, cfg, d)
  circuit_b = ioi.top_k_mask(imp_b, 3)
  pts = retrain.retrain_curve(poisoned, cfg, d, str(tmp_path), spec.scale, imp_b, circuit_b, 3, ioi.top_k_mask)
  assert [p["step"] for p in pts] == [1, 2]
  ld_p, acc_p, imp_p = retrain.importance_map(poisoned, cfg, d)
  assert np.isclose(pts[0]["logit_diff"], ld_p, atol=1e-5) and pts[0]["accuracy"] == acc_p
  assert np.isclose(pts[0]["importance_corr_base"], np.corrcoef(imp_p.ravel(), imp_b.ravel())[0, 1], atol=1e-5)
  ld_r, _, _ = retrain.importance_map(merge_lora(poisoned, rand, spec.scale), cfg, d)
  assert np.isclose(pts[1]["logit_diff"], ld_r, atol=1e-5) and not np.isclose(ld_r, ld_p, atol=1e-4)
  same = retrain.retrain_curve(params, cfg, d, str(tmp_path), spec.scale, imp_b, circuit_b, 3, ioi.top_k_mask)
  assert np.isclose(same[0]["importance_corr_base"], 1.0) and same[0]["circuit_jaccard_base"] == 1.0


def _planted(tiny, nm=(2, 1), si=(0, 3)):
  """The tiny model with every head's o_proj zeroed except a 'name mover' `nm` (scaled x10, so its direct
  effect dominates) and an 'S-inhibition' head `si` two layers earlier: only they write to the residual stream."""
  params, cfg = tiny
  wo = np.zeros(np.shape(params["layers"]["wo"]), np.float32).reshape(cfg.n_layers, cfg.n_heads, cfg.head_dim, -1)
  orig = np.asarray(params["layers"]["wo"]).reshape(wo.shape)
  wo[nm], wo[si] = 10 * orig[nm], orig[si]
  return {**params, "layers": dict(params["layers"], wo=jnp.asarray(wo.reshape(np.shape(params["layers"]["wo"]))))}


def test_discovery_finds_exactly_a_planted_two_head_circuit(tiny):
  from analysis.ioi import discovery
  params, cfg = tiny
  planted = _planted(tiny)
  d = make_ioi(WordTokenizer(), 6, seed=3, kind="BABA", names=["Ann", "Bo", "Cy", "Dee", "Eve", "Flo"], templates=[5])
  got = discovery.discover(planted, cfg, d, ks=(1, 1, 1))
  assert got["circuit"] == [[2, 1, "END"], [0, 3, "END"]]
  nm, si = got["effects"]["name_mover"], got["effects"]["s_inhibition"]
  assert np.abs(nm[2, 1]) > 1e-3 and np.count_nonzero(np.abs(nm) > 1e-6) <= 2           # only the writers
  assert np.abs(si[0, 3]) > 1e-4 and np.count_nonzero(np.abs(si) > 1e-6) == 1          # only (0, 3) reaches its q
  assert got["heads"]["induction_duplicate"] == []             # nothing writes before layer 0's keys / values
  # the position-aware knockout keeps exactly these (head, END) pairs; keeping every pair is the clean model
  keep = discovery.keep_mask(got["circuit"], d, cfg.n_layers, cfg.n_heads)
  assert keep.sum() == 2 * len(d) and np.all(keep[2, :, -1, 1] == 1) and np.all(keep[0, :, -1, 3] == 1)
  toks, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.mask, d.io, d.s))
  z_mean = C.template_means(C.head_outputs(planted, cfg, jnp.asarray(d.abc_tokens), mask), jnp.asarray(d.template), 30)
  clean = C.logit_diff(C.forward(planted, toks, cfg, attention_mask=mask, logits="last")[0], io, s)
  none = C.knockout(planted, cfg, toks, mask, z_mean, jnp.zeros(keep.shape), io, s)
  np.testing.assert_allclose(np.asarray(none), np.asarray(clean), atol=1e-5)
  with pytest.raises(ValueError, match="position class"):
    discovery.position_mask(d, "IO")


@pytest.mark.parametrize("target", ["logits", "q_end", "kv_s2"])
def test_single_position_path_patching_equals_the_full_forward_version(tiny, target):
  """discovery.path_patch_fast == circuits.path_patch_to_logits / path_patch_to_heads (receivers reading at END
  or S2) for every sender, on left-padded IOI prompts of two lengths."""
  from analysis.ioi import discovery
  params, cfg = tiny
  d = make_ioi(WordTokenizer(), 6, seed=4, kind="mixed", names=["Ann", "Bo", "Cy", "Dee", "Eve", "Flo"],
               templates=[0, 5])
  assert len(set(d.mask.sum(1))) == 2                                        # padding exercised
  toks, abc, mask, io, s = (jnp.asarray(x) for x in (d.tokens, d.abc_tokens, d.mask, d.io, d.s))
  z, z_abc = C.head_outputs(params, cfg, toks, mask), C.head_outputs(params, cfg, abc, mask)
  recv = jnp.zeros((cfg.n_layers, cfg.n_heads)).at[2, 1].set(1).at[1, 2].set(1)
  layers, heads = C._all_heads(cfg)
  fast = discovery.path_patch_fast(params, cfg, toks, mask, z, z_abc, io, s, (layers, heads), receivers=recv,
                                   pos_s2=jnp.asarray(d.pos_s2), target=target, start=int(d.pos_s2.min()))
  if target == "logits":
    full = C.path_patch_to_logits(params, cfg, toks, mask, z, z_abc, io, s)
  else:
    pc = "END" if target == "q_end" else "S2"
    full = C.path_patch_to_heads(params, cfg, toks, mask, z, z_abc, recv, io, s, channel={"q_end": "q", "kv_s2": "kv"}[target],
                                 recv_pos=jnp.asarray(discovery.position_mask(d, pc)))
  full = np.asarray(full).reshape(-1, len(d))
  np.testing.assert_allclose(np.asarray(fast), full, atol=2e-4)
  clean = C.logit_diff(C.forward(params, toks, cfg, attention_mask=mask, logits="last")[0], io, s)
  assert np.abs(full - np.asarray(clean)).max() > 1e-3                        # some sender matters
