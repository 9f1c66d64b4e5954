"""Benchmark helpers whose correctness the benchmarks' ratios rest on (the timings themselves are not tests)."""
import collections

import numpy as np

from analysis.ioi.data import BABA_TEMPLATES, make_ioi
from benchmarks.patching_tl import equal_length_templates
from tests.reference import WordTokenizer


def test_equal_length_templates_give_unpadded_prompts_of_the_largest_length_group():
  tok = WordTokenizer()
  group = equal_length_templates(tok)
  # counted on the ABBA variants' text (the helper measures the BABA ones' token arrays): the same lengths
  words = {t: len(tok.encode(make_ioi(tok, 1, templates=[t], kind="ABBA").text[0], add_special_tokens=False))
           for t in range(len(BABA_TEMPLATES))}
  counts = collections.Counter(words.values())
  assert len(group) == max(counts.values()) and len({words[t] for t in group}) == 1
  d = make_ioi(tok, 64, seed=3, templates=group)
  assert d.mask.all() and d.tokens.shape[1] == words[group[0]]
  assert set(np.unique(d.template) % len(BABA_TEMPLATES)) <= set(group)
