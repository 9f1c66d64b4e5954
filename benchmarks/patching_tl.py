"""TransformerLens's own activation-patching helper as the reference for benchmarks/patching.py.

TransformerLens 4.3 (the `bench` extra) wraps the same transformers LlamaForCausalLM in a `TransformerBridge`
(`TransformerBridge.boot_transformers(..., hf_model=...)`: raw HF weights, logits equal to transformers') and
patches with `transformer_lens.patching.generic_activation_patch`, one patched forward of the whole batch per
(layer, position, head) row of an index table, with `layer_pos_head_vector_patch_setter` on `hook_z` (the head's
attention-weighted values, the `o_proj` input slice that gravlab's `patch_each_head` replaces). This is the
batched helper TransformerLens's documentation uses for head patching (`get_act_patch_attn_head_out_by_pos` is the
same function over every position); restricting its index table to the final position makes it the same
experiment as gravlab's.

TransformerLens's helpers take a token tensor and pass no attention mask, so the prompts must be unpadded:
`equal_length_templates` picks the IOI templates of one token length, and benchmarks/patching.py runs every
method on those prompts.
"""
from __future__ import annotations

import collections
import time

import numpy as np

from analysis.ioi.data import BABA_TEMPLATES, make_ioi


def equal_length_templates(tokenizer) -> list[int]:
  """The largest group of IOI template indices (0..14) whose prompts tokenize to one length.

  Names, places and objects are single tokens (analysis.ioi.data.make_ioi filters them), and the ABBA variant of a
  template has the same words as its BABA one, so a prompt's length depends on its template only. Ties go to the
  shorter length.
  """
  lengths = {t: make_ioi(tokenizer, 1, templates=[t], kind="BABA").tokens.shape[1]
             for t in range(len(BABA_TEMPLATES))}
  counts = collections.Counter(lengths.values())
  best = min(counts, key=lambda n: (-counts[n], n))
  return [t for t, n in lengths.items() if n == best]


def boot_bridge(hf_model, hf_tokenizer):
  """A TransformerLens TransformerBridge over an already-loaded transformers model (no download), in eval mode."""
  from transformer_lens.model_bridge import TransformerBridge  # local: bench-extra package

  return TransformerBridge.boot_transformers("gravlab-local", hf_model=hf_model, tokenizer=hf_tokenizer).eval()


def transformerlens_patching(bridge, tokens, abc_tokens, io, s, heads) -> dict:
  """Patch each head's final-position `hook_z` from the ABC run into the clean run with TransformerLens's helper.

  Args:
    bridge: from `boot_bridge`.
    tokens, abc_tokens: `[N, S]` int token ids, unpadded (every row S real tokens); `tokens` is the run that is
      patched (TransformerLens's "corrupted_tokens"), `abc_tokens` the donor whose cache is patched in.
    io, s: `[N]` int token ids; the metric is logit(IO) - logit(S) at the last position, per prompt.
    heads: list of (layer, head) pairs, patched one at a time in this order.

  Returns:
    dict with `donor_s` (the ABC `run_with_cache`, `hook_z` only), `patch_s` (the helper's loop over `heads`),
    `result` `[len(heads), N]` float32 logit differences, and `clean` `[N]` (the unpatched run).
  """
  import pandas as pd  # local: transformer_lens's index tables are pandas DataFrames
  import torch
  from transformer_lens import patching

  tt, ta = (torch.tensor(np.asarray(x), dtype=torch.long) for x in (tokens, abc_tokens))
  io_t, s_t = (torch.tensor(np.asarray(x), dtype=torch.long)[:, None] for x in (io, s))

  def metric(logits):
    last = logits[:, -1].float()
    return (last.gather(1, io_t) - last.gather(1, s_t))[:, 0]

  last_pos = tt.shape[1] - 1
  index = pd.DataFrame([(l, last_pos, h) for l, h in heads], columns=["layer", "pos", "head_index"])
  with torch.inference_mode():
    clean = metric(bridge(tt)).numpy()
    t0 = time.perf_counter()
    _, cache = bridge.run_with_cache(ta, names_filter=lambda name: name.endswith("attn.hook_z"))
    donor_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = patching.generic_activation_patch(
        bridge, tt, cache, metric, patching.layer_pos_head_vector_patch_setter, "z", index_df=index,
        reduce="none")
    patch_s = time.perf_counter() - t0
  return {"donor_s": donor_s, "patch_s": patch_s, "result": res.values.numpy().astype(np.float32),
          "clean": clean}
