"""The NNX module wraps the pure forward; split/merge round-trips; init_params shapes."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import params as model_params
from models.generate import generate
from models.interventions import resid_add_at
from models.lora import adapt
from models.model import CausalLM
from models.transformer import forward, forward_jit
from tests.reference import ours_from_torch, tiny_hf_model


def test_module_call_equals_pure_forward_and_split_merge_roundtrip():
  params, cfg = ours_from_torch(tiny_hf_model("qwen2"))
  m = CausalLM(cfg, params)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 6)))
  ref, _ = forward(params, toks, cfg)
  out, _ = m(toks)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  graphdef, state = nnx.split(m)
  m2 = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(np.asarray(m2(toks)[0]), np.asarray(ref))
  leaves = jax.tree.leaves(m.pure_params())
  assert len(leaves) == len(jax.tree.leaves(params))
  assert "lm_head" not in m.pure_params()   # qwen2 tiny is tied


def test_jit_over_split_state():
  params, cfg = ours_from_torch(tiny_hf_model("llama"))
  m = CausalLM(cfg, params)
  graphdef, state = nnx.split(m)
  toks = jnp.ones((1, 4), jnp.int32)

  @jax.jit
  def f(state, toks):
    return nnx.merge(graphdef, state)(toks)[0]

  np.testing.assert_allclose(np.asarray(f(state, toks)), np.asarray(m(toks)[0]), atol=1e-6)


def test_random_init_has_layout_shapes():
  _, cfg = ours_from_torch(tiny_hf_model("qwen3"))
  m = CausalLM.random(cfg, seed=1, dtype=jnp.bfloat16)
  shapes = jax.tree.map(lambda x: x.shape, m.pure_params())
  assert shapes == model_params.param_shapes(cfg)
  assert m.pure_params()["layers"]["wq"].dtype == jnp.bfloat16
  # 8B-shaped config: shapes only, nothing allocated
  big = cfg.replace(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                    d_ff=14336, qk_norm=False, arch="llama")
  abstract = jax.eval_shape(lambda k: model_params.init_params(big, k, jnp.bfloat16), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert 8.0e9 < n < 8.1e9   # Llama-3.1-8B has 8.03B parameters


def test_capture_and_generate_equal_the_pure_functions():
  """CausalLM.capture / generate (steered and with a LoRA adapter) give the pure functions' arrays exactly."""
  params, cfg = ours_from_torch(tiny_hf_model("llama"))
  m = CausalLM(cfg, params)
  rng = np.random.default_rng(3)
  toks = jnp.asarray(rng.integers(0, 97, (2, 6)))
  mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  iv = resid_add_at(cfg.n_layers, 1, jnp.asarray(rng.normal(size=cfg.d_model), jnp.float32))
  acts = m.capture(toks, mask, ("resid", "resid_post", "resid_pre"), interventions=iv)
  _, ref = forward_jit(params, toks, cfg, attention_mask=mask, capture=("resid",), interventions=iv, logits="none")
  np.testing.assert_array_equal(np.asarray(acts["resid"]), np.asarray(ref["resid"]))
  np.testing.assert_array_equal(np.asarray(acts["resid_post"]), np.asarray(ref["resid"][1:]))
  np.testing.assert_array_equal(np.asarray(acts["resid_pre"]), np.asarray(ref["resid"][:-1]))
  lora = {"wq": {"a": jnp.asarray(rng.normal(size=(cfg.n_layers, cfg.d_model, 2)), jnp.float32) * 0.1,
                 "b": jnp.asarray(rng.normal(size=(cfg.n_layers, 2, cfg.q_dim)), jnp.float32) * 0.1}}
  new = m.generate(toks, mask, max_new_tokens=4, lora=lora, lora_scale=2.0)
  want = generate(adapt(params, lora, 2.0), cfg, toks, mask, max_new_tokens=4)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(want))
  adapted = m.capture(toks, mask, ("resid_post",), lora=lora, lora_scale=2.0)["resid_post"]
  assert float(jnp.abs(adapted - acts["resid_post"]).max()) > 1e-3     # the adapter (and the steering) act


def test_block_sites_add_up():
  """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out in every block (no interventions)."""
  params, cfg = ours_from_torch(tiny_hf_model("qwen3"))
  toks = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 5)))
  _, a = forward_jit(params, toks, cfg, logits="none",
                     capture=("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"))
  np.testing.assert_allclose(np.asarray(a["resid_mid"]), np.asarray(a["resid_pre"] + a["attn_out"]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(a["resid_post"]), np.asarray(a["resid_mid"] + a["mlp_out"]), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(a["resid_pre"][1:]), np.asarray(a["resid_post"][:-1]))
