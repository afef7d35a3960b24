"""Training that generalises: a time-ordered validation split inside the training window,
early stopping that restores the best epoch, baselines on the same rows, and an FM that
reads ids it never trained on as unknown while later checkpoints learn late users."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from loopfm.core.config import RunConfig
from loopfm.eval.baselines import BASELINES, baseline_predictions, rates_so_far
from loopfm.fm.log import checkpoint_index, log_embeddings
from loopfm.fm.train import checkpoint_path, stream_periods, train_fm
from loopfm.core.files import read_parquet, write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import unix_us
from loopfm.core.training import EarlyStopping, time_split


def test_validation_rows_are_the_newest_of_the_training_window_and_never_from_the_eval_window(built_run):
    paths, cfg = RunPaths(built_run), RunConfig.load(built_run)
    train = read_parquet(paths.features / "vm_train_entities.parquet")
    eval_start = unix_us(read_parquet(paths.features / "vm_eval_entities.parquet")["event_timestamp"]).min()
    t = unix_us(train["event_timestamp"]).to_numpy()
    fit, val = time_split(t, cfg.vm.validation_fraction)
    assert len(val) == round(len(t) * cfg.vm.validation_fraction) and len(fit) + len(val) == len(t)
    assert t[fit].max() <= t[val].min() and t[val].max() < eval_start


def test_a_split_that_leaves_nothing_to_fit_or_validate_is_refused():
    with pytest.raises(ValueError, match="empty"):
        time_split(np.arange(5), 0.01)


def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_weights():
    model = torch.nn.Linear(1, 1)
    stopping = EarlyStopping(patience=2)
    stops = []
    for epoch, loss in enumerate([0.9, 0.5, 0.6, 0.7, 0.4], start=1):
        torch.nn.init.constant_(model.weight, float(epoch))
        stops.append(stopping.update(loss, model))
        if stops[-1]:
            break
    assert stops == [False, False, False, True]  # epoch 0.4 is never reached
    stopping.restore(model)
    assert model.weight.item() == 2.0 and stopping.best_epoch == 2 and stopping.epochs == 4


def test_each_trained_vm_records_the_epoch_it_restored(trained_run):
    for variant in ("base", "kd", "loopfm", "loopfm_kd"):
        fit = json.loads((RunPaths(trained_run).vm / variant / "training.json").read_text())
        assert 0 <= fit["best_epoch"] <= fit["epochs_run"] == len(fit["val_logloss"]) - 1  # entry 0 = the initial weights
        assert fit["best_val_logloss"] == min(fit["val_logloss"])
        assert fit["refit_epochs"] == fit["best_epoch"]  # vm.refit: then trained afresh on the whole window


def test_baselines_are_fitted_on_training_rows_only_and_learn_item_quality():
    rng = np.random.default_rng(0)
    quality = rng.uniform(0.05, 0.9, 40)
    n = 6000
    items = rng.integers(0, 40, n)
    frame = pd.DataFrame({"impression_id": np.arange(n), "user_id": rng.integers(0, 50, n), "item_id": items, "vertical": "shop",
                          "label": (rng.random(n) < quality[items]).astype(int),
                          "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="s")})  # fmt: skip
    train, rows = frame.iloc[:5000], frame.iloc[5000:]
    predictions = baseline_predictions(train, rows.drop(columns="label"), 0.1, impressions=frame)
    assert set(predictions) == set(BASELINES)
    for p in predictions.values():
        assert np.corrcoef(p, quality[rows["item_id"]])[0, 1] > 0.9
    assert set(baseline_predictions(train, rows, 0.1)) == set(BASELINES) - {"lr_rates", "lr_rates_all", "gbdt"}  # they need the impressions


def test_the_gbdt_and_lr_rates_all_baselines_read_the_users_rate_in_every_vertical_and_lr_rates_does_not():
    """A user's propensity shows in the busy vertical "b" and decides clicks in the sparse "a"
    (a user's first or second event there): only the trees and `lr_rates_all` see the rate over
    every vertical."""
    from sklearn.metrics import roc_auc_score

    from loopfm.eval.baselines import RATES, gradient_boosting, rate_regression

    rng = np.random.default_rng(1)
    users, n = 2000, 40000
    propensity = rng.uniform(0.05, 0.95, users)
    user = rng.integers(0, users, n)
    frame = pd.DataFrame({"impression_id": np.arange(n), "user_id": user, "item_id": rng.integers(0, 50, n),
                          "vertical": np.where(rng.random(n) < 0.05, "a", "b"), "label": (rng.random(n) < propensity[user]).astype(int),
                          "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="s")})  # fmt: skip
    target = frame[frame["vertical"] == "a"]
    train, rows = target.iloc[: len(target) // 2], target.iloc[len(target) // 2 :]
    rates = rates_so_far(frame)
    auc = {name: roc_auc_score(rows["label"], p) for name, p in (("lr_rates", rate_regression(train, rows, rates)),
                                                                   ("lr_rates_all", rate_regression(train, rows, rates, RATES)),
                                                                   ("gbdt", gradient_boosting(train, rows, rates, 0.2)))}  # fmt: skip
    assert auc["gbdt"] > auc["lr_rates"] + 0.05, auc
    assert auc["lr_rates_all"] > auc["lr_rates"] + 0.05, auc


def test_the_rates_so_far_count_only_impressions_strictly_before_per_user_vertical_and_per_item():
    t = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta([0, 1, 1, 2, 3], unit="s")
    imp = pd.DataFrame({"impression_id": [10, 11, 12, 13, 14], "user_id": [1, 1, 2, 1, 1], "item_id": [7, 7, 7, 8, 7],
                        "vertical": ["a", "a", "a", "a", "b"], "label": [1, 0, 1, 1, 1], "event_timestamp": t})  # fmt: skip
    rates = rates_so_far(imp)
    odds = lambda k, n: np.log((k + 1) / (n - k + 1))  # noqa: E731
    # user 1 in "a": nothing, then one click (same-time impression 12 is another user's), then 1 of 2
    np.testing.assert_allclose(rates.loc[[10, 11, 13, 14], "user_rate"], [odds(0, 0), odds(1, 1), odds(1, 2), odds(0, 0)])
    # item 7 by every user: 11 and 12 share a time, so neither counts the other
    np.testing.assert_allclose(rates.loc[[10, 11, 12, 14], "item_rate"], [odds(0, 0), odds(1, 1), odds(1, 1), odds(2, 3)])
    # user 1 over every vertical: 14 ("b") counts 10, 11 and 13 of "a"
    np.testing.assert_allclose(rates.loc[[10, 13, 14], "user_all_rate"], [odds(0, 0), odds(1, 2), odds(2, 3)])


def test_the_quality_table_carries_the_baselines(trained_run):
    rows = json.loads((RunPaths(trained_run).results / "quality.json").read_text())["models"]
    assert set(BASELINES) <= set(rows) and {"base", "fm", "bayes"} <= set(rows)


def test_a_late_user_is_unknown_to_the_frozen_checkpoint_and_known_to_the_rolling_ones_after_their_first_day(copy_of_run):
    paths, cfg = RunPaths(copy_of_run), RunConfig.load(copy_of_run)
    start_us = pd.Timestamp(cfg.world.start_date, tz="UTC").value // 1000
    imp = read_parquet(paths.table("impressions"))
    day = (unix_us(imp["event_timestamp"]) - start_us) // 86_400_000_000
    arrival = cfg.fm.warmup_days + 2
    late = np.arange(20)  # these users arrive two days after the warm-up: drop their earlier events
    write_parquet(imp[~(imp["user_id"].isin(late) & (day < arrival))].reset_index(drop=True), paths.table("impressions"))
    cfg.fm.warmup_epochs = 1  # which users a checkpoint knows follows the days it trained on, not the epochs
    train_fm(paths, cfg, progress=False)

    def known(index: int) -> np.ndarray:
        return torch.load(checkpoint_path(paths, index), weights_only=False)["known_users"][late]

    assert not known(cfg.fm.warmup_days).any() and not known(arrival).any()
    assert known(arrival + 1).all()  # trained on days [0, arrival]: their first day included
    cfg.fm.checkpoint_scheme = "rolling"
    log = log_embeddings(paths, cfg, progress=False)
    first_seen = log[log["user_id"].isin(late)].groupby("user_id")["event_timestamp"].transform("min")
    mine = log[log["user_id"].isin(late)].assign(first_seen=first_seen)
    later_days = mine[mine["event_timestamp"].dt.floor("D") > mine["first_seen"].dt.floor("D")]
    assert len(later_days) and (later_days["fm_trained_until"] > later_days["first_seen"]).all()


def test_the_kd_weight_ramps_up_from_zero_so_the_first_epoch_trains_the_serving_head_alone():
    from loopfm.vm.train import kd_ramp

    assert [kd_ramp(epoch, 3) for epoch in (1, 2, 3, 4, 9)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]
    assert kd_ramp(1, 0) == 1.0  # no ramp: the full weight from the first step


def test_variants_trained_side_by_side_are_the_models_one_process_trains_alone(trained_run, tmp_path):
    """train_variants runs variants in worker processes, one PyTorch thread each; the same
    variant trained alone in this process on one thread validates and predicts the same, to
    the bit (every epoch's validation loss, so the trained epochs too, not only the one kept)."""
    import shutil

    from loopfm.pipeline.stages import train_variants

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = RunPaths(run).vm / "kd"

    def trained() -> tuple[list[float], np.ndarray]:
        fit = json.loads((out / "training.json").read_text())
        return fit["val_logloss"], read_parquet(out / "eval_predictions.parquet")["p"].to_numpy()

    assert {"base", "kd"} <= set(train_variants(run, ["base", "kd"], log=lambda *_: None, jobs=2))
    losses, predictions = trained()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_variants(run, ["kd"], log=lambda *_: None, jobs=1)
    finally:
        torch.set_num_threads(threads)
    alone_losses, alone_predictions = trained()
    assert len(losses) == 3 and losses == alone_losses and np.array_equal(predictions, alone_predictions)


def test_the_fms_intent_memory_averages_only_earlier_days_with_the_given_half_life(tmp_path):
    """fm.intent_half_lives: an event of day d sees its day's signal and, per half-life, the
    average of the user's signals of days < d weighted 2^(-age/h); a user's first day sees 0,
    and a signal of day d never reaches an event of day d or earlier through the memory."""
    from loopfm.fm.inputs import _intent

    paths = RunPaths(tmp_path)
    signals = pd.DataFrame({"user_id": [7, 7, 7, 9], "day": [0, 1, 2, 1], "intent_0": [1.0, 2.0, 4.0, 5.0]})
    write_parquet(signals, paths.table("fm_user_signals"))
    user, day = pd.Series([7, 7, 7, 9, 9, 3]), np.array([0, 1, 2, 1, 2, 1])
    got = _intent(paths, user, day, (1.0,))
    assert got.shape == (6, 2)
    assert np.allclose(got[:, 0], [1, 2, 4, 5, 0, 0])  # the day's own signal (0: none that day, user 3 unknown)
    assert np.allclose(got[:, 1], [0, 1, (2 + 0.5 * 1) / 1.5, 0, 5, 0])
    later = signals.assign(intent_0=np.where(signals["day"] == 2, 100.0, signals["intent_0"]))
    write_parquet(later, paths.table("fm_user_signals"))
    assert np.array_equal(_intent(paths, user, day, (1.0,))[:, 1], got[:, 1])  # day 2's signal: only later days
    assert _intent(paths, user, day, ()).shape == (6, 1)


def _tiny_training_set(rows: int = 256):
    """Random model inputs for a 6-position, 4-dim-code VM (numpy, one candidate per user row)."""
    from loopfm.contract.tensorize import TensorSpec

    spec = TensorSpec(history_length=6, code_dim=4, n_items=50, n_categories=10, n_brands=20, item_activity=True)
    g = np.random.default_rng(0)
    tensors = {
        "user_context": np.stack([g.integers(0, v, rows) for v in spec.user_context_vocab], axis=1),
        "vm_history": g.integers(0, spec.n_items + 1, (rows, 6)),
        "fm_codes": g.uniform(-1, 1, (rows, 6, 4)).astype(np.float32),
        "fm_mask": np.ones((rows, 6), np.float32),
        "candidates": np.stack([g.integers(0, v, rows) for v in spec.candidate_vocab], axis=1),
        "candidate_user": np.arange(rows),
    }
    label = (g.random(rows) < 0.3).astype(np.float32)
    return spec, tensors, label


@pytest.mark.parametrize("horizon", [1e-9, 1.0, 1e12])
def test_the_vm_kept_is_the_moving_average_of_its_weights_over_the_given_number_of_epochs(horizon):
    """vm.average_epochs: a horizon shorter than a step keeps the last weights, one of about
    an epoch keeps weights between the start and the last step, one far longer than training
    stays near the start: PyTorch's AveragedModel starts from the weights of its first step, so
    it has moved far less than one epoch of training does."""
    from loopfm.vm.train import _train

    spec, tensors, label = _tiny_training_set()
    rows = np.arange(len(label))

    def weights(average_epochs: float, epochs: int) -> torch.Tensor:
        cfg = RunConfig()
        cfg.override("vm.batch_size=32")
        cfg.override(f"vm.average_epochs={average_epochs}")
        model = _train(cfg, spec, "loopfm_kd", tensors, label, label, rows, epochs)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    start, one_epoch, last, kept = weights(0, 0), weights(0, 1), weights(0, 3), weights(horizon, 3)
    assert not torch.allclose(start, last)
    if horizon < 1:
        assert torch.equal(kept, last)
    elif horizon > 1e6:
        assert (kept - start).norm() < 0.5 * (one_epoch - start).norm()
    else:
        assert 0 < (kept - start).norm() < (last - start).norm() and not torch.allclose(kept, last)


def test_a_negative_weight_average_horizon_is_refused():
    from loopfm.core.config import ConfigError

    cfg = RunConfig()
    cfg.vm.average_epochs = -1.0
    with pytest.raises(ConfigError, match="vm.average_epochs"):
        cfg.validate()


def test_the_fm_streams_busy_days_one_by_one_and_sparse_days_in_periods_of_one_batch():
    days = np.repeat([3, 4, 5, 6, 7, 9], [600, 100, 300, 200, 50, 10])  # day 8 has nothing
    # from day 3 on, batch 512: day 3 alone, then 4-6 (600 events), then the rest up to the end (day 10 excluded)
    assert stream_periods(days, 3, 10, 512) == [(3, 4), (4, 7), (7, 10)]
    assert stream_periods(days, 3, 10, 1) == [(3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 10)]  # an empty day joins the next
    cfg = RunConfig()
    cfg.fm.warmup_days, cfg.world.n_days = 3, 10
    saved = np.array([3, 4, 7, 10])  # the checkpoints of the periods above: each trained on the days before its index
    assert [checkpoint_index(cfg, d, saved) for d in range(0, 12)] == [3, 3, 3, 3, 4, 4, 4, 7, 7, 7, 10, 10]
    cfg.fm.checkpoint_scheme = "frozen"
    assert {checkpoint_index(cfg, d, saved) for d in range(12)} == {3}
