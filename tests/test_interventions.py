"""Interventions as arguments: steering, residual/head patching, head ablation, vmapped sweeps.

Each is checked against the same intervention done with a forward hook on the transformers PyTorch model
(the way rho-eval and TransformerLens-style tools do it), or against an exact identity.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from models import transformer as T
from models.lora import adapt
from tests.reference import ours_from_torch, tiny_hf_model

TOL = 1e-4
TOKS = np.random.default_rng(7).integers(0, 97, (2, 9))


def _steer(cfg, layer, vec, alpha):
  onehot = jax.nn.one_hot(layer, cfg.n_layers)
  return T.Interventions(resid_add=(alpha * onehot[:, None] * vec[None, :])[:, None, None, :])


def test_steering_matches_forward_hook_on_decoder_layer():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  vec = np.random.default_rng(0).normal(size=cfg.d_model).astype(np.float32)
  layer, alpha = 1, 4.0

  def hook(module, args, output):   # rho-eval style: add alpha * v to the layer output
    if isinstance(output, tuple):
      return (output[0] + alpha * torch.tensor(vec),) + output[1:]
    return output + alpha * torch.tensor(vec)

  h = model.model.layers[layer].register_forward_hook(hook)
  with torch.no_grad():
    ref = model(torch.tensor(TOKS)).logits.numpy()
  h.remove()
  logits, _ = T.forward_jit(params, jnp.asarray(TOKS), cfg, interventions=_steer(cfg, layer, vec, alpha))
  np.testing.assert_allclose(np.asarray(logits), ref, atol=TOL, rtol=0)
  base, _ = T.forward_jit(params, jnp.asarray(TOKS), cfg)
  assert float(jnp.max(jnp.abs(base - logits))) > 1e-2   # the steering did something


def test_alpha_zero_equals_baseline_exactly():
  model = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(model)
  vec = jnp.ones(cfg.d_model)
  base, bacts = T.forward_jit(params, jnp.asarray(TOKS), cfg, capture=("resid",))
  out, oacts = T.forward_jit(params, jnp.asarray(TOKS), cfg, capture=("resid",),
                             interventions=_steer(cfg, 2, vec, 0.0))
  np.testing.assert_array_equal(np.asarray(base), np.asarray(out))
  np.testing.assert_array_equal(np.asarray(bacts["resid"]), np.asarray(oacts["resid"]))


def test_vmapped_layer_alpha_sweep_equals_loop():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  vecs = jnp.asarray(np.random.default_rng(1).normal(size=(cfg.n_layers, cfg.d_model)).astype(np.float32))
  alphas = jnp.array([-2.0, 0.5, 4.0])
  toks = jnp.asarray(TOKS)

  def run(layer, alpha):
    return T.forward(params, toks, cfg, logits="last", interventions=_steer(cfg, layer, vecs[layer], alpha))[0]

  swept = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))(jnp.arange(cfg.n_layers), alphas)
  assert swept.shape == (cfg.n_layers, 3, 2, cfg.vocab_size)
  for l in range(cfg.n_layers):
    for a in range(3):
      single, _ = T.forward_jit(params, toks, cfg, logits="last",
                                interventions=_steer(cfg, l, vecs[l], alphas[a]))
      np.testing.assert_allclose(np.asarray(swept[l, a]), np.asarray(single), atol=1e-5, rtol=0)


def test_patching_a_head_with_its_own_activation_changes_nothing():
  model = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(model)
  toks = jnp.asarray(TOKS)
  base, acts = T.forward_jit(params, toks, cfg, capture=("heads", "resid"))
  mask = jnp.ones((cfg.n_layers, 1, 1, cfg.n_heads))
  iv = T.Interventions(head_mask=mask, head_value=acts["heads"],
                       resid_mask=jnp.ones((cfg.n_layers, 1, 1)), resid_value=acts["resid"][1:])
  out, _ = T.forward_jit(params, toks, cfg, interventions=iv)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=1e-6, rtol=0)


def test_head_ablation_matches_hook_zeroing_o_proj_input():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  layer, head, hd = 2, 1, cfg.head_dim

  def pre_hook(module, args):
    x = args[0].clone()
    x[..., head * hd:(head + 1) * hd] = 0
    return (x,)

  h = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook)
  with torch.no_grad():
    ref = model(torch.tensor(TOKS)).logits.numpy()
  h.remove()
  scale = jnp.ones((cfg.n_layers, 1, 1, cfg.n_heads)).at[layer, 0, 0, head].set(0.0)
  out, _ = T.forward_jit(params, jnp.asarray(TOKS), cfg, interventions=T.Interventions(head_scale=scale))
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_residual_patch_from_other_run_at_one_position():
  """Patching the residual stream of run A with run B's at layer l, position p equals a hook doing it."""
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  a, b = jnp.asarray(TOKS[:1]), jnp.asarray(TOKS[1:])
  _, bacts = T.forward_jit(params, b, cfg, capture=("resid",))
  layer, pos = 1, 4
  mask = jnp.zeros((cfg.n_layers, 1, a.shape[1])).at[layer, 0, pos].set(1.0)
  out, _ = T.forward_jit(params, a, cfg, interventions=T.Interventions(resid_mask=mask,
                                                                         resid_value=bacts["resid"][1:]))
  donor = torch.tensor(np.asarray(bacts["resid"][layer + 1]))

  def hook(module, args, output):
    hs = (output[0] if isinstance(output, tuple) else output).clone()
    hs[:, pos] = donor[:, pos]
    return (hs,) + output[1:] if isinstance(output, tuple) else hs

  h = model.model.layers[layer].register_forward_hook(hook)
  with torch.no_grad():
    ref = model(torch.tensor(np.asarray(a))).logits.numpy()
  h.remove()
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_bad_intervention_shape_is_a_clear_error():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  import pytest
  with pytest.raises(ValueError, match="resid_add"):
    T.forward(params, jnp.asarray(TOKS), cfg, interventions=T.Interventions(resid_add=jnp.ones((2, 64))))
  with pytest.raises(ValueError, match="capture"):
    T.forward(params, jnp.asarray(TOKS), cfg, capture=("nope",))


