"""The (data, fsdp, tensor) sharding plan: 8B-shaped programs compile with the intended shardings (no weights),
tiny models give the 1-device numbers on three meshes, train.plan's bytes and verdicts, two-process training.

Mesh tests run in fresh processes with 8 forced CPU host devices (XLA_FLAGS=--xla_force_host_platform_device_count),
as tests/test_train.py does; their workers are the `_worker_*` functions below.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.plan import get_config as plan_config
from models import sharding as sh
from models.config import KNOWN_SHAPES, ModelConfig
from models.params import init_params
from models.transformer import forward_jit
from train import checkpoint, engine, losses
from train import plan as plan_lib
from train.plan_config import PlanConfig
from train.typed_config import from_configdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The Megatron-style plan, written out by hand (models.sharding docstring): the reference the compiled
# programs' input shardings are checked against.
MEGATRON = {
    "embed": ("tensor", "fsdp"), "lm_head": ("fsdp", "tensor"), "final_norm": (None,),
    "layers/attn_norm": (None, None), "layers/mlp_norm": (None, None),
    "layers/wq": (None, "fsdp", "tensor"), "layers/wk": (None, "fsdp", "tensor"),
    "layers/wv": (None, "fsdp", "tensor"), "layers/w_gate": (None, "fsdp", "tensor"),
    "layers/w_up": (None, "fsdp", "tensor"), "layers/wo": (None, "tensor", "fsdp"),
    "layers/w_down": (None, "tensor", "fsdp"), "layers/bq": (None, "tensor"), "layers/bk": (None, "tensor"),
    "layers/bv": (None, "tensor"),
}
LORA_EXPECTED = {"wq": ((None, "fsdp", None), (None, None, "tensor")),
                 "wo": ((None, "tensor", None), (None, None, "fsdp")),
                 "w_down": ((None, "tensor", None), (None, None, "fsdp"))}

# Tiny model for the numerical tests: Qwen2-style q/k/v biases, untied, ONE kv head, so on tensor=2 the q heads
# are split while k/v fall back to replication (the divisibility rule) inside the same program.
TINY = ModelConfig(arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8,
                   d_ff=64, qkv_bias=True, rms_eps=1e-5)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _run(worker: str, *args, n_devices: int = 8, env: dict | None = None, timeout: int = 300,
         wait: bool = True):
  """Run `tests.test_sharding.<worker>(*args)` in a fresh process with n forced CPU devices; its JSON result."""
  e = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu",
           **(env or {}))
  code = (f"import sys, json; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r});"
          f"import test_sharding as T; print('RESULT', json.dumps(T.{worker}(*{list(args)!r})))")
  p = subprocess.Popen([sys.executable, "-c", code], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, cwd=ROOT)
  return p if not wait else _result(p, timeout)


def _result(p, timeout=300):
  out, err = p.communicate(timeout=timeout)
  assert p.returncode == 0, err[-4000:]
  line = next(l for l in out.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT "):])


def _make_plan(c):
  """train.plan.make_plan of a configs/plan.py ConfigDict, converted once as `python -m train.plan` does."""
  return plan_lib.make_plan(from_configdict(PlanConfig, c))


def _sds(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------- (a) 8B compile
def _abstract_lora_step(cfg, mesh, dtype, rank, batch, seq, remat):
  """The LoRA train step and ShapeDtypeStruct arguments carrying the plan's shardings (no weights allocated):
  (step, (state, frozen, batch, None))."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from models.params import param_shapes
  from train import adapters
  frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  frozen = _sds(frozen, engine.param_sharding(mesh, frozen, cfg))
  spec = adapters.LoraSpec.create(cfg, rank=rank, alpha=2.0 * rank)
  lora = jax.eval_shape(lambda k: adapters.init_lora(spec, cfg, k, jnp.float32), jax.random.PRNGKey(0))
  tx, sched = engine.make_optimizer(lr=1e-4, total_steps=100)
  state = jax.eval_shape(lambda t: engine.init_state(t, tx, 0), lora)
  state_sh = engine.state_sharding(mesh, state, tx, cfg, "lora")
  m = jnp.asarray(spec.layer_mask())[:, None, None]
  sc = engine.StepConfig(lora_scale=spec.scale, compute_dtype=dtype, remat=remat)
  step = engine.make_train_step(cfg, sc, tx, sched, {t: {"a": m, "b": m} for t in lora}, mesh, state_sh,
                                jax.tree.map(lambda x: x.sharding, frozen))
  bsh = NamedSharding(mesh, P(None, sh.BATCH_AXES, None))
  b = {k: jax.ShapeDtypeStruct((1, batch, seq), dt, sharding=bsh)
       for k, dt in (("tokens", jnp.int32), ("mask", jnp.int32), ("loss_mask", jnp.float32))}
  return step, (_sds(state, state_sh), frozen, b, None)


