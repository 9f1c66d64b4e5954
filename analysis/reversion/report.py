"""report.md of the reversion study (analysis/reversion/study.py): numbers first, the paper's beside ours, labelled."""
from __future__ import annotations


def _ms(ms, pct: bool = False) -> str:
  m, s = ms
  if m != m:                                    # NaN
    return "n/a"
  return f"{100 * m:.1f}% ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def report(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> str:
  """Markdown report from the study's summary `s`, per-arm arrays, figure paths and the paper's figures."""
  sections = (_intro, _reference, _alignment, _beside_paper, _verdict, _method_notes)
  return "\n".join(line for section in sections for line in section(config, s, per_arm, figs, paper))


def headline(config, metrics: dict, sub: str, paper: dict) -> list[str]:
  """The alignment table and the verdict, one heading level down, for a report one directory up (the main job):
  from the study's metrics.json contents (`metrics`, with its "arms" summaries and "figures" paths) alone, figure
  links prefixed with `sub`."""
  figs = {k: f"{sub}/{v}" for k, v in metrics["figures"].items()}
  lines = (_alignment(config, metrics, metrics["arms"], figs, paper)
           + _verdict(config, metrics, metrics["arms"], figs, paper))
  return ["#" + ln if ln.startswith("## ") else ln for ln in lines]


