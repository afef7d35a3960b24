"""`loopfm experiment-real`: its report holds the issue's JSON shape, computed from the
predictions it is given; its sources are named configurations run by the synthetic
experiments' runner; its flags are checked before any work."""

import numpy as np
import pytest

from conftest import loopfm, refusal
from loopfm.core.config import ConfigError
from loopfm.eval.baselines import BASELINES
from loopfm.experiments.plan import DEFAULT, real_experiment, real_sources
from loopfm.experiments.report import real_report

CLAIMS = DEFAULT["real"]["claims"]


def _seed(rng: np.random.Generator, n: int = 3000) -> dict[str, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(float)
    signal = y + rng.normal(0, 1.5, n)
    preds = {m: 1 / (1 + np.exp(-(signal * w + rng.normal(0, 0.3, n))))
             for m, w in (("fm", 3.0), ("popularity", 0.3), ("lr_item", 0.3), ("lr_user_item", 0.35), ("lr_rates", 0.3),
                          ("lr_rates_all", 0.45), ("gbdt", 0.5), ("base", 0.4), ("kd", 0.4), ("loopfm", 1.0), ("loopfm_kd", 1.0))}  # fmt: skip
    return {"label": y, **preds}


def test_the_report_has_main_baselines_and_claims_per_dataset_and_says_which_goals_hold():
    rng = np.random.default_rng(0)
    out = real_report({"comedy": [_seed(rng) for _ in range(3)]}, CLAIMS, reps=200)
    d = out["datasets"]["comedy"]
    assert out["seeds"] == 3
    assert set(d["main"]) == {"fm", "base", "kd", "loopfm", "loopfm_kd"}
    assert set(d["baselines"]) == set(BASELINES) and "gbdt" in d["baselines"]
    assert d["best_baseline"] == "gbdt"  # the sharpest baseline of _seed
    assert set(d["main"]["base"]["auc"]) >= {"mean", "std"}
    gain = d["claims"]["loopfm_kd_vs_kd"]["auc"]
    assert gain["relative"]["mean"] > 0.01 and gain["p_bootstrap"] < 0.05  # the sharper model wins by construction
    assert d["claims"]["base_vs_lr_rates"]["auc"]["relative"]["mean"] > 0  # the strongest regression is a claim too
    assert d["claims"]["fm_vs_gbdt"]["auc"]["relative"]["mean"] > 0
    goals = d["goals"]
    assert goals["fm_auc_ge_best_baseline_x1.01"] and goals["base_auc_ge_every_id_regression"] and goals["loopfm_auc_ge_base"]
    assert goals["loopfm_kd_auc_ge_kd_x1.005_p0.05"]
    # equally sharp: LoopFM + KD is not ahead of LoopFM by construction, so the goal is a coin toss; its value is what the means say
    assert goals["loopfm_kd_auc_ge_loopfm"] == (d["main"]["loopfm_kd"]["auc"]["mean"] >= d["main"]["loopfm"]["auc"]["mean"])


def test_a_weak_fm_misses_the_fm_goal():
    rng = np.random.default_rng(1)
    seeds = [_seed(rng) for _ in range(2)]
    for s in seeds:
        s["fm"] = s["gbdt"] * 0.999 + 0.0005  # level with the best baseline, not 1% above it
    d = real_report({"x": seeds}, CLAIMS, reps=50)["datasets"]["x"]
    assert not d["goals"]["fm_auc_ge_best_baseline_x1.01"]


def test_the_results_real_suite_names_movielens_and_ciao_verticals_each_a_world_of_its_own():
    sources = real_sources("results-real")
    assert list(sources) == ["comedy", "drama", "ciao-c1", "ciao-c10"]
    ciao = sources["ciao-c10"].options()
    assert ciao.fmt == "csv" and ciao.click_threshold == 5 and str(ciao.rule) == "category=10"
    assert ciao.roles == {"user_id": "user_id", "item_id": "item_id", "label": "rating", "timestamp": "timestamp", "category": "category"}
    worlds = {e.name: {c.world.path for c in e.points[0].cells.values()} for e in real_experiment(sources)}
    assert worlds["ciao-c1"] == {"ciao-c1/fm-default"} and worlds["comedy"] == {"comedy/fm-default"}
    with pytest.raises(ConfigError, match="--suite 'nope'"):
        real_sources("nope")


def test_a_malformed_dataset_flag_is_refused_by_name_without_a_trace(tmp_path):
    result = refusal("experiment-real", "--data", str(tmp_path), "--format", "movielens", "--dataset", "comedy",
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "--dataset 'comedy'" in result.stderr and "Traceback" not in result.stderr
    result = loopfm("experiment-real", "--suite", "results-real", "--data", str(tmp_path), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "--suite results-real names its data" in result.stderr