def _worker_compile_8b(name, fsdp, tensor, expected):
  """Lower + compile the LoRA train step and the steering sweep of the real `name` dims (2 layers) on an
  8-device mesh from ShapeDtypeStructs; report what the compiled objects say."""
  import time

  from jax.sharding import NamedSharding, PartitionSpec as P

  from probes import steering, tasks as tasks_lib
  cfg = KNOWN_SHAPES[name].replace(n_layers=2)
  mesh = sh.make_mesh(fsdp=fsdp, tensor=tensor)
  step, args = _abstract_lora_step(cfg, mesh, "bfloat16", 16, 8, 128, remat=True)
  state, frozen, batch, _ = args
  bsh = batch["tokens"].sharding
  t0 = time.time()
  compiled = step.lower(*args).compile()
  t_step = time.time() - t0

  def check(shardings, ndims):
    return {path: None if s is None else bool(s.is_equivalent_to(NamedSharding(mesh, P(*expected[path])),
                                                                 ndims[path]))
            for path, s in sh.flat_items(shardings) if path in expected}   # None: argument unused (pruned)
  ndim = {p: len(x.shape) for p, x in sh.flat_items(frozen)}
  st_in, fr_in = compiled.input_shardings[0][0], compiled.input_shardings[0][1]
  lora_ok = {t: [bool(st_in["trainable"][t][k].is_equivalent_to(NamedSharding(mesh, P(*e)), 3))
                 for k, e in zip("ab", LORA_EXPECTED[t])] for t in LORA_EXPECTED}
  mu = st_in["opt_state"][1][0].mu          # chain(clip, adamw(scale_by_adam, ...)): the Adam moments
  mu_ok = all(mu[t][k].is_equivalent_to(st_in["trainable"][t][k], 3) for t in state["trainable"] for k in "ab")
  hlo = compiled.as_text()
  wq = [2, cfg.d_model // fsdp, cfg.q_dim // tensor]

  # the plan's bytes per device for the same arguments
  pc = plan_config("llama3_8b")
  pc.model, pc.dims.n_layers, pc.lora.rank = name, 2, 16
  pc.mesh.data, pc.mesh.fsdp, pc.mesh.tensor = 8 // (fsdp * tensor), fsdp, tensor
  pc.batch.micro_batch, pc.batch.seq_len = 8, 128
  plan = _make_plan(pc)
  batch_bytes = 8 * 128 * 12 // (8 // tensor)                 # tokens, mask int32 + loss_mask f32, split on B
  scalars = 4 + 8                                             # step int32, rng uint32[2]
  plan_args = plan.totals["weights"] + plan.totals["trainable"] + plan.totals["optimizer"] + batch_bytes + scalars

  # the steering sweep program (suffix method) on the same weights
  D = cfg.d_model
  tasks = [tasks_lib.Task("factual", np.zeros((8, 32), np.int32), np.ones((8, 32), np.int32),
                          np.array([0] * 4 + [1] * 4, np.int32), np.zeros((8, 0), np.int32), 4),
           tasks_lib.Task("bias", np.zeros((8, 32), np.int32), np.ones((8, 32), np.int32), np.zeros(8, np.int32),
                          np.tile(np.array([[10, 11, 12]], np.int32), (8, 1)), 8)]
  prog = steering.sweep_program(cfg, tasks, [0, 1], [-4.0, 4.0], 2, 2, method="suffix", mesh=mesh)
  arrays = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t.arrays()) for t in tasks]
  starts_sh = steering.sweep_shardings(mesh, cfg, tasks)["starts"]
  starts = [jax.ShapeDtypeStruct((2, 8, 32, D), jnp.bfloat16, sharding=s) for s in starts_sh]
  t0 = time.time()
  sweep = prog.lower(frozen, arrays, jax.ShapeDtypeStruct((2, 2, D), jnp.float32), starts,
                     jax.ShapeDtypeStruct((2,), jnp.int32)).compile()
  t_sweep = time.time() - t0
  sw_in = sweep.input_shardings[0]
  return {"step_frozen": check(fr_in, ndim), "sweep_params": check(sw_in[0], ndim), "lora": lora_ok,
          "adam_like_params": bool(mu_ok),
          "starts_batch_split": bool(sw_in[3][0].is_equivalent_to(
              NamedSharding(mesh, P(None, sh.BATCH_AXES, None, None)), 4)),
          "batch_split": bool(compiled.input_shardings[0][2]["tokens"].is_equivalent_to(bsh, 3)),
          "wq_shard_in_hlo": f"bf16[{','.join(map(str, wq))}]" in hlo,
          "collectives": {k: hlo.count(k) for k in ("all-reduce", "all-gather", "reduce-scatter")},
          "argument_bytes": compiled.memory_analysis().argument_size_in_bytes, "plan_argument_bytes": plan_args,

          "plan_notes": plan.notes, "compile_s": {"step": t_step, "sweep": t_sweep}}


