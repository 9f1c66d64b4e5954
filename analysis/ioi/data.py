"""Indirect Object Identification (IOI) prompts after Wang et al. 2022 ("Interpretability in the Wild").

Templates, places and objects follow Redwood's public generator (`ioi_dataset.py`): 15 BABA templates, their
ABBA variants (first clause swapped), places {store, garden, restaurant, school, hospital, office, house,
station}, objects {ring, kiss, bone, basketball, computer, necklace, drink, snack}. Names, places and objects
are kept only when they are ONE token (with a leading space) in the model's tokenizer, so every prompt of a
template has the same length and the IO / S1 / S2 / END positions line up (needed for per-template means).

A prompt ends just before the indirect object: "When Mary and John went to the store, John gave a drink to"
-> IO = " Mary", S = " John". The ABC counterpart keeps template, place and object and replaces the three name
slots with three other distinct names (Wang et al.'s ABC distribution, used for mean ablation and patching).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)
ABBA_TEMPLATES = tuple(t.replace("[B] and [A]", "[A] and [B]", 1) for t in BABA_TEMPLATES)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
NAMES = tuple(
    "Mary John Alice Bob Tom James Sarah Michael David Emma Anna Paul Mark Lisa Kate Jack Ryan Adam Amy Laura "
    "Daniel Rachel Sam Max Ben Joe Dan Tim Jane Rose Grace Lucy Kevin Eric Steven Thomas Jessica Jennifer Robert "
    "William Richard Charles Joseph Matthew Anthony George Edward Brian Ronald Jason Jeffrey Frank Scott Andrew "
    "Peter Henry Carl Arthur Roger Victoria Elizabeth Sophie Olivia Emily Hannah Chris Alex Kelly Nick Jacob "
    "Ethan Luke Mike Patrick Sean".split())


@dataclasses.dataclass
class IOIPrompts:
  """A batch of IOI prompts and their ABC counterparts, tokenized and left-padded to a common length S.

  tokens, abc_tokens: `[N, S]` int32; mask: `[N, S]` int32 (1 = real token; the same for both).
  io, s: `[N]` int32 token ids of the indirect object and the subject (the answers compared by the logit
    difference logit(IO) - logit(S)).
  pos_io, pos_s1, pos_s2, pos_end: `[N]` int32 positions (in padded coordinates) of IO, first S, second S and
    the last token (where IO is predicted).
  template: `[N]` int32 template index (0..14 BABA, 15..29 ABBA).
  text, abc_text: the prompt strings.
  """
  tokens: np.ndarray
  abc_tokens: np.ndarray
  mask: np.ndarray
  io: np.ndarray
  s: np.ndarray
  pos_io: np.ndarray
  pos_s1: np.ndarray
  pos_s2: np.ndarray
  pos_end: np.ndarray
  template: np.ndarray
  text: list[str]
  abc_text: list[str]

  def __len__(self) -> int:
    return len(self.text)


def single_token_words(tokenizer, words: Sequence[str]) -> list[str]:
  """The words that encode to exactly one token with a leading space (" Mary")."""
  return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def split_names(names: Sequence[str], eval_fraction: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
  """Disjoint (train, eval) name lists, a seeded shuffle of `names`."""
  order = np.random.default_rng(seed).permutation(len(names))
  n_eval = max(3, int(round(eval_fraction * len(names))))
  names = [names[i] for i in order]
  return names[n_eval:], names[:n_eval]


def _fill(template: str, a: str, b: str, place: str, obj: str, s2: str | None = None) -> str:
  """Template with IO=a, S=b; the prompt stops before the final ' [A]'. s2 overrides the second [B]."""
  body = template[: template.rindex("[A]")].rstrip()
  body = body.replace("[PLACE]", place).replace("[OBJECT]", obj)
  first = body.index("[B]")
  second = body.index("[B]", first + 3)
  body = body[:second] + (s2 if s2 is not None else b) + body[second + 3:]
  return body.replace("[A]", a).replace("[B]", b)


def make_ioi(tokenizer, n: int, *, seed: int = 0, kind: str = "mixed", names: Sequence[str] | None = None,
             templates: Sequence[int] | None = None) -> IOIPrompts:
  """Generate `n` IOI prompts with ABC counterparts, deterministic in `seed`.

  Args:
    tokenizer: a transformers tokenizer (names/places/objects are filtered to single tokens with it).
    n: number of prompts.
    seed: numpy seed for the sampling of template, names, place and object.
    kind: "BABA", "ABBA" or "mixed" (each prompt picks one at random).
    names: the name pool (default NAMES), e.g. one side of `split_names` for disjoint train/eval names.
    templates: restrict to these template indices (0..14).

  Raises:
    ValueError: fewer than 5 single-token names (an ABC prompt needs 3 names besides IO and S), no usable
      place/object, or an unknown kind.
  """
  if kind not in ("BABA", "ABBA", "mixed"):
    raise ValueError(f"kind must be BABA, ABBA or mixed, got {kind!r}")
  pool = single_token_words(tokenizer, names or NAMES)
  places, objects = single_token_words(tokenizer, PLACES), single_token_words(tokenizer, OBJECTS)
  if len(pool) < 5:
    raise ValueError(f"only {len(pool)} single-token names ({pool}); IOI + ABC needs at least 5")
  if not places or not objects:
    raise ValueError("no single-token place or object in this tokenizer")
  tids = list(templates) if templates is not None else list(range(len(BABA_TEMPLATES)))
  rng = np.random.default_rng(seed)
  rows, abc_rows, meta = [], [], []
  for _ in range(n):
    t = int(rng.choice(tids))
    abba = kind == "ABBA" or (kind == "mixed" and rng.random() < 0.5)
    template = (ABBA_TEMPLATES if abba else BABA_TEMPLATES)[t]
    a, b, c, d, e = (pool[i] for i in rng.choice(len(pool), 5, replace=False))
    place, obj = places[rng.integers(len(places))], objects[rng.integers(len(objects))]
    text = _fill(template, a, b, place, obj)
    abc = _fill(template, c, d, place, obj, s2=e)
    rows.append(text)
    abc_rows.append(abc)
    meta.append((t + (len(BABA_TEMPLATES) if abba else 0), a, b))
  enc = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
  abc_enc = [tokenizer.encode(r, add_special_tokens=False) for r in abc_rows]
  S = max(len(x) for x in enc)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  toks = np.full((n, S), pad, np.int32)
  abc_toks = np.full((n, S), pad, np.int32)
  mask = np.zeros((n, S), np.int32)
  out = {k: np.zeros(n, np.int32) for k in ("io", "s", "pos_io", "pos_s1", "pos_s2", "pos_end", "template")}
  for i, (x, y, (t, a, b)) in enumerate(zip(enc, abc_enc, meta)):
    if len(x) != len(y):
      raise ValueError(f"prompt {i}: ABC counterpart tokenizes to {len(y)} tokens, prompt to {len(x)}")
    off = S - len(x)
    toks[i, off:], abc_toks[i, off:], mask[i, off:] = x, y, 1
    io = tokenizer.encode(" " + a, add_special_tokens=False)[0]
    s = tokenizer.encode(" " + b, add_special_tokens=False)[0]
    s_pos = [j for j, tok in enumerate(x) if tok == s]
    io_pos = [j for j, tok in enumerate(x) if tok == io]
    if len(s_pos) != 2 or len(io_pos) != 1:
      raise ValueError(f"prompt {i} {rows[i]!r}: expected S twice and IO once as single tokens")
    out["io"][i], out["s"][i] = io, s
    out["pos_io"][i], out["pos_s1"][i], out["pos_s2"][i] = off + io_pos[0], off + s_pos[0], off + s_pos[1]
    out["pos_end"][i], out["template"][i] = S - 1, t
  return IOIPrompts(tokens=toks, abc_tokens=abc_toks, mask=mask, text=rows, abc_text=abc_rows, **out)



@dataclasses.dataclass
class ABCReference:
  """A separate ABC dataset for mean ablation (Wang et al. 2022 Sec. 3: means over the ABC distribution), left-
  padded to the evaluation prompts' length S so that position s of every row lines up with position s of an
  evaluation prompt of the same template.

  tokens, mask: `[M, S]` int32; template: `[M]` int32 base template index 0..14 (the ABC prompts of a BABA
  template and of its ABBA variant are one distribution: three fresh distinct names either way); text: the M
  prompts.
  """
  tokens: np.ndarray
  mask: np.ndarray
  template: np.ndarray
  text: list[str]

  def __len__(self) -> int:
    return len(self.text)


def make_abc_reference(tokenizer, n_per_template: int, length: int, templates: Sequence[int], *, seed: int = 0,
                       names: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> ABCReference:
  """`n_per_template` ABC prompts for every base template in `templates` (ids 0..29, taken mod 15), none of
  them in `exclude` (pass the evaluation prompts and their ABC counterparts: the mean is then over a separate
  set, not the evaluation prompts' own counterparts), left-padded to `length`.

  Raises:
    ValueError: a template's prompts tokenize to different lengths or to more than `length` tokens, fewer than
      3 single-token names, or `n_per_template` distinct prompts outside `exclude` cannot be drawn (1000 tries
      per prompt).
  """
  pool = single_token_words(tokenizer, names or NAMES)
  places, objects = single_token_words(tokenizer, PLACES), single_token_words(tokenizer, OBJECTS)
  if len(pool) < 3 or not places or not objects:
    raise ValueError(f"ABC reference needs 3 single-token names and a place and object, got {len(pool)} names")
  rng = np.random.default_rng(seed)
  banned, rows, tids = set(exclude), [], []
  for t in sorted({int(x) % len(BABA_TEMPLATES) for x in templates}):
    for _ in range(n_per_template):
      for _try in range(1000):
        c, d, e = (pool[i] for i in rng.choice(len(pool), 3, replace=False))
        text = _fill(BABA_TEMPLATES[t], c, d, places[rng.integers(len(places))],
                     objects[rng.integers(len(objects))], s2=e)
        if text not in banned:
          break
      else:
        raise ValueError(f"template {t}: no ABC prompt outside `exclude` in 1000 draws")
      banned.add(text)
      rows.append(text)
      tids.append(t)
  enc = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  toks, mask = np.full((len(rows), length), pad, np.int32), np.zeros((len(rows), length), np.int32)
  for t in set(tids):
    lens = {len(x) for x, u in zip(enc, tids) if u == t}
    if len(lens) != 1 or max(lens) > length:
      raise ValueError(f"template {t}: ABC prompts tokenize to {sorted(lens)} tokens; need one length <= {length}")
  for i, x in enumerate(enc):
    toks[i, length - len(x):], mask[i, length - len(x):] = x, 1
  return ABCReference(tokens=toks, mask=mask, template=np.asarray(tids, np.int32), text=rows)
