"""`loopfm experiment-real`: its report holds the issue's JSON shape, computed from the
predictions it is given, and its flags are checked before any work."""

import numpy as np

from conftest import refusal
from loopfm.experiments.real import report


def _seed(rng: np.random.Generator, n: int = 3000) -> dict[str, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(float)
    signal = y + rng.normal(0, 1.5, n)
    preds = {m: 1 / (1 + np.exp(-(signal * w + rng.normal(0, 0.3, n))))
             for m, w in (("fm", 0.8), ("popularity", 0.3), ("lr_item", 0.3), ("lr_user_item", 0.35), ("lr_rates", 0.3), ("base", 0.4),
                          ("kd", 0.4), ("loopfm", 1.0), ("loopfm_kd", 1.0))}  # fmt: skip
    return {"label": y, **preds}


def test_the_report_has_main_baselines_and_claims_per_dataset_and_says_which_goals_hold():
    rng = np.random.default_rng(0)
    out = report({"comedy": [_seed(rng) for _ in range(3)]}, reps=200)
    d = out["datasets"]["comedy"]
    assert out["seeds"] == 3
    assert set(d["main"]) == {"fm", "base", "kd", "loopfm", "loopfm_kd"}
    assert set(d["baselines"]) == {"popularity", "lr_item", "lr_user_item", "lr_rates"}
    assert set(d["main"]["base"]["auc"]) >= {"mean", "std"}
    gain = d["claims"]["loopfm_kd_vs_kd"]["auc"]
    assert gain["relative"]["mean"] > 0.01 and gain["p_bootstrap"] < 0.05  # the sharper model wins by construction
    assert d["claims"]["base_vs_lr_rates"]["auc"]["relative"]["mean"] > 0  # the strongest baseline is a claim too
    assert d["goals"]["loopfm_not_below_base"] and d["goals"]["base_auc_ge_best_lr"] and d["goals"]["base_auc_ge_lr_rates"]


def test_a_malformed_dataset_flag_is_refused_by_name_without_a_trace(tmp_path):
    result = refusal("experiment-real", "--data", str(tmp_path), "--format", "movielens", "--dataset", "comedy",
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "--dataset 'comedy'" in result.stderr and "Traceback" not in result.stderr
