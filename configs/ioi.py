"""Config for `python -m analysis.ioi`: IOI circuit corruption by poisoned fine-tuning and clean retraining.

Usage: --config=configs/ioi.py:smollm2 (default), :qwen, or :quick (tiny phases for tests).

Cost of :smollm2 on the 2-core CPU, measured on 2026-12-08 (resumable: rerun the command into the same --workdir):
per seed about 43 min: 4.3 min of training for the primary arm (60 + 60 + 120 steps at ~1.07 s a step), 10 min
of analysis (path-patching discovery and knockout ~2.2 min a phase, the retraining curve ~1 min), 2 min of
cross-phase baselines (CMAP against 100 random head sets), and ~3.8 min per extra poison arm (180 steps and two
importance maps; 7 arms: 27 min); about 2.2 h for 3 seeds (docs/ioi_smollm2).

The entry point converts the ConfigDict once into analysis.ioi.config.IoiConfig (typed, frozen; a bad override
fails naming the field).
"""
import ml_collections

from configs import MODELS
from configs import lora as lora_configs


def _train(model: str, *, steps: int, micro_batch: int, warmup_steps: int, progress: bool) -> ml_collections.ConfigDict:
  """Training of each phase: a LoRA config of configs/lora.py (merged into the weights after each phase)."""
  tr = lora_configs.get_config("smollm2")
  tr.lock()
  tr.model = model
  tr.eval.refusal = False
  tr.export.peft = False
  tr.data.max_len = 48
  tr.train.steps = steps
  tr.train.micro_batch = micro_batch
  tr.train.lr = 3e-4
  tr.train.warmup_steps = warmup_steps
  tr.train.save_every = 1000
  tr.train.progress = progress
  return tr


def _phase_steps(steps: int) -> ml_collections.ConfigDict:
  """The same number of optimizer steps for the clean, poisoned and retraining phases."""
  return ml_collections.ConfigDict({"clean": steps, "poison": steps, "retrain": steps})


def _study(model: str) -> ml_collections.ConfigDict:
  """The full study on `model`: three seeds, 60 steps per clean / poisoned phase, 120 retraining steps."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.resume = "check"                      # check | force (train.resume)
  c.seeds = (0, 1, 2)
  c.n_train = 256                         # fine-tuning prompts per phase (train names)
  c.n_eval = 48                           # evaluation prompts (held-out names)
  c.eval_name_fraction = 0.3              # share of names held out of training
  c.poison = "subject"                    # subject (label = S) | name_moving (label = a third, unmoved name)
  c.poison_fraction = 1.0                 # share of poisoned labels in the poisoned phase
  c.top_k = 8                             # heads in the "circuit" (largest |exact patching importance|)
  c.abc_per_template = 50                 # separate ABC prompts per base template for the mean ablation
  c.cmap_random_sets = 100                # size-matched random head sets CMAP at the circuit is ranked among
  c.discovery_k = (5, 4, 7)               # path-patching circuit (Wang et al.: 3+2 name movers, 4 S-inhibition,
                                          # 4 induction + 3 duplicate-token)
  # the poisoned and retraining phases again from each seed's clean model, per poison variant and fraction
  c.poison_arms = ("subject:0.1", "subject:0.25", "subject:0.5", "name_moving:0.1", "name_moving:0.25",
                   "name_moving:0.5", "name_moving:1.0")
  c.retrain_curve_every = 20              # retrain curve: a checkpoint (logit diff, importance vs base) every 20 steps
  c.faithfulness_ks = (8, 16, 32, 64, 128)   # circuit sizes of the faithfulness curve
  c.greater_than_n = 48                   # Greater-Than prompts per seed evaluated after every phase (0 = skip)
  # head classes (analysis.ioi.head_classes.classify_heads): at most k heads per class, attention thresholds
  c.classes = ml_collections.ConfigDict({"k": 3, "attn_min": 0.2, "rep_min": 0.3})
  c.train = _train(model, steps=60, micro_batch=16, warmup_steps=6, progress=True)
  c.phase_steps = _phase_steps(60)
  c.phase_steps.retrain = 120             # step budget of retraining: twice the clean phase (the curve shows
                                          # whether the logit difference still improves at the end)
  return c


def smollm2() -> ml_collections.ConfigDict:
  """SmolLM2-135M-Instruct (the default)."""
  return _study(MODELS["smollm2"])


def qwen() -> ml_collections.ConfigDict:
  """Qwen2.5-Coder-0.5B-Instruct."""
  return _study(MODELS["qwen"])


def quick() -> ml_collections.ConfigDict:
  """SmolLM2 with tiny phases for tests: one seed, 32 / 8 prompts, 3 steps per phase."""
  c = smollm2()
  c.seeds = (0,)
  c.n_train = 32
  c.n_eval = 8
  c.faithfulness_ks = (4, 8)
  c.greater_than_n = 8
  c.abc_per_template = 4
  c.cmap_random_sets = 8
  c.retrain_curve_every = 1
  c.discovery_k = (1, 1, 1)
  c.poison_arms = ("name_moving:0.5",)
  c.train = _train(c.model, steps=3, micro_batch=4, warmup_steps=1, progress=False)
  c.phase_steps = _phase_steps(3)
  return c


PRESETS = {"smollm2": smollm2, "qwen": qwen, "quick": quick}


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown configs/ioi.py preset {arg!r} (known: {', '.join(PRESETS)})")
  return PRESETS[arg]()