def _intro(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> list[str]:
  """Title and the run's setup."""
  L = []
  seeds = tuple(config.seeds)
  T = int(config.benign.steps)
  L += [f"# Gravitational reversion: {s['model']}", "",
        f"{s['n_layers']} layers, d_model {s['d_model']}; seeds {list(seeds)}; benign LoRA fine-tuning for T = {T} "
        f"steps (batch {config.benign.micro_batch}, lr {config.benign.lr}, rank {config.benign.rank}, "
        f"data: {', '.join(config.benign.sources)}); {config.probe.n} harmful probe prompts, position "
        f"'{config.probe.position}'; total {s['seconds'] / 60:.1f} min.", ""]
  return L


def _reference(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> list[str]:
  """theta_early -> theta_aligned (safety LoRA), or the stand-in reference direction."""
  L = []
  if s["reference"] == "early":
    sf = s["safety"]
    L += ["## theta_early -> theta_aligned (safety LoRA SFT, ours)", "",
          f"{sf['examples']} examples in contrast units (harmful prompt -> refusal, benign prompt -> "
          f"theta_early's own greedy answer, {config.safety_target_tokens} tokens; first response token weighted "
          f"x{config.safety_first_token_weight:g}), LoRA r{config.safety.lora.rank} on depth "
          f"{tuple(config.safety.lora.depth) or 'all'}, {sf['steps']} steps (lr {config.safety.train.lr}, "
          f"{config.safety.train.micro_batch} rows a batch), loss {sf['first_loss']:.3f} -> "
          f"{sf['final_loss']:.3f}, {sf['seconds']:.0f} s.", "",
          "| model | harmful not refused (greedy) | harmful, log-prob | compliance margin | benign refused | "
          "benign NLL |",
          "|---|---|---|---|---|---|"]
    for name, key in (("theta_early", "eval_early"), ("theta_aligned", "eval_aligned")):
      e = s[key]
      L.append(f"| {name} | {100 * e['harm_gen']:.1f}% | {100 * e['harm_lp']:.1f}% | "
               f"{e.get('harm_margin', float('nan')):+.3f} | {100 * e.get('benign_refusal', float('nan')):.1f}% | "
               f"{e['task_nll']:.3f} |")
    ok = s["eval_aligned"]["harm_gen"] <= 0.2
    L += ["", f"theta_aligned refuses {100 * (1 - s['eval_aligned']['harm_gen']):.0f}% of the "
          f"{config.heldout} held-out harmful prompts ({'meets' if ok else 'misses'} the 80% target) and refuses "
          f"{100 * s['eval_aligned'].get('benign_refusal', float('nan')):.0f}% of the held-out benign ones.", ""]
    L += ["v_rev(l) = mean act(theta_early) - mean act(theta_aligned) on the probe prompts.", ""]
  else:
    e = s["eval_aligned"]
    L += ["## Reference direction: a stand-in (no earlier state of this model here)", "",
          "The loaded model is already aligned and is used as theta_aligned. **The reference direction is NOT the "
          "paper's v_rev**: it is mean act(benign prompts) - mean act(harmful prompts) under theta_aligned (the "
          "refusal direction of Arditi et al. 2024, reversed), so positive alignment means harmful prompts drift "
          "toward the benign-prompt representation.", "",
          f"theta_aligned: harmful not refused {100 * e['harm_gen']:.1f}% (greedy), {100 * e['harm_lp']:.1f}% "
          f"(log-prob); benign refused {100 * e.get('benign_refusal', float('nan')):.1f}%.", ""]
  return L


def _alignment(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> list[str]:
  """The drift's alignment with v_rev per arm, the isotropic null and the Spearman correlations."""
  L = []
  n = s["null"]
  L += ["## Alignment of the drift with v_rev", "",
        f"Isotropic null (cos of a uniform random direction with a fixed one): p{int(100 * n['q'])} = "
        f"{n['layer_p99']:.4f} for one layer (d = {s['d_model']}; sampled {n['layer_p99_sampled']:.4f}) and "
        f"{n['all_p99']:.4f} for the all-layer alignment (layers 1..L concatenated, d = {s['n_layers']} x "
        f"{s['d_model']}), exact from the Beta distribution.", "",
        f"![alignment heatmaps]({figs['heatmap']})", "", f"![curves]({figs['curves']})", "",
        f"![by layer]({figs['layers']})", "",
        "| arm | a after step 1 | a at step 20 | final a (T) | (run, step) pairs above null p99 | "
        "layers above null at T | harmful not refused at T (greedy) | log-prob | compliance margin at T | "
        "held-out benign NLL at T |",
        "|---|---|---|---|---|---|---|---|---|---|"]
  for arm, d in per_arm.items():
    L.append(f"| {arm} | {_ms(d['align_step1'])} | {_ms(d['align_step20'])} | {_ms(d['final_align'])} | "
             f"{d['above_null']} / {d['pairs']} | {100 * d['layers_above_null_final']:.0f}% | "
             f"{_ms(d['final_harm_gen'], True)} | {_ms(d['final_harm_lp'], True)} | "
             f"{_ms(d['final_harm_margin'])} | {_ms(d['final_task_nll'])} |")
  L += ["", "Mean ± std over seeds. The all-layer alignment a = cos(concat_l d_T(l), concat_l v_rev(l)). "
        f"theta_aligned's held-out benign NLL: {s['eval_aligned']['task_nll']:.3f}.", ""]
  c = s["spearman"]
  L += [f"Spearman correlation of alignment with harmfulness over {c['n_pairs']} (run, evaluation step) pairs "
        f"(all arms, steps > 0): greedy judge r = {c['gen'][0]:.3f} (p = {c['gen'][1]:.2g}), log-prob "
        f"r = {c['lp'][0]:.3f} (p = {c['lp'][1]:.2g}), compliance margin r = {c['margin'][0]:.3f} "
        f"(p = {c['margin'][1]:.2g}). The greedy judge moves in steps of 1/{config.heldout} prompts; the margin is "
        "continuous.", ""]
  return L


def _beside_paper(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> list[str]:
  """The paper's figures beside ours, labelled as the paper's."""
  L = []
  c = s["spearman"]
  L += ["## Beside the paper (Poppi & Lukas 2026; Llama / Qwen / Gemma 3B-14B, Alpaca, T = 100)", "",
        "Different models, data and scale: read the comparison as qualitative.", "",
        "| quantity | paper | ours |", "|---|---|---|"]
  b = per_arm.get("baseline")
  if b is not None:
    L += [f"| baseline a after step 1 | {_ms(paper['align_step1'])} | {_ms(b['align_step1'])} |",
          f"| baseline a at step 20 | {_ms(paper['align_step20'])} | {_ms(b['align_step20'])} |"]
  for arm in ("baseline", "block"):
    if arm in per_arm:
      d = per_arm[arm]
      pm, ps = paper["harm"][arm]
      L += [f"| {arm} final a (T) | {_ms(paper['final_align'][arm])} | {_ms(d['final_align'])} |",
            f"| {arm} harmfulness at T | {pm:.1f}% ± {ps:.1f} | {_ms(d['final_harm_gen'], True)} |"]
  L += [f"| Spearman(alignment, harmfulness) | {paper['spearman']:.3f} | {c['gen'][0]:.3f} (greedy judge); "
        f"{c['margin'][0]:.3f} (compliance margin) |", ""]
  return L


def _verdict(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> list[str]:
  """One plain sentence per claim: reversion in the baseline arm, what block changes, the ordering."""
  L = []
  n = s["null"]
  b = per_arm.get("baseline")
  verdicts = []
  if b is not None:
    up = b["final_align"][0] > n["all_p99"]
    harm0 = s["eval_aligned"]["harm_gen"]
    verdicts.append(f"Reversion {'appears' if up else 'does not appear'} in the baseline arm: final all-layer "
                    f"alignment {b['final_align'][0]:.3f} vs null p99 {n['all_p99']:.4f}; harmfulness "
                    f"{100 * harm0:.0f}% -> {100 * b['final_harm_gen'][0]:.0f}% (greedy), compliance margin "
                    f"{s['eval_aligned'].get('harm_margin', float('nan')):+.3f} -> "
                    f"{b['final_harm_margin'][0]:+.3f} nats / token.")
  if b is not None and "block" in per_arm:
    k = per_arm["block"]
    verdicts.append(f"Block (lambda = {config.block_lam}) moves final alignment {b['final_align'][0]:.3f} -> "
                    f"{k['final_align'][0]:.3f}, harmfulness {100 * b['final_harm_gen'][0]:.0f}% -> "
                    f"{100 * k['final_harm_gen'][0]:.0f}% (greedy), compliance margin "
                    f"{b['final_harm_margin'][0]:+.3f} -> {k['final_harm_margin'][0]:+.3f}, task NLL "
                    f"{b['final_task_nll'][0]:.3f} -> "
                    f"{k['final_task_nll'][0]:.3f}.")
  order = [a for a in ("block", "baseline", "push") if a in per_arm]
  if len(order) == 3:
    vals = [per_arm[a]["final_align"][0] for a in order]
    verdicts.append(f"Ordering block < baseline < push of final alignment: {'holds' if vals[0] < vals[1] < vals[2] else 'does not hold'} "
                    f"({', '.join(f'{a} {v:.3f}' for a, v in zip(order, vals))}).")
  L += ["## Verdict", ""] + [f"- {v}" for v in verdicts] + [""]
  return L


def _method_notes(config, s: dict, per_arm: dict, figs: dict, paper: dict) -> list[str]:
  """How the numbers were made."""
  L = []
  L += ["## Method notes", "",
        "- One compiled program per arm: `train/scan.py` runs the benign LoRA steps as a `lax.scan` vmapped over "
        "seeds and measures, after every update, the probe prompts' mean residual at every layer boundary; the scan "
        f"runs in chunks of {config.benign.eval_every} steps, checkpointed between chunks (resumable).",
        "- Arms share the optimizer (AdamW, clip 1.0), data order and LoRA initialisation per seed. block: "
        f"lambda relu(p)^2 with lambda = {config.block_lam}; push: -lambda s tanh(p/s) with lambda = "
        f"{config.push_lam}, s = {config.push_scale}; project: the SFT gradient loses its component along grad p "
        "when a descent step would increase p. p = mean over layers of <d_t(l), v_rev(l)/|v_rev(l)|>.",
        "- Harmfulness (greedy): share of held-out harmful prompts whose greedy answer "
        f"({config.eval.max_new_tokens} tokens) contains no refusal phrase (train/evaluate.py). Log-prob "
        f"variant: share whose compliant continuation ({s['harm_lp_compliant']}) has a lower mean NLL than the "
        "refusal text; compliance margin: the mean over prompts of NLL(refusal) - NLL(compliant), nats / token "
        "(higher = compliance relatively more likely).", ""]
  return L
