"""Point-in-time invariants, checked on what get_historical_features really returns.

The small run logs with delay 0, so a code becomes available at the very second of its
own event: the hardest case for "the current example is never in its own history"."""

import numpy as np
import pandas as pd
import pytest

from loopfm.core.config import RunConfig
from loopfm.features.build import ENTITY_OFFSET
from loopfm.features.store import historical_features
from loopfm.fm.log import log_embeddings
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import unix_us


@pytest.fixture(scope="module")
def training_rows(materialized_run, store):
    entities = read_parquet(RunPaths(materialized_run).features / "vm_train_entities.parquet")
    return historical_features(store, entities, "vm_loopfm_kd")


def test_every_fm_code_was_available_strictly_before_the_example(training_rows):
    impression_time = unix_us(training_rows["event_timestamp"] + ENTITY_OFFSET)
    has_history = training_rows["fm_codes"].notna()
    assert has_history.mean() > 0.5
    newest = training_rows.loc[has_history, "fm_newest_available_at_us"]
    assert (newest < impression_time[has_history]).all()


def test_no_fm_checkpoint_saw_the_example_s_time_or_later(training_rows):
    impression_time = unix_us(training_rows["event_timestamp"] + ENTITY_OFFSET)
    has_history = training_rows["fm_codes"].notna()
    assert (training_rows.loc[has_history, "fm_trained_until_us"] <= impression_time[has_history]).all()
    assert (unix_us(training_rows["kd_trained_until"]) <= impression_time).all()  # the KD label too


def test_histories_and_counts_equal_a_brute_force_recomputation_that_excludes_the_current_event(materialized_run, training_rows):
    paths, cfg = RunPaths(materialized_run), RunConfig.load(materialized_run)
    imp = read_parquet(paths.table("impressions"))
    log = read_parquet(paths.fm_log).assign(label=imp["label"], vertical=imp["vertical"])
    length, t_imp = cfg.vm.history_length, imp.set_index("impression_id")["event_timestamp"]
    sample = training_rows.sample(300, random_state=0)
    clicked_now = 0
    for row in sample.itertuples():
        t = t_imp[row.impression_id]
        mine = log[(log.user_id == row.user_id) & ((log.label == 1) | (cfg.fm.history_events == "impressions"))]
        codes = mine[mine.available_at < t].sort_values("available_at", kind="stable")["fm_code"].tolist()[-length:]
        assert (row.fm_codes or b"") == b"".join(codes)
        own = imp[(imp.user_id == row.user_id) & (imp.label == 1) & (imp.vertical == cfg.vm.target_vertical)]
        items = own[own.event_timestamp < t]["item_id"].to_numpy()[-length:].astype("<i4").tobytes()
        assert (row.item_ids or b"") == items
        shown = imp[(imp.user_id == row.user_id) & (imp.vertical == cfg.vm.target_vertical) & (imp.event_timestamp < t)]
        assert (0 if pd.isna(row.impressions) else row.impressions, 0 if pd.isna(row.clicks) else row.clicks) == (
            len(shown), shown.label.sum())  # the user's counts so far, this impression excluded
        seen = imp[(imp.item_id == row.item_id) & (imp.event_timestamp < t)]  # by every user, in every vertical
        assert (0 if pd.isna(row.item_impressions) else row.item_impressions,
                0 if pd.isna(row.item_clicks) else row.item_clicks) == (len(seen), seen.label.sum())  # fmt: skip
        clicked_now += row.label
    assert clicked_now > 0  # the sample includes clicked examples, whose own code exists at time t


def test_historical_retrieval_keeps_every_entity_row_duplicates_and_unknowns_included(store, materialized_run):
    entities = read_parquet(RunPaths(materialized_run).features / "vm_eval_entities.parquet").head(200)
    unknown = entities.head(3).assign(user_id=10**9, item_id=10**9)
    frame = pd.concat([entities, entities.head(50), unknown], ignore_index=True)  # 50 exact duplicates
    out = historical_features(store, frame, "vm_loopfm")
    assert len(out) == len(frame)
    pd.testing.assert_frame_equal(out.iloc[:50].reset_index(drop=True), out.iloc[200:250].reset_index(drop=True))
    assert out.tail(3)["fm_codes"].isna().all() and out.tail(3)["category"].isna().all()


@pytest.mark.parametrize("scheme", ["frozen", "rolling"])
def test_each_logged_code_comes_from_a_checkpoint_trained_before_its_event_day(copy_of_run, scheme):
    paths, cfg = RunPaths(copy_of_run), RunConfig.load(copy_of_run)
    cfg.fm.checkpoint_scheme = scheme
    log = log_embeddings(paths, cfg, progress=False)
    start = pd.Timestamp(cfg.world.start_date, tz="UTC")
    day_start = start + pd.to_timedelta((log.event_timestamp - start).dt.days, unit="D")
    until = log.fm_trained_until
    warmup_end = start + pd.Timedelta(days=cfg.fm.warmup_days)
    if scheme == "rolling":  # the day's checkpoint; warm-up days take the warm-up checkpoint
        assert (until == day_start.where(day_start > warmup_end, warmup_end)).all()
    else:
        assert (until == start + pd.Timedelta(days=cfg.fm.warmup_days)).all()
    in_vm_window = log.event_timestamp >= start + pd.Timedelta(days=cfg.fm.warmup_days)
    assert (until[in_vm_window] <= log.event_timestamp[in_vm_window]).all()
    assert np.isfinite(log.fm_logit).all()