@pytest.mark.parametrize("name,fsdp,tensor", [("llama-3.1-8b", 2, 2), ("qwen2.5-7b", 2, 4)])
def test_8b_lora_step_and_sweep_compile_with_plan_shardings(name, fsdp, tensor):
  cfg = KNOWN_SHAPES[name]
  real = {"llama-3.1-8b": (128256, 4096, 32, 32, 8, 128, 14336, False, 500000.0),
          "qwen2.5-7b": (152064, 3584, 28, 28, 4, 128, 18944, True, 1e6)}[name]
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
          cfg.qkv_bias, cfg.rope_theta) == real and not cfg.tie_embeddings
  expected = {k: v for k, v in MEGATRON.items() if not k.startswith("layers/b") or cfg.qkv_bias}
  r = _run("_worker_compile_8b", name, fsdp, tensor, expected)
  assert r["step_frozen"] == {k: True for k in expected}, r["step_frozen"]
  # the suffix program starts from cached residuals: the token embedding is its only unused weight
  assert r["sweep_params"] == {k: (None if k == "embed" else True) for k in expected}, r["sweep_params"]
  assert r["lora"] == {t: [True, True] for t in LORA_EXPECTED} and r["adam_like_params"]
  assert r["batch_split"] and r["starts_batch_split"]
  assert r["wq_shard_in_hlo"]                                   # per-device [2, D/fsdp, H*hd/tensor] weight
  assert r["collectives"]["all-reduce"] > 0 and r["collectives"]["all-gather"] > 0
  assert r["plan_notes"] == []                                  # every split divides for these meshes
  # what the compiled step holds per device = train.plan's weights + trainables + optimizer state (+ batch)
  assert r["argument_bytes"] == r["plan_argument_bytes"], (r["argument_bytes"], r["plan_argument_bytes"])
  print(name, "compile seconds", r["compile_s"])


