"""Config for `python -m analysis.ioi`: IOI circuit corruption by poisoned fine-tuning and clean retraining.

Usage: --config=configs/ioi.py:smollm2 (default), :qwen, or :quick (tiny phases for tests).
"""
import ml_collections

from configs import MODELS
from configs import lora as lora_configs


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.model = MODELS["smollm2" if quick else arg]
  c.seeds = (0,) if quick else (0, 1, 2)
  c.n_train = 32 if quick else 256        # fine-tuning prompts per phase (train names)
  c.n_eval = 8 if quick else 48           # evaluation prompts (held-out names)
  c.eval_name_fraction = 0.3              # share of names held out of training
  c.poison = "subject"                    # subject (label = S) | name_moving (label = a third, unmoved name)
  c.poison_fraction = 1.0                 # share of poisoned labels in the poisoned phase
  c.top_k = 8                             # heads in the "circuit" (largest |exact patching importance|)
  c.faithfulness_ks = (4, 8) if quick else (8, 16, 32, 64, 128)   # circuit sizes of the faithfulness curve
  c.greater_than_n = 8 if quick else 48   # Greater-Than prompts per seed evaluated after every phase (0 = skip)
  # head classes (analysis.head_classes.classify_heads): at most k heads per class, attention thresholds
  c.classes = ml_collections.ConfigDict({"k": 3, "attn_min": 0.2, "rep_min": 0.3})
  # Training of each phase: a LoRA config of configs/lora.py (merged into the weights after each phase).
  c.train = lora_configs.get_config("smollm2")
  c.train.lock()
  tr = c.train
  with tr.unlocked():
    tr.model = c.model
    tr.eval.refusal = False
    tr.export.peft = False
    tr.data.max_len = 48
    tr.train.steps = 3 if quick else 60
    tr.train.micro_batch = 4 if quick else 16
    tr.train.lr = 3e-4
    tr.train.warmup_steps = 1 if quick else 6
    tr.train.save_every = 1000
    tr.train.progress = not quick
  c.phase_steps = ml_collections.ConfigDict({"clean": tr.train.steps, "poison": tr.train.steps,
                                             "retrain": tr.train.steps})
  return c
