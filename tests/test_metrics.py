"""Metrics: NE is 1 for the base rate, TR is the share of the FM's NE gain."""

import numpy as np
import pytest

from loopfm.eval.metrics import comparison_table, normalized_entropy, quality


def test_predicting_the_base_rate_has_ne_one_and_a_perfect_ranker_auc_one():
    y = np.array([0, 0, 0, 1] * 50)
    assert normalized_entropy(y, np.full(y.size, y.mean())) == pytest.approx(1.0)
    assert quality(y, y * 0.9 + 0.05)["auc"] == 1.0


def test_transfer_ratio_is_the_share_of_the_fm_gain():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.6, 20000)
    y = (rng.random(p.size) < p).astype(int)
    base = np.full(p.size, y.mean())
    fm = p
    half = 0.5 * base + 0.5 * p
    rows = comparison_table(y, {"base": base, "fm": fm, "half": half, "bayes": p})
    assert rows["base"]["tr"] == 0 and rows["fm"]["tr"] == pytest.approx(1)
    assert 0 < rows["half"]["tr"] < 1
    assert rows["half"]["tr"] == pytest.approx(rows["half"]["delta_ne"] / rows["fm"]["delta_ne"])
