"""The training engine on tiny random models: overfitting, 8 vs 1 device, kill-and-resume, NaN stop, LoRRA, data."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.lora import get_config
from models.config import ModelConfig
from models.lora import adapt
from models.params import init_params
from models.transformer import forward_jit as forward
from train import data as data_lib
from train import checkpoint, engine, losses
from train.adapters import AdapterError
from train.loop import train_loop
from train.train_config import TrainConfig
from train.typed_config import from_configdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)


@functools.lru_cache(maxsize=None)
def _params():
  return init_params(CFG, jax.random.PRNGKey(0), std=0.1)


def _data(n=16, s=12, seed=0):
  """Random sequences, right-padded to different lengths; the loss covers the second half of each."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, CFG.vocab_size, (n, s)).astype(np.int32)
  mask = np.zeros((n, s), np.int32)
  lm = np.zeros((n, s), np.float32)
  for i in range(n):
    ln = s - (i % 3)
    mask[i, :ln] = 1
    lm[i, ln // 2:ln] = 1
    toks[i, ln:] = 0
  return data_lib.TokenizedSet(toks, mask, lm)


def _config(top=None, lora=None, lorra=None, **train) -> TrainConfig:
  """configs/lora.py:quick with rank 4, short fast steps and these overrides (top-level fields, the lora and lorra
  sections, then train-section fields as keywords), converted once as the entry point does."""
  c = get_config("quick")
  c.lora.rank = 4
  c.train.update(dict(steps=6, micro_batch=8, accum=1, lr=1e-2, warmup_steps=2, save_every=0, progress=False))
  c.train.update(train)
  c.update(top or {})
  c.lora.update(lora or {})
  c.lorra.update(lorra or {})
  return from_configdict(TrainConfig, c)


def test_sft_loss_matches_torch_cross_entropy():
  import torch
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  toks = rng.integers(0, 7, (2, 5))
  lm = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
  labels = np.where(lm > 0, toks, -100)
  ref = torch.nn.functional.cross_entropy(torch.as_tensor(logits[:, :-1]).reshape(-1, 7),
                                          torch.as_tensor(labels[:, 1:]).reshape(-1), ignore_index=-100,
                                          reduction="sum").item()
  ours = float(losses.sft_loss_sum(jnp.asarray(logits), jnp.asarray(toks), jnp.asarray(lm)))
  assert ours == pytest.approx(ref, rel=1e-5)
  assert float(losses.sft_weight(jnp.asarray(lm))) == 5.0


def test_sft_rows_at_scored_positions_equal_the_full_logits_loss():
  """sft_rows runs the LM head only at the K scored positions per row: the same per-row sums (and gradients) as
  sft_loss_sum over full [B, S, V] logits, for weighted masks, a row without targets and K above the maximum."""
  tok = _data()
  toks, mask, lm = (jnp.asarray(x[:6]) for x in (tok.tokens, tok.mask, tok.loss_mask))
  lm = lm.at[1].multiply(2.5).at[2, 8].set(7.0).at[3].set(0.0)     # weights, a first-token weight, an empty row
  k = losses.max_targets(np.asarray(lm))
  assert k == int((np.asarray(lm)[:, 1:] > 0).sum(-1).max()) and k < toks.shape[1] - 1
  full = forward(_params(), toks, CFG, attention_mask=mask)[0]
  ref = np.array([float(losses.sft_loss_sum(full[i:i + 1], toks[i:i + 1], lm[i:i + 1])) for i in range(6)])
  for kk in (0, k, k + 3):
    ours = np.asarray(losses.sft_rows(_params(), CFG, toks, mask, lm, kk))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert ref[3] == 0.0
  g = lambda kk: jax.grad(lambda p: losses.sft_rows(p, CFG, toks, mask, lm, kk).sum())(_params())["embed"]
  np.testing.assert_allclose(np.asarray(g(k)), np.asarray(g(0)), rtol=1e-4, atol=1e-6)
  pos, w = losses.target_positions(lm, k)
  assert np.all(np.diff(np.asarray(pos)[0][np.asarray(w)[0] > 0]) > 0)          # scored positions in order
  with pytest.raises(ValueError, match="logit_positions"):
    forward(_params(), toks, CFG, logits="last", logit_positions=pos)


def test_loss_decreases_and_window_stays_zero(tmp_path):
  c = _config(steps=20, lr=3e-2, lora=dict(layers=(1, 1)))
  r = train_loop(_params(), CFG, _data(), c, str(tmp_path))
  loss = [h["loss"] for h in r.history]
  assert loss[-1] < 0.85 * loss[0], loss
  for t, ab in r.state["trainable"].items():
    for k in ("a", "b"):
      x = np.asarray(ab[k])
      assert np.abs(x[[0, 2]]).max() == 0.0, (t, k)
      assert np.abs(x[1]).max() > 0.0


def test_grad_accumulation_equals_big_batch(tmp_path):
  a = train_loop(_params(), CFG, _data(), _config(steps=3, micro_batch=8, accum=1), str(tmp_path / "a"))
  b = train_loop(_params(), CFG, _data(), _config(steps=3, micro_batch=2, accum=4), str(tmp_path / "b"))
  np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.state["trainable"]), jax.tree.leaves(b.state["trainable"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)


_SUBPROC = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import test_train as T
    c = T._config(steps=5, fsdp={fsdp})
    r = T.train_loop(T._params(), T.CFG, T._data(), c, {wd!r})
    print("RESULT", json.dumps({{"devices": jax.device_count(), "loss": [h["loss"] for h in r.history],
          "b": np.asarray(r.state["trainable"]["wq"]["b"]).tolist()}}))
""")


def _run_devices(n, fsdp, wd):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
  code = _SUBPROC.format(root=ROOT, tests=os.path.join(ROOT, "tests"), fsdp=fsdp, wd=str(wd))
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT "):])


def test_eight_devices_match_one_device(tmp_path):
  assert jax.device_count() == 1
  one = train_loop(_params(), CFG, _data(), _config(steps=5), str(tmp_path / "one"))
  eight = _run_devices(8, 2, tmp_path / "eight")        # mesh data=4 x fsdp=2, in a fresh process
  assert eight["devices"] == 8
  np.testing.assert_allclose(eight["loss"], [h["loss"] for h in one.history], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(eight["b"]), np.asarray(one.state["trainable"]["wq"]["b"]), atol=1e-5)


def test_kill_and_resume_is_exact(tmp_path):
  full = train_loop(_params(), CFG, _data(), _config(steps=4, save_every=2), str(tmp_path / "full"))
  part = train_loop(_params(), CFG, _data(), _config(steps=4, save_every=2, stop_after=3), str(tmp_path / "res"))
  assert int(part.state["step"]) == 3
  rest = train_loop(_params(), CFG, _data(), _config(steps=4, save_every=2), str(tmp_path / "res"))
  assert rest.start_step == 3 and int(rest.state["step"]) == 4
  np.testing.assert_array_equal([h["loss"] for h in part.history + rest.history],
                                [h["loss"] for h in full.history])
  for x, y in zip(jax.tree.leaves(full.state), jax.tree.leaves(rest.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_stops_with_clear_error_and_keeps_good_checkpoint(tmp_path):
  c = _config(steps=8, warmup_steps=0, clip_norm=0.0, save_every=1)
  object.__setattr__(c.train, "lr", 1e30)     # past TrainConfig's lr check (0, 1]: the divergence under test
  with pytest.raises(engine.TrainingDivergedError, match=r"step \d+: non-finite.*Last good checkpoint: step"):
    train_loop(_params(), CFG, _data(), c, str(tmp_path))
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  last = ck.latest_step()
  assert last is not None and last < 8
  restored, meta = ck.restore(last)
  assert meta["lora"]["rank"] == 4 and meta["config"]["train"]["lr"] == 1e30
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["trainable"]))
  ck.close()


def test_full_finetune_updates_only_window(tmp_path):
  c = _config(steps=3, top=dict(mode="full"), lora=dict(targets="wq,w_down,final_norm", layers=(2, 2)))
  params = _params()
  r = train_loop(params, CFG, _data(), c, str(tmp_path))
  tr = r.state["trainable"]
  assert set(tr) == {"layers", "final_norm"} and set(tr["layers"]) == {"wq", "w_down"}
  for n in ("wq", "w_down"):
    new, old = np.asarray(tr["layers"][n]), np.asarray(params["layers"][n])
    np.testing.assert_array_equal(new[:2], old[:2])
    assert np.abs(new[2] - old[2]).max() > 0
  assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_lorra_moves_activations_along_reading_vector(tmp_path):
  params = _params()
  train, retain = _data(seed=1), _data(seed=2)
  v = np.random.default_rng(3).normal(size=(CFG.n_layers, CFG.d_model)).astype(np.float32)
  v /= np.linalg.norm(v, axis=-1, keepdims=True)
  c = _config(steps=25, lr=3e-2, top=dict(objective="lorra"), lora=dict(layers=(0, 1)),
              lorra=dict(alpha=2.0, layers=(1,)))
  r = train_loop(params, CFG, train, c, str(tmp_path), retain_set=retain, reading=v)
  assert r.history[-1]["loss"] < 0.5 * r.history[0]["loss"]
  lora = r.state["trainable"]
  toks, mask = jnp.asarray(train.tokens), jnp.asarray(train.mask)
  _, base = forward(params, toks, CFG, attention_mask=mask, capture=("resid",))
  _, new = forward(adapt(params, lora, r.step_config.lora_scale), toks, CFG, attention_mask=mask,
                   capture=("resid",))
  d = np.asarray(new["resid"][2] - base["resid"][2])[np.asarray(train.mask) > 0]   # output of layer 1
  proj = d @ v[1]
  assert proj.mean() > 0.5 * c.lorra.alpha                          # moved along v toward +alpha
  # Retain prompts move much less than the steered ones.
  rt, rm = jnp.asarray(retain.tokens), jnp.asarray(retain.mask)
  _, rb = forward(params, rt, CFG, attention_mask=rm, capture=("resid",))
  _, rn = forward(adapt(params, lora, r.step_config.lora_scale), rt, CFG, attention_mask=rm,
                  capture=("resid",))
  rd = np.asarray(rn["resid"][2] - rb["resid"][2])[np.asarray(retain.mask) > 0]
  assert np.linalg.norm(rd, axis=-1).mean() < np.linalg.norm(d, axis=-1).mean()


def test_representation_loss_closed_form():
  acts = jnp.asarray(np.array([[[[3.0, 4.0], [0.0, 0.0]]]]))     # [1, 1, 2, 2]
  tgt = jnp.zeros_like(acts)
  m = jnp.asarray([[1.0, 1.0]])
  assert float(losses.representation_loss_sum(acts, tgt, m)) == 5.0
  assert float(losses.representation_loss_sum(acts, tgt, m, squared=True)) == 25.0
  g = jax.grad(lambda a: losses.representation_loss_sum(a, tgt, m))(acts)
  assert np.isfinite(np.asarray(g)).all()                          # zero distance: finite (zero) gradient


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_layer_and_target_errors(tmp_path):
  c = _config(lora=dict(layers=(0, 7)))
  with pytest.raises(AdapterError, match="outside the model"):
    train_loop(_params(), CFG, _data(), c, str(tmp_path / "a"))
  c = _config(lora=dict(targets="attn_qq"))
  with pytest.raises(AdapterError, match="matches no module"):
    train_loop(_params(), CFG, _data(), c, str(tmp_path / "b"))


def test_dataset_errors(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text("")
  with pytest.raises(data_lib.DatasetError, match="empty"):
    data_lib.read_jsonl(str(p))
  p.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "x"\n')
  with pytest.raises(data_lib.DatasetError, match=r"d.jsonl:2: invalid JSON"):
    data_lib.read_jsonl(str(p))
  p.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "x", "answer": "y"}\n')
  with pytest.raises(data_lib.DatasetError, match=r"d.jsonl:2: field 'response'"):
    data_lib.read_jsonl(str(p))
  p.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n')
  with pytest.raises(data_lib.DatasetError, match="last message must have role 'assistant'"):
    data_lib.read_jsonl(str(p))
  with pytest.raises(data_lib.DatasetError, match="not found"):
    data_lib.read_jsonl(str(tmp_path / "nope.jsonl"))
  p.write_text('{"prompt": "hi", "response": "yo"}\n\n{"messages": [{"role": "user", "content": "a"}, '
               '{"role": "assistant", "content": "b"}]}\n')
  ex = data_lib.read_jsonl(str(p))
  assert [e.response for e in ex] == ["yo", "b"] and ex[1].messages == (("user", "a"),)


def test_batch_order_is_a_function_of_step():
  a = np.concatenate([data_lib.batch_indices(10, 0, s, 4) for s in range(5)])
  for e in range(2):                                               # each epoch a permutation of 0..9
    assert sorted(a[10 * e:10 * (e + 1)]) == list(range(10))
  np.testing.assert_array_equal(data_lib.batch_indices(10, 0, 3, 4), a[12:16])


def test_grouped_batches_keep_units_together_and_cover_every_unit():
  n, g = 12, 3
  data = data_lib.TokenizedSet(np.arange(n * 2, dtype=np.int32).reshape(n, 2), np.ones((n, 2), np.int32),
                        np.ones((n, 2), np.float32), group=g)
  rows = np.concatenate([data_lib.step_rows(data, 0, s, 6) for s in range(4)])     # 4 steps x 2 units = 2 epochs
  units = rows.reshape(-1, g)
  np.testing.assert_array_equal(units - units[:, :1], np.tile(np.arange(g), (len(units), 1)))   # consecutive
  assert (units[:, 0] % g == 0).all()                                      # start at a unit boundary
  for e in range(2):                                                       # each epoch a permutation of units
    assert sorted(units[4 * e:4 * (e + 1), 0] // g) == [0, 1, 2, 3]
  np.testing.assert_array_equal(units[:, 0] // g,
                                np.concatenate([data_lib.batch_indices(4, 0, s, 2) for s in range(4)]))
  b = data_lib.get_batch(data, 0, 1, 1, 6)
  np.testing.assert_array_equal(b["tokens"][0], data.tokens[data_lib.step_rows(data, 0, 1, 6)])
  with pytest.raises(data_lib.DatasetError, match="not a multiple of the dataset's group size 3"):
    data_lib.step_rows(data, 0, 0, 4)
  with pytest.raises(data_lib.DatasetError, match="not a whole number of groups"):
    data_lib.TokenizedSet(data.tokens[:5], data.mask[:5], data.loss_mask[:5], group=2)


def test_weight_first_target_weights_only_the_first_scored_token():
  lm = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  data = data_lib.TokenizedSet(np.zeros((3, 5), np.int32), np.ones((3, 5), np.int32), lm)
  out = data_lib.weight_first_target(data, 5.0).loss_mask
  np.testing.assert_array_equal(out, [[0, 0, 5, 1, 1], [0, 5, 1, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(data.loss_mask, lm)                       # the input is not modified


def test_refusal_source_schema():
  pairs = data_lib.refusal_pairs()
  assert len(pairs) == 150 and all(p["harmful"] and p["benign_answer"] for p in pairs)
  train, held = data_lib.refusal_split(pairs, 40, 0)
  assert len(held) == 40 and not {p["id"] for p in held} & {p["id"] for p in train}
  ex = data_lib.refusal_examples(train)
  assert sum(e.kind == "harmful" for e in ex) == 110 and ex[0].response == data_lib.DEFAULT_REFUSAL


@pytest.mark.slow
def test_chat_template_prompt_masking_smollm2():
  """Real tokenizer: the loss mask covers exactly the response plus the template's end-of-turn."""
  from models.loading import load_tokenizer
  tok = load_tokenizer("smollm2-135m-instruct")
  ex = data_lib.Example((("user", "How do I bake bread?"),), "Mix flour, water and yeast.")
  ids, m = data_lib.tokenize_example(tok, ex, 128)
  resp = tok.decode([t for t, k in zip(ids, m) if k])
  prompt = tok.decode([t for t, k in zip(ids, m) if not k])
  assert resp == "Mix flour, water and yeast.<|im_end|>\n"
  assert prompt.endswith("How do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
  ids2, m2 = data_lib.tokenize_example(tok, ex, 20)                       # truncation keeps the response's start
  assert len(ids2) == 20 and sum(m2) >= 5 and ids2[len(ids2) - sum(m2):][:3] == ids[len(ids) - sum(m):][:3]
  ts = data_lib.tokenize_dataset(tok, [ex, ex], 64, 2)
  assert ts.tokens.shape == (2, 64) and ts.mask[0].sum() == len(ids) and (ts.tokens[0, len(ids):] == 2).all()


def test_bf16_compute_keeps_fp32_lora(tmp_path):
  c = _config(steps=8, lr=3e-2, top=dict(dtype="bfloat16"))
  r = train_loop(_params(), CFG, _data(), c, str(tmp_path))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(r.state["trainable"]))
  assert r.history[-1]["loss"] < r.history[0]["loss"]
  # The first bf16 loss (LoRA B = 0: the base model) tracks the fp32 loss of the same batch.
  b = data_lib.get_batch(_data(), c.seed, 0, 1, c.train.micro_batch)
  logits, _ = forward(_params(), jnp.asarray(b["tokens"][0]), CFG, attention_mask=jnp.asarray(b["mask"][0]))
  f32 = losses.sft_loss_sum(logits, jnp.asarray(b["tokens"][0]), jnp.asarray(b["loss_mask"][0]))
  f32 = float(f32 / losses.sft_weight(jnp.asarray(b["loss_mask"][0])))
  assert r.history[0]["loss"] == pytest.approx(f32, rel=2e-2)
  assert r.history[0]["loss"] != f32
