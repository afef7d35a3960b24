"""The experiment machinery on a tiny world: schema, statistics across seeds, cache reuse.
(The real experiments are `make results`; these only check the machinery is right.)"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from loopfm.contract.codec import code_bytes, decode_codes, encode_codes
from loopfm.contract.tensorize import decode_fm_history
from loopfm.experiments.plan import MAIN
from loopfm.experiments.runner import _link, drop_checkpoints
from loopfm.experiments.stats import paired_bootstrap, paired_ttest, ratio_of_means, summary, weighted_auc, weighted_ne

TINY = (
    ("world.n_users", 250), ("world.n_days", 10), ("fm.warmup_days", 3), ("vm.eval_days", 3),
    ("vm.epochs", 1), ("vm.history_length", 8), ("fm.passes_per_day", 1),
    ("fm.warmup_epochs", 4),  # a quick FM (early stopping ran 12 of 20): the machinery is the subject
)  # fmt: skip


def test_weighted_metrics_match_unweighted_definitions():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.2).astype(float)
    p = np.round(rng.random(3000) * 0.5 + 0.2 * y, 2)  # rounded: many ties
    ones = np.ones((1, y.size))
    assert weighted_auc(y, p, ones)[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # integer weights = repeating rows
    w = rng.integers(0, 3, y.size)
    assert weighted_auc(y, p, w[None].astype(float))[0] == pytest.approx(roc_auc_score(np.repeat(y, w), np.repeat(p, w)))
    base = y.mean()
    ll = -np.mean(y * np.log(p.clip(1e-7)) + (1 - y) * np.log((1 - p).clip(1e-7)))
    assert weighted_ne(y, p, ones)[0] == pytest.approx(ll / -(base * np.log(base) + (1 - base) * np.log(1 - base)))


def test_paired_tests():
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.3).astype(float)
    good = np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.1, y.size), 0.01, 0.99)
    noise = np.clip(0.3 + rng.normal(0, 0.1, y.size), 0.01, 0.99)
    clear = paired_bootstrap([y, y], [(1, [good, good]), (-1, [noise, noise])], "auc", reps=200)
    assert clear["p"] <= 0.01 and clear["ci95"][0] > 0
    same = paired_bootstrap([y], [(1, [noise]), (-1, [noise])], "ne", reps=50)
    assert same["p"] == 1.0
    t = 2.5  # differences 0.01, 0.03, 0.01: mean 1/60, standard error 1/150
    assert paired_ttest([0.61, 0.63, 0.62], [0.60, 0.60, 0.61]) == pytest.approx(1 - t / np.sqrt(2 + t**2))  # 2 dof, closed form
    assert paired_ttest([0.61, 0.62, 0.63], [0.60, 0.61, 0.62]) == 0.0  # a constant gain
    assert paired_ttest([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert summary([1.0, 2.0, 4.0])["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))


def test_ratio_of_means_is_nan_without_a_warning_when_the_denominator_is_zero():
    assert ratio_of_means([0.2, 0.4], [0.1, 0.2]) == pytest.approx(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide-by-zero RuntimeWarning would fail here
        assert np.isnan(ratio_of_means([0.2, 0.4], [0.1, -0.1]))


def test_fp32_and_int4_codes_round_trip_through_histories():
    z = np.linspace(-0.99, 0.99, 5 * 8).reshape(5, 8).astype(np.float32)
    for fmt, expected, tolerance in (("fp32", z, 0.0), ("int4", np.clip(z, -1, 7 / 8), 1 / 16 + 1e-6)):
        stored = encode_codes(z, fmt)  # int4 levels end at 7/8
        assert stored.dtype == np.uint8 and stored.shape == (5, code_bytes(8, fmt))
        assert np.abs(decode_codes(stored, fmt) - expected).max() <= tolerance
        values, mask = decode_fm_history([stored.tobytes(), None], 3, 8, fmt)  # newest 3 codes, right-aligned
        np.testing.assert_array_equal(values[0], decode_codes(stored[2:], fmt))
        assert mask.tolist() == [[1, 1, 1], [0, 0, 0]]


@pytest.fixture(scope="module")
def main_experiment(tmp_path_factory) -> tuple[Path, dict]:
    """The main experiment on the tiny world, two seeds, trained once: (its folder, with runs/
    and docs/, and the results)."""
    from loopfm.experiments.main import run_experiments

    folder = tmp_path_factory.mktemp("main_experiment")
    return folder, run_experiments(folder / "runs", folder / "docs", seeds=2, jobs=1, names=("main",), overrides=TINY, command="test")


def copy_of(main_experiment: tuple[Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the finished main experiment: (runs, docs)."""
    shutil.copytree(main_experiment[0], tmp_path, dirs_exist_ok=True)
    return tmp_path / "runs", tmp_path / "docs"