def test_lora_zero_b_is_identity_and_lora_equals_merged_weights():
  model = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(model)
  rng = np.random.default_rng(11)
  r, scale = 4, 2.0
  shapes = {"wq": (cfg.d_model, cfg.q_dim), "wv": (cfg.d_model, cfg.kv_dim), "wo": (cfg.q_dim, cfg.d_model),
            "w_down": (cfg.d_ff, cfg.d_model)}
  lora = {k: {"a": jnp.asarray(rng.normal(size=(cfg.n_layers, i, r)).astype(np.float32) * 0.1),
              "b": jnp.asarray(rng.normal(size=(cfg.n_layers, r, o)).astype(np.float32) * 0.1)}
          for k, (i, o) in shapes.items()}
  toks = jnp.asarray(TOKS)
  base, _ = T.forward_jit(params, toks, cfg)
  zero_b = jax.tree.map(lambda x: x, lora)
  for k in zero_b:
    zero_b[k]["b"] = jnp.zeros_like(zero_b[k]["b"])
  same, _ = T.forward_jit(adapt(params, zero_b, scale), toks, cfg)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(base))
  adapted, _ = T.forward_jit(adapt(params, lora, scale), toks, cfg)
  merged = jax.tree.map(lambda x: x, params)
  for k, f in lora.items():
    merged["layers"][k] = params["layers"][k] + scale * jnp.einsum("lir,lro->lio", f["a"], f["b"])
  ref, _ = T.forward_jit(merged, toks, cfg)
  np.testing.assert_allclose(np.asarray(adapted), np.asarray(ref), atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3


def test_query_from_source_matches_hook_on_q_proj():
  """Receiver-side path patching: one head's query computed from another run's residual stream."""
  model = tiny_hf_model("qwen2")
  params, cfg = ours_from_torch(model)
  a, b = jnp.asarray(TOKS[:1]), jnp.asarray(TOKS[1:])
  _, bacts = T.forward_jit(params, b, cfg, capture=("resid",))
  layer, head, hd = 2, 3, cfg.head_dim
  src = bacts["resid"][layer]                              # residual entering layer `layer` in run b
  attn = model.model.layers[layer]
  with torch.no_grad():
    q_src = attn.self_attn.q_proj(attn.input_layernorm(torch.tensor(np.asarray(src))))

  def hook(module, args, output):
    out = output.clone()
    out[..., head * hd:(head + 1) * hd] = q_src[..., head * hd:(head + 1) * hd]
    return out

  h = attn.self_attn.q_proj.register_forward_hook(hook)
  with torch.no_grad():
    ref = model(torch.tensor(np.asarray(a))).logits.numpy()
  h.remove()
  qmask = jnp.zeros((cfg.n_layers, 1, 1, cfg.n_heads)).at[layer, 0, 0, head].set(1.0)
  source = jnp.zeros((cfg.n_layers, 1, a.shape[1], cfg.d_model)).at[layer].set(src)
  out, _ = T.forward_jit(params, a, cfg, interventions=T.Interventions(qkv_source=source, q_from_source=qmask))
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_kv_from_own_residual_is_identity():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  toks = jnp.asarray(TOKS)
  base, acts = T.forward_jit(params, toks, cfg, capture=("resid",))
  iv = T.Interventions(qkv_source=acts["resid"][:-1], kv_from_source=jnp.ones((cfg.n_layers, 1, 1, cfg.n_kv_heads)),
                       q_from_source=jnp.ones((cfg.n_layers, 1, 1, cfg.n_heads)))
  out, _ = T.forward_jit(params, toks, cfg, interventions=iv)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=1e-5, rtol=0)


def test_head_add_matches_hook_adding_to_o_proj_input():
  model = tiny_hf_model("llama")
  params, cfg = ours_from_torch(model)
  add = np.random.default_rng(5).normal(size=(cfg.n_layers, 1, 1, cfg.n_heads, cfg.head_dim)).astype(np.float32)
  hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
      lambda m, a, l=l: (a[0] + torch.tensor(add[l, 0, 0].reshape(-1)),))
      for l, layer in enumerate(model.model.layers)]
  with torch.no_grad():
    ref = model(torch.tensor(TOKS)).logits.numpy()
  for h in hooks:
    h.remove()
  out, _ = T.forward_jit(params, jnp.asarray(TOKS), cfg, interventions=T.Interventions(head_add=jnp.asarray(add)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)