# --------------------------------------------------------------------------------------- (b) mesh equivalence
def _tiny_batch(n=16, s=12, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, TINY.vocab_size, (n, s)).astype(np.int32)
  mask = np.ones((n, s), np.int32)
  lm = np.zeros((n, s), np.float32)
  for i in range(n):
    ln = s - (i % 3)
    mask[i, ln:] = 0
    toks[i, ln:] = 0
    lm[i, ln // 2:ln] = 1
  return {"tokens": toks[None], "mask": mask[None], "loss_mask": lm[None]}


def _tiny_tasks():
  from probes import tasks as tasks_lib
  rng = np.random.default_rng(3)
  t = rng.integers(3, TINY.vocab_size, (8, 10)).astype(np.int32)
  m = np.ones((8, 10), np.int32)
  m[:3, :2] = 0
  return [tasks_lib.Task("factual", t, m, np.array([0] * 4 + [1] * 4, np.int32), np.zeros((8, 0), np.int32), 4),
          tasks_lib.Task("bias", t[::-1].copy(), m, rng.integers(0, 3, 8).astype(np.int32),
                         np.tile(np.array([[10, 11, 12]], np.int32), (8, 1)), 8)]


def _tiny_run(mesh_sizes, parts=("lora", "full", "sweep")):
  """Logits, 2 LoRA steps, 2 full fine-tuning steps and a steering sweep of TINY on one mesh (None = the
  1-device code path: no mesh for the forward and sweep, a 1-device mesh for the steps, and no remat, while the
  meshes run full fine-tuning with remat); `parts` selects which of the last three run."""
  from probes import steering
  from train import adapters
  params = init_params(TINY, jax.random.PRNGKey(0), std=0.1)
  host = _tiny_batch()
  mesh = sh.make_mesh(fsdp=mesh_sizes[1], tensor=mesh_sizes[2]) if mesh_sizes else sh.make_mesh(
      devices=jax.devices()[:1])
  out = {}
  toks, mask = host["tokens"][0], host["mask"][0]
  if mesh_sizes:
    fsh = sh.param_shardings(mesh, TINY)
    bsh = jax.sharding.NamedSharding(mesh, sh.batch_spec(2))

    def fwd(p, t, m):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return forward_jit(p, t, TINY, attention_mask=m)[0]
    logits = jax.jit(fwd, in_shardings=(fsh, bsh, bsh))(jax.device_put(params, fsh), toks, mask)
  else:
    logits = forward_jit(params, jnp.asarray(toks), TINY, attention_mask=jnp.asarray(mask))[0]
  out["logits"] = np.asarray(logits).tolist()
  for mode, remat in (("lora", False), ("full", mesh_sizes is not None)):
    if mode not in parts:
      continue
    spec = adapters.LoraSpec.create(TINY, rank=4, alpha=8.0)
    if mode == "lora":
      tr = adapters.init_lora(spec, TINY, jax.random.PRNGKey(1))
      tr = jax.tree.map(lambda x: x + 0.05, tr)           # non-zero B: gradients reach both factors
      umask = jax.tree.map(lambda _: jnp.ones(()), tr)
    else:
      tr = {"embed": params["embed"], "lm_head": params["lm_head"], "layers": dict(params["layers"])}
      umask = jax.tree.map(lambda _: jnp.ones(()), tr)
    tx, sched = engine.make_optimizer(lr=1e-2, total_steps=10)
    state = engine.init_state(tr, tx, 0)
    ssh = engine.state_sharding(mesh, state, tx, TINY, mode)
    fsh = engine.param_sharding(mesh, params, TINY)
    sc = engine.StepConfig(mode=mode, lora_scale=spec.scale, remat=remat)
    step = engine.make_train_step(TINY, sc, tx, sched, umask, mesh, ssh, fsh)
    state, frozen = engine.put_tree(state, ssh), engine.put_tree(params, fsh)
    hist = []
    for _ in range(2):
      state, m = step(state, frozen, engine.put_batch(mesh, host), None)
      hist.append([float(m["loss"]), float(m["grad_norm"])])
    leaves = [np.asarray(x) for x in jax.tree.leaves(state["trainable"])]
    out[mode] = {"hist": hist, "leaves": [x.ravel()[:64].tolist() for x in leaves],
                 "norms": [float(np.linalg.norm(x)) for x in leaves]}
  if "sweep" not in parts:
    return out
  tasks = _tiny_tasks()
  dirs = jax.random.normal(jax.random.PRNGKey(2), (2, 2, TINY.d_model))
  res = steering.steering_sweep(params, TINY, tasks, dirs, [0, 1], [-3.0, 3.0], mesh=mesh if mesh_sizes else None)
  out["sweep"] = {"baseline": res["baseline"].tolist(), "scores": res["scores"].tolist()}
  return out


# logits and LoRA steps on every mesh; full fine-tuning and the sweep on the mesh that uses all three axes
MESH_PARTS = {(8, 1, 1): ("lora",), (2, 4, 1): ("lora",), (2, 2, 2): ("lora", "full", "sweep")}


def _worker_meshes():
  assert jax.device_count() == 8
  return {str(m): _tiny_run(m, MESH_PARTS[m]) for m in MESHES}


def test_tiny_model_same_numbers_on_three_meshes_and_one_device():
  proc = _run("_worker_meshes", wait=False)            # the 8-device process runs while the reference is computed
  ref = _tiny_run(None)
  # independent check of the 1-device step: its first loss is the base model's SFT loss from forward + losses
  host = _tiny_batch()
  params = init_params(TINY, jax.random.PRNGKey(0), std=0.1)
  logits = forward_jit(params, jnp.asarray(host["tokens"][0]), TINY, attention_mask=jnp.asarray(host["mask"][0]))[0]
  full0 = losses.sft_loss_sum(logits, jnp.asarray(host["tokens"][0]), jnp.asarray(host["loss_mask"][0]))
  assert ref["full"]["hist"][0][0] == pytest.approx(float(full0 / host["loss_mask"].sum()), rel=1e-6)
  multi = _result(proc)
  for m in MESHES:
    r = multi[str(m)]
    np.testing.assert_allclose(r["logits"], ref["logits"], atol=1e-5, err_msg=str(m))
    for mode in set(MESH_PARTS[m]) - {"sweep"}:
      np.testing.assert_allclose(r[mode]["hist"], ref[mode]["hist"], rtol=1e-5, err_msg=f"{m} {mode}")
      for a, b in zip(r[mode]["leaves"], ref[mode]["leaves"]):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{m} {mode}")
      np.testing.assert_allclose(r[mode]["norms"], ref[mode]["norms"], rtol=1e-5, err_msg=f"{m} {mode}")
    if "sweep" in MESH_PARTS[m]:
      np.testing.assert_allclose(r["sweep"]["baseline"], ref["sweep"]["baseline"], atol=1e-5, err_msg=str(m))
      np.testing.assert_allclose(r["sweep"]["scores"], ref["sweep"]["scores"], atol=1e-5, err_msg=str(m))
  assert ref["lora"]["hist"][1][0] < ref["lora"]["hist"][0][0]           # the steps do train


# --------------------------------------------------------------------------------------------- (c) train.plan
@pytest.mark.parametrize("remat", [False, True])
def test_plan_matches_compiled_step_memory(remat):
  """train.plan against XLA's own numbers for the compiled LoRA step (1 CPU device, SmolLM2-135M dims, float32, so
  no bf16-on-CPU emulation): argument bytes exactly, activations (+ remat working set + gradient accumulator)
  within 10% of the compiled temp buffers."""
  c = plan_config("smollm2")
  c.remat = remat
  p = _make_plan(c)
  mesh = sh.make_mesh(devices=jax.devices()[:1])
  step, args = _abstract_lora_step(KNOWN_SHAPES["smollm2-135m"], mesh, "float32", c.lora.rank,
                                   c.batch.micro_batch, c.batch.seq_len, remat)
  mem = step.lower(*args).compile().memory_analysis()
  batch = c.batch.micro_batch * c.batch.seq_len * 12
  assert mem.argument_size_in_bytes == p.totals["weights"] + p.totals["trainable"] + p.totals["optimizer"] + batch + 12
  est = p.totals["activations"] + p.totals["layer_working_set"] + p.totals["gradients"]
  assert est == pytest.approx(mem.temp_size_in_bytes, rel=0.1), (est, mem.temp_size_in_bytes)
  assert (p.totals["layer_working_set"] > 0) == remat
def _plan_cli(*overrides):
  p = subprocess.run([sys.executable, "-m", "train.plan", *overrides], capture_output=True, text=True, cwd=ROOT,
                     timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return p.returncode, p.stdout, p.stderr


def test_plan_refuses_over_budget_and_accepts_fitting():
  # full fine-tuning of Llama-3.1-8B, no remat, pure data parallel on 16 x 80 GiB: weights alone do not fit
  rc, out, err = _plan_cli("--config=configs/plan.py:llama3_8b", "--config.mode=full", "--config.lora.targets=all",
                           "--config.remat=False", "--config.mesh.data=16", "--config.mesh.fsdp=1",
                           "--config.mesh.tensor=1", "--config.memory_gib=80")
  assert rc != 0
  assert "plan does not fit" in err and "config.memory_gib" in err and "optimizer state (AdamW)" in err
  need = float(err.split("plan does not fit: ")[1].split(" GiB")[0])
  over = float(err.split("over by ")[1].split(" GiB")[0])
  assert over == pytest.approx(need - 80.0, abs=0.011)
  # 8.03e9 parameters: bf16 weights + fp32 master + 2 fp32 Adam moments = 14 bytes each, all replicated
  assert need > 8.03e9 * 14 / 2 ** 30
  rc, out, err = _plan_cli("--config=configs/plan.py:llama3_8b")
  assert rc == 0, err[-2000:]
  assert "fits: yes" in out and "layers/wq" in out and "(-, fsdp, tensor)" in out


def _tiny_plan_config(**mesh):
  c = plan_config("smollm2")
  c.model = "custom"
  for k, v in dict(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   d_ff=48, tie_embeddings=False, qkv_bias=False, o_bias=False, qk_norm=False).items():
    c.dims[k] = v
  c.dtype, c.lora.rank = "bfloat16", 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 2), mesh.get("tensor", 2)
  c.batch.micro_batch, c.batch.seq_len = 4, 16
  return c


def test_plan_bytes_match_hand_count():
  p = _make_plan(_tiny_plan_config(fsdp=2, tensor=2))
  # bf16 = 2 bytes; fsdp = tensor = 2 (models.sharding rules; L = 2 layers never split):
  embed = 64 * 32 // 4 * 2                     # [V, D] (tensor, fsdp)
  lm_head = 32 * 64 // 4 * 2                   # [D, V] (fsdp, tensor)
  final_norm = 32 * 2                          # replicated
  norms = 2 * (2 * 32) * 2                     # attn_norm, mlp_norm [L, D] replicated
  wq = wo = 2 * 32 * 32 // 4 * 2               # [L, D, 4 heads x 8] both axes split
  wk = wv = 2 * 32 * 16 // 4 * 2               # [L, D, 2 kv heads x 8]
  mlp = 3 * (2 * 32 * 48 // 4 * 2)             # gate, up, down
  assert p.totals["weights"] == embed + lm_head + final_norm + norms + wq + wo + wk + wv + mlp == 10_048
  # LoRA r=4 fp32: a [L, in, 4] split like the weight's input axis, b [L, 4, out] like its output axis (/2 each)
  lora = sum(2 * (i * 4 + 4 * o) // 2 * 4 for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 48),
                                                         (32, 48), (48, 32)])
  assert p.totals["trainable"] == p.totals["gradients"] == lora == 7_424
  # AdamW: mu and nu like the trainables + two int32 step counters (adam, schedule)
  assert p.totals["optimizer"] == 2 * lora + 2 * 4
  rows = {(r.group, r.name): r for r in p.rows}
  assert rows[("weights", "layers/wo")].spec == "(-, tensor, fsdp)" and rows[("weights", "layers/wo")].bytes == wo
  # FSDP working set: one layer with the fsdp split undone (tensor split kept: matrices / 2, the two norms
  # whole) is larger than the embedding or LM head gathered over fsdp (64 x 32 / 2 x 2 bytes)
  gathered = (32 * 32 + 32 * 32 + 32 * 16 + 32 * 16 + 3 * 32 * 48) // 2 * 2 + 2 * 32 * 2
  assert p.totals["gathered"] == gathered == 7_808 > 64 * 32 // 2 * 2
  assert p.total == sum(p.totals.values()) and p.notes == []


def test_plan_fallback_notes_and_bad_fields(monkeypatch):
  c = plan_config("qwen2_7b")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 8
  c.batch.micro_batch = 2
  p = _make_plan(c)
  assert "layers/wk dim 2 (512 = 4 heads) not divisible by tensor=8: replicated over tensor" in p.notes
  assert "layers/wq dim 2 (3584 = 28 heads) not divisible by tensor=8: replicated over tensor" in p.notes
  rows = {r.name: r for r in p.rows if r.group == "weights"}
  assert rows["layers/wk"].spec == "(-, fsdp, -)" and rows["layers/w_gate"].spec == "(-, fsdp, tensor)"
  assert "replicated over tensor" in plan_lib.format_plan(p)
  c = _tiny_plan_config()
  c.batch.micro_batch = 3
  with pytest.raises(plan_lib.PlanError, match=r"config.batch.micro_batch=3 is not divisible by mesh.data x "
                                               r"mesh.fsdp = 2"):
    _make_plan(c)
  c = _tiny_plan_config()
  c.mesh.tensor = 0
  with pytest.raises(plan_lib.PlanError, match=r"config.mesh.tensor=0 must be an integer >= 1"):
    _make_plan(c)
  c = _tiny_plan_config()
  c.dims.d_ff = None
  with pytest.raises(plan_lib.PlanError, match=r"config.dims.d_ff"):
    _make_plan(c)
  with pytest.raises(ValueError, match=r"fsdp=3 x tensor=1 must divide the device count 1"):
    sh.make_mesh(fsdp=3)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
    engine.maybe_initialize_distributed()


# ---------------------------------------------------------------------------------------------- (d) multi-host
def _worker_process(wd):
  """One of two processes (2 CPU devices each): jax.distributed from JAX_* env, train_loop on a (2, 2, 1) mesh
  over the 4 global devices, orbax checkpoints from both processes into one directory."""
  import test_train as TT
  from train.loop import train_loop
  assert engine.maybe_initialize_distributed()            # from JAX_COORDINATOR_ADDRESS etc., before any JAX call
  c = TT._config(steps=3, fsdp=2, save_every=2, distributed=True)
  r = train_loop(TT._params(), TT.CFG, TT._data(), c, wd)
  mesh = sh.make_mesh(fsdp=2)
  return {"process": jax.process_index(), "devices": jax.device_count(),
          "rows": engine.process_rows(mesh, c.train.micro_batch).tolist(),
          "loss": [h["loss"] for h in r.history],
          "b": engine.to_host(r.state["trainable"]["wq"]["b"]).tolist()}


def test_two_processes_train_like_one_device(tmp_path):
  import test_train as TT
  from train.loop import train_loop
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  wd = str(tmp_path / "mp")
  procs = [_run("_worker_process", wd, n_devices=2, wait=False,
                env={"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                     "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  one = train_loop(TT._params(), TT.CFG, TT._data(), TT._config(steps=3, save_every=2), str(tmp_path / "one"))
  res = sorted((_result(p) for p in procs), key=lambda r: r["process"])
  assert [r["devices"] for r in res] == [4, 4]
  rows = [set(r["rows"]) for r in res]
  assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(8)) and len(rows[0]) == 4
  for r in res:
    np.testing.assert_allclose(r["loss"], [h["loss"] for h in one.history], rtol=1e-5)
    np.testing.assert_allclose(r["b"], np.asarray(one.state["trainable"]["wq"]["b"]), atol=1e-5)
  # the checkpoint both processes wrote restores onto another topology (one device, laid out like `one`)
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"))
  assert ck.latest_step() == 3
  state, meta = ck.restore(3, like=one.state)
  ck.close()
  np.testing.assert_allclose(np.asarray(state["trainable"]["wq"]["b"]),
                             np.asarray(one.state["trainable"]["wq"]["b"]), atol=1e-5)
  assert meta["config"]["train"]["fsdp"] == 2