def test_experiment_on_a_tiny_world_two_seeds_and_cache(main_experiment, tmp_path):
    from loopfm.experiments.main import run_experiments

    out, docs = copy_of(main_experiment, tmp_path)
    results = main_experiment[1]
    saved = json.loads((docs / "results.json").read_text())
    assert saved["seeds"] == 2 and saved["impressions"] > 0
    assert set(saved["main"]) == {"base", "kd", "loopfm", "loopfm_kd", "fm"}
    for row in saved["main"].values():
        assert {"auc", "ne", "tr"} <= set(row) and {"mean", "std"} <= set(row["auc"]) and len(row["auc"]["values"]) == 2
    # std is the sample std across the seeds' own results
    aucs = [json.loads((out / f"seed{s}/fm-default/cells/loopfm_kd__default/result.json").read_text())["quality"]["auc"]
            for s in range(2)]  # fmt: skip
    assert saved["main"]["loopfm_kd"]["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert saved["main"]["loopfm_kd"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert saved["main"]["fm"]["tr"]["mean"] == pytest.approx(1.0)
    # each claim's p-values are those of its own cells: recomputed from the per-seed files
    y = [pd.read_parquet(out / f"seed{s}" / MAIN.path / "eval.parquet")["label"].to_numpy() for s in range(2)]
    for claim in saved["main_claims"]:
        cells = {c: [out / f"seed{s}" / claim[c] for s in range(2)] for c in ("better", "worse")}
        pred = {c: [np.load(d / "pred.npy").astype(np.float64) for d in dirs] for c, dirs in cells.items()}
        for metric, sign in (("auc", 1), ("ne", -1)):
            a, b = ([json.loads((d / "result.json").read_text())["quality"][metric] for d in cells[c]] for c in ("better", "worse"))
            assert claim[metric]["p_ttest"] == pytest.approx(paired_ttest(a, b), abs=1e-12)
            boot = paired_bootstrap(y, [(sign, pred["better"]), (-sign, pred["worse"])], metric, reps=1000)
            assert claim[metric]["p_bootstrap"] == boot["p"]
    assert "## Main table" in (docs / "results.md").read_text() and (docs / "results" / "main.png").stat().st_size > 0
    fm_goal = saved["goals"]["fm_closes_half_bayes_gap"]
    assert fm_goal["met"] == (saved["main"]["fm"]["bayes_gap_closed"]["mean"] >= 0.5)
    assert "FM closes >= 50%" in (docs / "results.md").read_text()

    # A second invocation reuses every finished cell: nothing is retrained, same numbers.
    cell = out / "seed0/fm-default/cells/kd__default/result.json"
    before = cell.stat().st_mtime_ns
    again = run_experiments(out, docs, seeds=2, jobs=1, names=("main",), overrides=TINY, command="test again")
    assert cell.stat().st_mtime_ns == before
    assert again["main"] == results["main"]
    assert [i["from_scratch"] for i in again["run"]["invocations"]] == [True, False]
    assert "; then `test again`" in (docs / "results.md").read_text()  # the header names every invocation


def test_sweeps_run_on_a_smaller_world_read_against_its_own_base_vm_and_fm(main_experiment, tmp_path):
    """Added to a finished main experiment (its cells reused), as a later invocation would."""
    from loopfm.eval.metrics import quality
    from loopfm.experiments.main import run_experiments
    from loopfm.experiments.plan import World, sweep_scale

    out, docs = copy_of(main_experiment, tmp_path)
    results = run_experiments(out, docs, seeds=2, jobs=1, names=("main", "vm_size"), overrides=TINY, command="test")
    home = World(scale=sweep_scale(dict(TINY)["world.n_users"]))
    assert home.path == "n_users=125/fm-default"
    (sweep,) = results["sweep_worlds"]
    assert sweep["path"] == home.path and 0 < sweep["impressions"] < results["impressions"]
    default = next(p for p in results["vm_size"]["points"] if p["label"] == "default")["cells"]["loopfm_kd"]
    tr = []
    for s in range(2):
        d = out / f"seed{s}" / home.path
        ne = {c: json.loads((d / f"cells/{c}__default/result.json").read_text())["quality"]["ne"] for c in ("base", "loopfm_kd")}
        frame = pd.read_parquet(d / "eval.parquet")
        fm_ne = quality(frame["label"].to_numpy(), frame["fm"].to_numpy())["ne"]
        tr.append((ne["base"] - ne["loopfm_kd"]) / (ne["base"] - fm_ne))
    assert default["tr"]["mean"] == pytest.approx(np.mean(tr))  # against the sweep world's base VM and FM
    md = (docs / "results.md").read_text()
    assert "*On the sweep world*" in md.split("## VM size")[1] and "n_users=125" in md.split("## Goals")[0]


def _step(label: str, auc: float, p_t: float, p_boot: float) -> dict:
    side = {"relative": {"mean": auc, "std": 0.01, "n": 5}, "p_ttest": p_t, "p_bootstrap": p_boot}
    return {"label": label, "auc": side, "ne": {**side, "relative": {"mean": 0.0, "std": 0.01, "n": 5}}}


def test_the_l_goal_fails_only_when_a_longer_history_is_significantly_worse_on_both_tests():
    from loopfm.experiments.plan import DEFAULT, bench_overrides, build_experiments
    from loopfm.experiments.report import length_goal
    from loopfm.experiments.runner import run_config

    (length,) = build_experiments(("length",), run_config(bench_overrides(DEFAULT), 0))
    steps = [c for c in length.claims if c.worse.variant == "loopfm_kd"]
    # one claim per step to the next longer L, each between two VM + LoopFM + KD cells
    assert [c.label for c in steps] == [f"L={b} vs L={a} (LoopFM+KD)" for a, b in zip((5, 10, 25, 50), (10, 25, 50, 100))]
    assert all(c.better.variant == "loopfm_kd" for c in steps)
    gains = [{"label": c.label} for c in length.claims if c.worse.variant == "kd"]
    flat = [_step(c.label, +0.001, 0.5, 0.5) for c in steps]

    def goal(last: dict) -> dict:
        return length_goal(length, {"claims": gains + flat[:-1] + [last]})

    noisy = goal(_step("L=100 vs L=50 (LoopFM+KD)", -0.005, 0.30, 0.005))  # the bootstrap alone is not enough
    assert noisy["met"] and noisy["worst_step"]["label"] == "L=100 vs L=50 (LoopFM+KD)"
    assert not goal(_step("L=100 vs L=50 (LoopFM+KD)", -0.005, 0.01, 0.005))["met"]
    assert goal(_step("L=100 vs L=50 (LoopFM+KD)", +0.005, 0.01, 0.005))["met"]  # significantly better is fine


def test_cells_of_different_scales_are_never_paired():
    from loopfm.experiments.plan import Cell, World
    from loopfm.experiments.report import claim_stats

    with pytest.raises(ValueError, match="different scales"):
        claim_stats([], Cell(World(scale=(("world.n_users", 9),)), "kd"), Cell(MAIN, "kd"), reps=10)


def test_bad_experiment_flags_are_named(tmp_path):
    from loopfm.experiments.main import run_experiments

    with pytest.raises(ValueError, match="--experiments"):
        run_experiments(tmp_path, tmp_path, 2, 1, ("main", "nope"), (), "x")
    with pytest.raises(ValueError, match="--seeds"):
        run_experiments(tmp_path, tmp_path, 1, 1, ("main",), (), "x")


def test_a_cell_cached_by_an_untimed_run_is_trained_again_when_a_timed_experiment_needs_its_model(tmp_path):
    from loopfm.experiments.plan import Cell
    from loopfm.experiments.runner import _cell_done

    (tmp_path / "result.json").write_text("{}")  # trained for the main table: no model.onnx
    assert _cell_done(tmp_path, Cell(MAIN, "kd")) and not _cell_done(tmp_path, Cell(MAIN, "kd", latency=True))
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    assert _cell_done(tmp_path, Cell(MAIN, "kd", latency=True))


def test_experiments_are_named_configurations_whose_default_overrides_fall_back_to_the_home_world():
    """A point's override equal to the bench config is no override (the cell is the default
    world's); a VM history longer than the world stores is logged by a world of its own; a
    claim naming no `point/cell` is refused naming the experiment."""
    from loopfm.core.config import ConfigError
    from loopfm.experiments.plan import DEFAULT, World, build_experiments
    from loopfm.experiments.runner import run_config

    cfg = run_config((), 0)
    config = {**DEFAULT, "experiments": {"probe": {
        "title": "probe", "cells": ["kd", "loopfm_kd"], "vary": ["loopfm_kd"], "gains": True,
        "points": [{"label": "same", "log": {"fm.code_format": cfg.fm.code_format}},
                   {"label": "longer", "vm": {"vm.history_length": cfg.vm.history_length * 2}},
                   {"label": "delay", "log": {"fm.logging_delay_s": 0}, "vary": ["kd", "loopfm_kd"]}],
        "claims": [["longer vs same", "longer/loopfm_kd", "same/loopfm_kd"]]}}}  # fmt: skip
    (probe,) = build_experiments(("probe",), cfg, config)
    same, longer, delay = (p.cells for p in probe.points)
    assert same["loopfm_kd"].world == World() and same["kd"] == longer["kd"]  # kd does not vary
    assert longer["loopfm_kd"].world == World(log=(("vm.history_length", cfg.vm.history_length * 2),)) and longer["loopfm_kd"].vm == ()
    assert delay["kd"].world == delay["loopfm_kd"].world == World(log=(("fm.logging_delay_s", 0),))
    assert [c.label for c in probe.claims] == ["same: LoopFM+KD vs KD", "longer: LoopFM+KD vs KD", "delay: LoopFM+KD vs KD", "longer vs same"]
    config["experiments"]["probe"]["claims"] = [["x", "longer/fm", "same/kd"]]
    with pytest.raises(ConfigError, match="probe: claim names 'longer/fm'"):
        build_experiments(("probe",), cfg, config)


def test_a_resumed_run_keeps_a_logged_worlds_link_to_dropped_checkpoints(tmp_path):
    """A world's `fm/checkpoints` links to its root's; once every world is logged the root's
    checkpoints are dropped and the link dangles. Resuming the run leaves it as it is (making
    it again stopped the run with FileExistsError)."""
    root, world = tmp_path / "root", tmp_path / "root" / "log-history_length=100"
    (root / "fm" / "checkpoints").mkdir(parents=True)
    link = world / "fm" / "checkpoints"
    _link(root / "fm" / "checkpoints", link)
    drop_checkpoints(root)
    assert link.is_symlink() and not link.exists()
    _link(root / "fm" / "checkpoints", link)
    (root / "fm" / "checkpoints").mkdir()  # trained again: the same link reads the new checkpoints
    assert link.resolve() == (root / "fm" / "checkpoints").resolve()
