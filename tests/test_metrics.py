"""Metrics: NE is 1 for the base rate, TR is the share of the FM's NE gain."""

import numpy as np
import pytest

from loopfm.eval.metrics import comparison_table, quality


def test_ne_is_log_loss_over_the_entropy_of_the_observed_click_rate():
    y = np.array([0, 0, 0, 1] * 50)
    assert quality(y, np.full(y.size, y.mean()))["ne"] == pytest.approx(1.0)
    p = np.where(y == 1, 0.6, 0.2)
    log_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    entropy = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert quality(y, p)["ne"] == pytest.approx(log_loss / entropy)
    assert quality(y, p)["auc"] == 1.0


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
    assert rows["bayes"]["bayes_gap_closed"] == pytest.approx(1) and rows["base"]["bayes_gap_closed"] == 0
    assert rows["fm"]["bayes_gap_closed"] == pytest.approx(1)  # here the "FM" is the true probability
