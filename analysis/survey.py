"""First look at a real model: greedy answers to harmful and benign prompts, and the residual stream by depth.

    python -m analysis.survey --config=configs/survey.py:smollm2 --workdir=runs/<date>-smollm2

Writes to the workdir: config.json, metrics.jsonl (one row per layer boundary; also TensorBoard under tb/),
generations.jsonl, figures/residual_depth.png, summary.json and report.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from absl import logging

from analysis import plots
from analysis.residual_stats import mean_difference_separation, residual_stats
from models import registry
from models import tokenizer as tk
from models.loading import load_tokenizer
from models.model import CausalLM
from train.rundir import Workdir, default_workdir, write_json, write_text


@dataclasses.dataclass(frozen=True)
class SurveyConfig:
  """configs/survey.py, converted once (train.typed_config)."""
  model: str
  dtype: str
  max_new_tokens: int
  system_prompt: str                  # "" = the chat template's default
  harmful_prompts: tuple[str, ...]
  benign_prompts: tuple[str, ...]
  seed: int

  def __post_init__(self):
    if not self.harmful_prompts or not self.benign_prompts:
      raise ValueError("harmful_prompts and benign_prompts must both be non-empty")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def run(config: SurveyConfig, workdir: str | None = None) -> str:
  """Run the survey; returns the report path. Raises TypeError unless `config` is a SurveyConfig."""
  if not isinstance(config, SurveyConfig):
    raise TypeError(f"analysis.survey.run takes a SurveyConfig, got {type(config).__name__}; convert with "
                    "train.typed_config.from_configdict(SurveyConfig, c)")
  workdir = workdir or default_workdir(config.model.split("/")[-1].removesuffix(".gguf"))
  registry.resolve(config.model)       # a missing model fails here, before the workdir is written
  wd = Workdir(workdir, config)
  t0 = time.time()
  model = CausalLM.load(config.model, dtype=jnp.dtype(config.dtype))
  cfg, tok = model.cfg, load_tokenizer(config.model)
  t_load = time.time() - t0
  logging.info("loaded %s (%d layers, d_model %d) in %.1fs", config.model, cfg.n_layers, cfg.d_model, t_load)

  prompts = list(config.harmful_prompts) + list(config.benign_prompts)
  kinds = ["harmful"] * len(config.harmful_prompts) + ["benign"] * len(config.benign_prompts)
  texts = [tk.chat_prompt(tok, p, config.system_prompt or None) for p in prompts]
  toks, mask = tk.encode_left_padded(tok, texts)
  eos = tk.eos_ids(tok, cfg)

  t0 = time.time()
  new = model.generate(jnp.asarray(toks), jnp.asarray(mask), max_new_tokens=config.max_new_tokens, eos_ids=eos,
                       pad_id=tk.pad_id(tok))
  answers = tk.decode_generated(tok, np.asarray(new), eos)
  t_gen = time.time() - t0
  rows = [{"kind": k, "prompt": p, "answer": a} for k, p, a in zip(kinds, prompts, answers)]
  write_text(wd.file("generations.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

  acts = model.capture(jnp.asarray(toks), jnp.asarray(mask), ("resid",))
  stats = {k: np.asarray(v) for k, v in residual_stats(acts["resid"], jnp.asarray(mask)).items()}
  last = acts["resid"][:, :, -1]                                       # [L+1, B, D] last prompt token
  nh = len(config.harmful_prompts)
  sep = {k: np.asarray(v) for k, v in mean_difference_separation(last[:, :nh], last[:, nh:]).items()}
  for b in range(cfg.n_layers + 1):
    row = {"norm_mean": stats["norm_mean"][b], "norm_last": stats["norm_last"][b],
           "max_abs": stats["max_abs"][b], "harm_benign_diff_norm": sep["diff_norm"][b],
           "harm_benign_d_prime": sep["d_prime"][b]}
    if b < cfg.n_layers:
      row.update(update_ratio=stats["update_ratio"][b], cos_next=stats["cos_next"][b])
    wd.log(b, **row)
  fig = plots.depth_profile(stats, sep, cfg.n_layers, title=f"{config.model}: residual stream by depth")
  fig_path = wd.save_figure(fig, "residual_depth")
  summary = {"model": config.model, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "load_s": t_load,
             "generate_s": t_gen, "prompt_tokens": int(mask.sum()), "new_tokens": config.max_new_tokens,
             "stats": stats, "separation": sep}
  write_json(wd.file("summary.json"), summary)
  report = _report(config, cfg, stats, sep, rows, t_load, t_gen, os.path.relpath(fig_path, workdir))
  write_text(wd.file("report.md"), report)
  wd.close()
  return wd.file("report.md")


def _report(config, cfg, stats, sep, rows, t_load, t_gen, fig_rel) -> str:
  L = cfg.n_layers
  lines = [f"# Survey of {config.model}", "",
           f"{cfg.arch}, {L} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV heads. "
           f"Load {t_load:.1f}s, greedy generation of {config.max_new_tokens} tokens for {len(rows)} prompts "
           f"{t_gen:.1f}s (includes compilation).", "",
           "## Answers (greedy)", ""]
  for r in rows:
    ans = r["answer"].strip().replace("\n", " ")
    lines.append(f"- **{r['kind']}** - {r['prompt']}  \n  > {ans[:300]}")
  best = int(sep["d_prime"].argmax())
  lines += ["", "## Residual stream by depth", "", f"![residual stream by depth]({fig_rel})", "",
            f"Harmful vs benign last-token separation (d' along the mean difference, in-sample) peaks at "
            f"boundary {best} ({100 * best / L:.0f}% depth): d' = {sep['d_prime'][best]:.2f}.", "",
            "| boundary | depth % | mean norm | last-token norm | update ratio | cos(h_l, h_l+1) | max abs (dim) |"
            " harm-benign d' |", "|---|---|---|---|---|---|---|---|"]
  for b in range(L + 1):
    upd = f"{stats['update_ratio'][b]:.3f}" if b < L else ""
    cos = f"{stats['cos_next'][b]:.3f}" if b < L else ""
    lines.append(f"| {b} | {100 * b / L:.0f} | {stats['norm_mean'][b]:.2f} | {stats['norm_last'][b]:.2f} | {upd} "
                 f"| {cos} | {stats['max_abs'][b]:.1f} ({stats['max_dim'][b]}) | {sep['d_prime'][b]:.2f} |")
  lines += ["", "Boundary 0 is the token embedding; boundary l+1 is the output of layer l (before the final norm "
            "for the last one). Update ratio of layer l = mean ||h_{l+1} - h_l|| / ||h_l||.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  from train.cli import run_app
  run_app(run, "configs/survey.py", "Run directory (default runs/<date>-<model>).", typed=SurveyConfig)
