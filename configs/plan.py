"""Config for `python -m train.plan`: per-device memory of a training run on a (data, fsdp, tensor) mesh.

Usage: --config=configs/plan.py:llama3_8b (default), :qwen2_7b, :smollm2, :quick; override any field, e.g.
  --config.mode=full --config.mesh.fsdp=8 --config.mesh.tensor=2 --config.memory_gib=80 --config.batch.seq_len=4096

Presets: llama3_8b / qwen2_7b plan LoRA (rank 16, all seven projections) in bfloat16 on 16 devices as
(data 2, fsdp 4, tensor 2), micro-batch 32 x 2048 tokens, against 95 GiB (a v5p chip; a v5p-32 slice has 16).
smollm2 plans the embedded SmolLM2-135M as configs/lora.py trains it (float32, micro-batch 8 x 96, 1 device);
quick plans the same from the embedded GGUF's own metadata (the registry name; tests).

model: a name in models.config.KNOWN_SHAPES ("llama-3.1-8b", "qwen2.5-7b", "smollm2-135m"), a registry name or a
Hugging Face directory / .gguf file (only config.json / metadata is read), or "custom" (every `dims` field given).
dims: ModelConfig fields overriding the model's (e.g. --config.dims.n_layers=2); unset fields keep the model's.
The entry point converts the ConfigDict once into train.plan_config.PlanConfig (typed, frozen).
"""
import ml_collections
from ml_collections import config_dict

from configs import preset

DIM_FIELDS = {"arch": str, "vocab_size": int, "d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
              "head_dim": int, "d_ff": int, "tie_embeddings": bool, "qkv_bias": bool, "o_bias": bool,
              "qk_norm": bool}


def get_config(arg: str = "llama3_8b") -> ml_collections.ConfigDict:
  return preset("plan", arg, _base, {"llama3_8b": None, "qwen2_7b": _qwen2_7b, "smollm2": _smollm2,
                                     "quick": _quick})


def _base() -> ml_collections.ConfigDict:
  """The llama3_8b preset; every field of train.plan_config.PlanConfig."""
  c = ml_collections.ConfigDict()
  c.model = "llama-3.1-8b"
  c.dims = ml_collections.ConfigDict({k: config_dict.placeholder(t) for k, t in DIM_FIELDS.items()})
  c.mode = "lora"                # lora | full
  c.dtype = "bfloat16"           # frozen weights and activations
  c.param_dtype = "float32"      # trainables (LoRA factors / full-FT master copies), gradients, AdamW moments

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.targets = "q,k,v,o,gate,up,down"   # mode full: which tensors train ("all" = every parameter)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 2
  c.mesh.fsdp = 4
  c.mesh.tensor = 2

  c.batch = ml_collections.ConfigDict()
  c.batch.micro_batch = 32       # global sequences per micro-batch (split over data x fsdp)
  c.batch.accum = 1              # gradient-accumulation steps (activations are per micro-batch)
  c.batch.seq_len = 2048

  c.remat = True                 # recompute each layer in the backward pass (train config: train.remat)
  c.memory_gib = 95.0            # device memory (v5p 95 GiB, v4 32 GiB, H100 80 GB = 74.5 GiB, H200 141 GB)
  return c


def _qwen2_7b(c: ml_collections.ConfigDict) -> None:
  """qwen2_7b: llama3_8b's plan for Qwen2.5-7B."""
  c.model = "qwen2.5-7b"


def _smollm2(c: ml_collections.ConfigDict) -> None:
  """smollm2: SmolLM2-135M as configs/lora.py trains it (float32, rank 8, micro-batch 8 x 96, one device)."""
  c.model = "smollm2-135m"
  c.dtype = "float32"
  c.lora.rank = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.batch.micro_batch, c.batch.seq_len = 8, 96
  c.remat = False
  c.memory_gib = 24.0


def _quick(c: ml_collections.ConfigDict) -> None:
  """quick: smollm2's plan from the embedded GGUF's own metadata (the registry name; tests)."""
  _smollm2(c)
  c.model = "smollm2-135m-instruct"
