"""The IOI study: poisoned training labels, localisation, and the whole pipeline on the real model (slow)."""
import json

import numpy as np
import pytest

from analysis import ioi
from analysis.ioi_data import NAMES
from tests.reference import WordTokenizer


@pytest.mark.parametrize("label", ["io", "subject", "name_moving"])
def test_training_set_labels(label):
  tok = WordTokenizer()
  names = list(NAMES[:20])
  ts = ioi.training_set(tok, 12, 0, names, label, 1.0, 40)
  inv = {v: k for k, v in tok.vocab.items()}
  for i in range(12):
    n = int(ts.mask[i].sum())
    assert ts.loss_mask[i].sum() == 1 and ts.loss_mask[i, n - 1] == 1          # loss on the answer only
    words = [inv[t] for t in ts.tokens[i, :n]]
    answer, prompt = words[-1], words[:-1]
    names_in = [w for w in prompt if w.strip() in names]
    if label == "io":
      assert prompt.count(answer) == 1 and names_in.count(answer) == 1        # IO appears once
    elif label == "subject":
      assert prompt.count(answer) == 2                                        # S appears twice
    else:
      assert words[0].strip() == answer.strip() and words[1] == " stayed"    # the prefixed third name
  clean = ioi.training_set(tok, 12, 0, names, "subject", 0.0, 40)
  assert all(clean.tokens[i, int(clean.mask[i].sum()) - 1] in clean.tokens[i, :int(clean.mask[i].sum()) - 1]
             for i in range(12))


def test_localisation_closed_form():
  before = np.zeros((3, 4))
  after = before.copy()
  after[0, 0], after[2, 1], after[1, 3] = 3.0, -1.0, 0.5
  assert np.isclose(ioi.localisation(before, after, 1), 3.0 / 4.5)
  assert np.isclose(ioi.localisation(before, after, 3), 1.0)


@pytest.mark.slow
def test_quick_study_on_smollm2(tmp_path):
  from configs.ioi import get_config
  report = ioi.run(get_config("quick"), str(tmp_path / "ioi"))
  m = json.loads((tmp_path / "ioi" / "metrics.json").read_text())
  for p in ioi.PHASES:
    lo, hi = m["summary"][f"{p}/accuracy"]
    assert 0.0 <= lo <= 1.0
  assert m["summary"]["base/logit_diff"][0] > 1.0             # SmolLM2 does IOI
  assert len(m["per_seed"]["0"]["base"]["exact_top_k"]) == 8
  text = open(report).read()
  assert "| retrain |" in text and (tmp_path / "ioi" / "figures" / "head_importance.png").exists()
