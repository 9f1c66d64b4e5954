"""Parity of the JAX forward pass with transformers' PyTorch models on tiny random configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import transformer as T
from models.readout import logit_lens
from tests.reference import TINY, ours_from_torch, tiny_hf_model

TOL = 1e-4


def _tokens(seed, b=3, s=11, v=97):
  return np.random.default_rng(seed).integers(0, v, (b, s))


@pytest.mark.parametrize("variant", list(TINY))
def test_logits_and_hidden_states_match_transformers(variant):
  model = tiny_hf_model(variant)
  params, cfg = ours_from_torch(model)
  toks = _tokens(1)
  with torch.no_grad():
    out = model(torch.tensor(toks), output_hidden_states=True)
  ref_logits = out.logits.numpy()
  ref_hs = [h.numpy() for h in out.hidden_states]   # HF: [-1] is after the final norm
  logits, acts = T.forward_jit(params, jnp.asarray(toks), cfg, capture=("resid",))
  resid = np.asarray(acts["resid"])
  assert resid.shape == (cfg.n_layers + 1, 3, 11, cfg.d_model)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=TOL, rtol=0)
  for l in range(cfg.n_layers):
    np.testing.assert_allclose(resid[l], ref_hs[l], atol=TOL, rtol=0, err_msg=f"boundary {l}")
  normed = T.rms_norm(acts["resid"][-1], params["final_norm"], cfg.rms_eps)
  np.testing.assert_allclose(np.asarray(normed), ref_hs[-1], atol=TOL, rtol=0)


def test_last_boundary_matches_last_decoder_layer_output():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  toks = _tokens(2)
  seen = {}
  hook = model.model.layers[-1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
  with torch.no_grad():
    model(torch.tensor(toks))
  hook.remove()
  ref = (seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]).numpy()
  _, acts = T.forward_jit(params, jnp.asarray(toks), cfg, capture=("resid",))
  np.testing.assert_allclose(np.asarray(acts["resid"][-1]), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_left_padded_batch_equals_unpadded_rows(variant):
  model = tiny_hf_model(variant)
  params, cfg = ours_from_torch(model)
  rng = np.random.default_rng(3)
  lengths = [9, 5, 7]
  S = max(lengths)
  rows = [rng.integers(0, 97, n) for n in lengths]
  toks = np.zeros((3, S), np.int64)
  mask = np.zeros((3, S), np.int64)
  for i, r in enumerate(rows):
    toks[i, S - len(r):] = r
    mask[i, S - len(r):] = 1
  logits, acts = T.forward_jit(params, jnp.asarray(toks), cfg, attention_mask=jnp.asarray(mask),
                               capture=("resid", "heads"))
  for i, r in enumerate(rows):
    single, sacts = T.forward_jit(params, jnp.asarray(r[None]), cfg, capture=("resid", "heads"))
    n = len(r)
    np.testing.assert_allclose(np.asarray(logits[i, S - n:]), np.asarray(single[0]), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(acts["resid"][:, i, S - n:]), np.asarray(sacts["resid"][:, 0]),
                               atol=TOL, rtol=0)
    # and the reference agrees on the unpadded row
    with torch.no_grad():
      ref = model(torch.tensor(r[None])).logits.numpy()
    np.testing.assert_allclose(np.asarray(single), ref, atol=TOL, rtol=0)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_head_outputs_match_o_proj_input():
  """Captured per-head z, concatenated, is exactly what o_proj consumes in the reference."""
  model = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(model)
  toks = _tokens(4)
  seen = []
  hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].numpy()))
           for layer in model.model.layers]
  with torch.no_grad():
    model(torch.tensor(toks))
  for h in hooks:
    h.remove()
  _, acts = T.forward_jit(params, jnp.asarray(toks), cfg, capture=("heads", "attn_out", "mlp_out"))
  z = np.asarray(acts["heads"])
  assert z.shape == (cfg.n_layers, 3, 11, cfg.n_heads, cfg.head_dim)
  for l in range(cfg.n_layers):
    np.testing.assert_allclose(z[l].reshape(3, 11, -1), seen[l], atol=TOL, rtol=0)


def test_bfloat16_forward_close_to_fp32():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  toks = jnp.asarray(_tokens(5))
  l32, _ = T.forward_jit(params, toks, cfg)
  l16, _ = T.forward_jit(p16, toks, cfg)
  assert l16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1 * float(jnp.max(jnp.abs(l32)))


def test_attention_probabilities_match_eager_attentions():
  model = tiny_hf_model("qwen2")
  model.config._attn_implementation = "eager"
  params, cfg = ours_from_torch(model)
  toks = _tokens(6)
  with torch.no_grad():
    ref = model(torch.tensor(toks), output_attentions=True).attentions
  _, acts = T.forward_jit(params, jnp.asarray(toks), cfg, capture=("attn_probs",))
  p = np.asarray(acts["attn_probs"])
  assert p.shape == (cfg.n_layers, 3, cfg.n_heads, 11, 11)
  for l in range(cfg.n_layers):
    np.testing.assert_allclose(p[l], ref[l].numpy(), atol=1e-5, rtol=0)


def test_run_layers_from_a_cached_boundary_reproduces_the_forward():
  model = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(model)
  toks = jnp.asarray(_tokens(7))
  mask = jnp.ones_like(toks).at[0, :3].set(0)
  logits, acts = T.forward_jit(params, toks, cfg, attention_mask=mask, capture=("resid",))
  for start in range(cfg.n_layers + 1):
    h = T.run_layers(params, cfg, acts["resid"][start], mask, start)
    np.testing.assert_allclose(np.asarray(h), np.asarray(acts["resid"][-1]), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(T.final_logits(params, cfg, h)), np.asarray(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(TINY))
@pytest.mark.parametrize("chunk", [10, 97, 4096])
def test_chunked_next_token_logprobs_match_transformers_log_softmax(variant, chunk):
  """models.transformer.next_token_logprobs (vocabulary chunks of 10: 9 full and a masked tail of 7 of V = 97; one
  exact chunk; one larger than V) equals torch's log_softmax of transformers' logits at the next tokens."""
  model = tiny_hf_model(variant)
  params, cfg = ours_from_torch(model)
  toks = _tokens(11)
  mask = np.ones_like(toks)
  mask[1, :4] = 0
  with torch.no_grad():
    ref = torch.log_softmax(model(input_ids=torch.as_tensor(toks), attention_mask=torch.as_tensor(mask)).logits,
                            -1)[:, :-1].gather(2, torch.as_tensor(toks)[:, 1:, None])[..., 0].numpy()
  _, acts = T.forward_jit(params, jnp.asarray(toks), cfg, attention_mask=jnp.asarray(mask), capture=("resid",))
  got = np.asarray(T.next_token_logprobs(params, cfg, acts["resid"][-1], jnp.asarray(toks), chunk))
  valid = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
  np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("remat", [False, True, "dots"])
def test_steering_gradients_match_torch_autograd_under_every_remat_policy(remat):
  """d logit / d v for v added at resid_post[l] of each row (the sweep screen's gradients), against torch
  autograd through forward hooks on transformers' decoder layers; remat must not change them."""
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  toks = _tokens(4)
  B, L, D = toks.shape[0], cfg.n_layers, cfg.d_model
  vs = [torch.zeros(B, 1, D, requires_grad=True) for _ in range(L)]
  hooks = [layer.register_forward_hook(lambda m, a, out, v=v: (out[0] + v, *out[1:]) if isinstance(out, tuple)
                                       else out + v) for layer, v in zip(model.model.layers, vs)]
  try:
    model(torch.tensor(toks)).logits[:, -1, 5].sum().backward()
  finally:
    for h in hooks:
      h.remove()
  ref = np.stack([v.grad[:, 0].numpy() for v in vs])                                  # [L, B, D]
  assert np.abs(ref).max() > 1e-3                                                     # a gradient to compare

  def total(add):
    out, _ = T.forward(params, jnp.asarray(toks), cfg, interventions=T.Interventions(resid_add=add),
                       logits="last", remat=remat)
    return out[:, 5].sum()

  g = jax.jit(jax.grad(total))(jnp.zeros((L, B, 1, D), jnp.float32))[:, :, 0]
  np.testing.assert_allclose(np.asarray(g), ref, atol=1e-4, rtol=1e-4)


def test_unknown_remat_value_is_refused():
  params, cfg = ours_from_torch(tiny_hf_model("llama"))
  with pytest.raises(ValueError, match="remat must be one of"):
    T.forward(params, jnp.asarray(_tokens(5)), cfg, remat="everything")


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_logit_lens_matches_transformers_hidden_states(variant):
  """The logit lens at every boundary against transformers: model.norm + lm_head on hidden_states[l] (HF's last
  hidden state is already normed, so boundary L is the model's own logits); left padding included."""
  model = tiny_hf_model(variant)
  params, cfg = ours_from_torch(model)
  toks = _tokens(6, b=2, s=8)
  mask = np.ones_like(toks)
  mask[1, :3] = 0                                                  # row 1: 5 real tokens, left-padded
  targets = np.array([[3, 7], [11, 2]])
  out = logit_lens(params, cfg, jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(targets), top_k=3)
  L = cfg.n_layers
  for b in range(2):
    real = torch.tensor(toks[b:b + 1, mask[b] == 1])
    with torch.no_grad():
      o = model(real, output_hidden_states=True)
      per = [model.lm_head(model.model.norm(o.hidden_states[l][:, -1])) for l in range(L)] + [o.logits[:, -1]]
      ref = torch.log_softmax(torch.cat(per).float(), -1).numpy()                         # [L+1, V]
    np.testing.assert_allclose(np.asarray(out["logprobs"][:, b]), ref[:, targets[b]], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out["top_ids"][:, b, 0]), ref.argmax(-1))


def test_logit_lens_figure_plots_the_mean_over_prompts():
  from analysis.plots import logit_lens_figure  # local: matplotlib, only this test
  lp = np.random.default_rng(0).normal(size=(5, 4, 2))
  fig = logit_lens_figure(lp, ["refuse", "comply"], "t")
  lines = fig.axes[0].get_lines()
  assert [l.get_label() for l in lines] == ["refuse", "comply"]
  np.testing.assert_allclose(lines[1].get_ydata(), lp[:, :, 1].mean(1))
