"""The reversion study's second refusal judge (train.judge.ModelJudge) on set C, and both judges' agreement with
the hand-labelled responses (issue 18: `judge_agreement` in metrics.json)."""
from __future__ import annotations

import collections
import hashlib
import os

import numpy as np

from analysis.reversion import metrics as rm
from train.evaluate import is_refusal
from train.judge import ModelJudge, agreement, cohen_kappa, read_labels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def labels_path(path: str) -> str:
  """`path` as given when it exists, else relative to the repository root (configs name
  tests/data/refusal_labels.jsonl). Raises FileNotFoundError naming both."""
  if os.path.exists(path):
    return path
  alt = os.path.join(REPO, path)
  if os.path.exists(alt):
    return alt
  raise FileNotFoundError(f"eval.judge_labels: {path!r} not found (nor {alt!r})")


def load_judge(name: str) -> ModelJudge | None:
  """ModelJudge.load(name), None for "" (no second judge)."""
  return ModelJudge.load(name) if name else None


def judge_agreement(labels: str, judge: ModelJudge | None) -> dict:
  """Both judges against the hand labels at `labels` (train.judge.read_labels; "" = none): {"labels" (path),
  "sha256", "n", "counts" {"<model> <kind> <label>": n}, "phrase": train.judge.agreement of is_refusal, "model":
  the same for `judge` (None without one), "model_name", "model_threshold" (its content-free calibration, nats),
  "phrase_vs_model_kappa"}; {"reason": ...} when no labels are configured."""
  if not labels:
    return {"reason": "no hand labels configured (eval.judge_labels)"}
  path = labels_path(labels)
  rows = read_labels(path)
  with open(path, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  y = np.array([r["label"] == "refusal" for r in rows])
  phrase = np.array([is_refusal(r["response"]) for r in rows])
  out = {"labels": os.path.relpath(path, REPO) if path.startswith(REPO) else path, "sha256": sha, "n": len(rows),
         "counts": dict(collections.Counter(f"{r['model']} {r['kind']} {r['label']}" for r in rows)),
         "phrase": agreement(y, phrase), "model": None, "model_name": "", "model_threshold": float("nan"),
         "phrase_vs_model_kappa": float("nan")}
  if judge is not None:
    pred = judge.refusals([r["prompt"] for r in rows], [r["response"] for r in rows])
    out.update(model=agreement(y, pred), model_name=judge.name, model_threshold=judge.threshold,
               phrase_vs_model_kappa=cohen_kappa(phrase, pred))
  return out


def second_judge(judge: ModelJudge | None, harmful: list[str], summary: dict, arms: dict[str, list]) -> dict:
  """Harmfulness on set C by the second judge: share of harmful prompts whose answer it does not judge a refusal,
  for theta_early and theta_aligned (summary's "eval_early" / "eval_aligned" answers) and, for every arm in `arms`
  ({arm: fit_chunks records}; the control arm is skipped: it is never evaluated on C), the final evaluation per
  seed as a metrics.t_interval with, against the baseline, a seed permutation test. Also the per-answer agreement
  (Cohen's kappa) of the two judges over everything judged. {} without a judge."""
  if judge is None:
    return {}
  phrase, model = [], []

  def harm(answers: list[str]) -> float:
    ref = judge.refusals(harmful, answers)
    phrase.extend(is_refusal(a) for a in answers)
    model.extend(ref.tolist())
    return float(1.0 - ref.mean())

  out = {"name": judge.name, "threshold": judge.threshold,
         "models": {k: harm(summary[k]["answers"]) for k in ("eval_early", "eval_aligned")
                    if "answers" in summary.get(k, {})}, "arms": {}}
  for arm, recs in arms.items():
    if arm != "control" and recs and "answers" in recs[0]["evals"][-1]:
      out["arms"][arm] = rm.t_interval([harm(r["evals"][-1]["answers"]) for r in recs])
  base = out["arms"].get("baseline")
  if base is not None:
    for arm, t in out["arms"].items():
      if arm != "baseline":
        t["vs_baseline"] = rm.seed_permutation(t["values"], base["values"])
  out["n_answers"] = len(model)
  out["kappa_with_phrase"] = cohen_kappa(phrase, model)
  return out
