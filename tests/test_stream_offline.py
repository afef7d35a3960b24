"""The live loop's offline side (loopfm/data/streamed.py): `loopfm features build` reads the
streamed rows back. The training set built after streaming equals a from-scratch batch build of
the same events with the same codes and availability times; a row at time t sees only codes
available before t; online equals the newest offline snapshot once the stream drains;
compaction changes no training set."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from loopfm.core.config import RunConfig
from loopfm.contract.names import FM_HISTORY, ITEM_ACTIVITY, ITEM_FEATURES_VIEW, VM_CLICK_HISTORY, views
from loopfm.data.ids import load_id_maps
from loopfm.features.build import ENTITY_OFFSET
from loopfm.features.store import feast_cli, historical_features, open_store
from loopfm.core.files import read_parquet, write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import unix_us
from loopfm.data import streamed as offline
from loopfm.stream.producer import Producer
from serving.feast_layout import feature_refs

from conftest import loopfm
from test_stream import base, drain, live, publish  # noqa: F401  (fixtures: a materialized run in a Valkey of its own)

NEW_USERS, NEW_ITEM = (7_000_001, 7_000_002), 900_000_001
US_PER_S = 1_000_000


def wave(run: Path, n: int, first_us: int, seed: int) -> list[dict]:
    """n impressions from `first_us` on, 10 ms apart: 12 of the run's users and two new ones,
    the run's items and one new item, mostly clicks in the VM's target vertical."""
    rng = np.random.default_rng(seed)
    users, items = load_id_maps(RunPaths(run))
    cfg = RunConfig.load(run)
    user_ids = [int(u) for u in users.source.iloc[:12]] + list(NEW_USERS)
    item_ids = [int(i) for i in items.source.iloc[:100]] + [NEW_ITEM]
    return [{"impression_id": 3 * 10**9 + seed * 10**6 + k, "user_id": user_ids[rng.integers(len(user_ids))],
             "item_id": item_ids[rng.integers(len(item_ids))],
             "vertical": cfg.vm.target_vertical if rng.random() < 0.7 else cfg.world.verticals[0],
             "event_timestamp": first_us + k * 10_000, "label": int(rng.random() < 0.7)} for k in range(n)]  # fmt: skip


def stream_two_waves(run: Path, url: str) -> list[dict]:
    """A first wave, drained, then a second wave stamped after the first was written: the
    second's training rows can see the first's codes, the first's cannot see its own."""
    now = time.time_ns() // 1000
    first = wave(run, 150, now - 60 * US_PER_S, seed=1)
    publish(run, url, first)
    assert drain(run, url)["applied"] == 150
    second = wave(run, 150, time.time_ns() // 1000 + 1000, seed=2)
    publish(run, url, second)
    assert drain(run, url)["applied"] == 150
    return first + second


def batch_twin(streamed_run: Path, dst: Path) -> Path:
    """A copy of `streamed_run` whose tables held the streamed events, with the same codes and
    availability times, from the start, and whose id maps knew the stream's new users and items
    (the dense ids the stream gave them): no stream folder."""
    shutil.copytree(streamed_run, dst)
    paths = RunPaths(dst)
    streamed = offline.read_impressions(paths)
    for table in (paths.table("impressions"), paths.fm_log):
        stored = read_parquet(table)
        write_parquet(pd.concat([stored, streamed[stored.columns]], ignore_index=True), table)
    for key, column in (("user_id", "user_source"), ("item_id", "item_source")):
        ids = read_parquet(paths.table(f"{key}s"))
        new = streamed[streamed[key] >= len(ids)].drop_duplicates(key).sort_values(key)
        write_parquet(pd.concat([ids, pd.DataFrame({key: new[key], "source_id": new[column].astype(np.int64)})], ignore_index=True),
                      paths.table(f"{key}s"))  # fmt: skip
    shutil.rmtree(dst / "stream")
    return dst


def sources(run: Path) -> dict[str, pd.DataFrame]:
    return {f.stem: read_parquet(f) for f in sorted((RunPaths(run).features).glob("*.parquet"))}


def training_set(run: Path, url: str) -> pd.DataFrame:
    """The VM's train and eval rows with their point-in-time features, as `vm train` reads them."""
    feast_cli(["apply"], run, url)
    store = open_store(run, url)
    features = RunPaths(run).features
    entities = pd.concat([read_parquet(features / f"vm_{split}_entities.parquet") for split in ("train", "eval")], ignore_index=True)
    return historical_features(store, entities, "vm_loopfm_kd")


@pytest.fixture
def streamed(live):
    """(run, url, messages): two waves streamed into a copy of the run."""
    run, url = live
    return run, url, stream_two_waves(run, url)


def build(run: Path) -> None:
    loopfm("features", "build", "--run-dir", str(run))


def test_the_training_set_after_streaming_equals_a_from_scratch_batch_build(streamed, tmp_path):
    run, url, messages = streamed
    twin = batch_twin(run, tmp_path / "twin")
    build(run)
    build(twin)
    got, want = sources(run), sources(twin)
    assert got.keys() == want.keys()
    for name in got:
        pd.testing.assert_frame_equal(got[name], want[name], obj=name)
    eval_ids = set(got["vm_eval_entities"]["impression_id"])
    assert {m["impression_id"] for m in messages if m["vertical"] == RunConfig.load(run).vm.target_vertical} <= eval_ids
    users = load_id_maps(RunPaths(run))[0]
    assert set(NEW_USERS) <= set(users.source)  # the id map grew by the stream's new users
    pd.testing.assert_frame_equal(training_set(run, url), training_set(twin, url))


def test_a_training_row_at_time_t_sees_only_codes_available_before_t(streamed):
    run, url, messages = streamed
    build(run)
    rows = training_set(run, url)
    t = unix_us(rows["event_timestamp"] + ENTITY_OFFSET)
    has_history = rows["fm_codes"].notna()
    assert (rows.loc[has_history, "fm_newest_available_at_us"] < t[has_history]).all()
    log = offline.read_impressions(RunPaths(run))
    first_written = unix_us(log["available_at"]).iloc[:150].max()
    second = rows["impression_id"].isin([m["impression_id"] for m in messages[150:]])
    first = rows["impression_id"].isin([m["impression_id"] for m in messages[:150]])
    # the second wave reads codes the first wave's worker wrote; the first never reads its own
    assert (rows.loc[second & has_history, "fm_newest_available_at_us"] >= unix_us(log["available_at"]).min()).any()
    assert (rows.loc[first & has_history, "fm_newest_available_at_us"] < unix_us(log["available_at"]).min()).all()
    assert first_written < t[second].min()
    new_user_rows = rows[rows["user_id"].isin(NEW_USERS)]
    assert len(new_user_rows) and new_user_rows["age_bucket"].isna().all()  # no profile: the VM reads it as unknown


def test_online_equals_the_newest_offline_snapshot_after_the_stream_drains(live):
    run, url = live
    producer = Producer(url, RunConfig.load(run).stream.partitions)
    existing = int(load_id_maps(RunPaths(run))[1].source.iloc[3])
    producer.items([{"item_id": existing, "category": 2, "brand": 3, "price_bucket": 1},
                    {"item_id": NEW_ITEM, "category": 1, "brand": 2, "price_bucket": 3}])  # fmt: skip
    producer.close()
    messages = stream_two_waves(run, url)
    build(run)
    store, tables = open_store(run, url), sources(run)
    users = sorted({m["user_id"] for m in messages})
    items = sorted({m["item_id"] for m in messages} | {existing})

    def newest(view: str, keys: list[str]) -> pd.DataFrame:
        return tables[view].sort_values("event_timestamp", kind="stable").groupby(keys).tail(1).set_index(keys)

    online = store.get_online_features(feature_refs(views(FM_HISTORY)), [{"user_id": u} for u in users]).to_dict()
    offline_fm = newest(FM_HISTORY, ["user_id"]).loc[users]
    assert online["fm_codes"] == offline_fm["fm_codes"].tolist()
    assert online["fm_newest_available_at_us"] == offline_fm["fm_newest_available_at_us"].tolist()
    target = RunConfig.load(run).vm.target_vertical
    online = store.get_online_features(feature_refs(views(VM_CLICK_HISTORY)), [{"user_id": u, "vertical": target} for u in users]).to_dict()
    offline_vm = newest(VM_CLICK_HISTORY, ["user_id", "vertical"]).loc[[(u, target) for u in users]]
    assert online["item_ids"] == offline_vm["item_ids"].tolist() and online["clicks"] == offline_vm["clicks"].tolist()
    online = store.get_online_features(feature_refs(views(ITEM_ACTIVITY, ITEM_FEATURES_VIEW)), [{"item_id": i} for i in items]).to_dict()
    offline_items = newest(ITEM_ACTIVITY, ["item_id"]).loc[items]
    assert online["item_impressions"] == offline_items["item_impressions"].tolist()
    catalog = newest(ITEM_FEATURES_VIEW, ["item_id"]).loc[[existing, NEW_ITEM]]
    got = store.get_online_features(feature_refs(views(ITEM_FEATURES_VIEW)), [{"item_id": existing}, {"item_id": NEW_ITEM}]).to_dict()
    for feature in ("item_index", "category", "brand", "price_bucket"):
        assert got[feature] == catalog[feature].tolist(), feature
    assert catalog.loc[existing, "category"] == 2 and catalog.loc[NEW_ITEM, "item_index"] >= 500


def test_a_catalog_upsert_reaches_only_training_rows_after_it_was_written(live):
    run, url = live
    item = int(load_id_maps(RunPaths(run))[1].source.iloc[3])
    before = read_parquet(RunPaths(run).table("items")).set_index("item_id").loc[3, "category"]
    producer = Producer(url, RunConfig.load(run).stream.partitions)
    producer.items([{"item_id": item, "category": int(before) + 1, "brand": 0, "price_bucket": 0}])
    producer.close()
    drain(run, url)
    build(run)
    written = read_parquet(offline.files(RunPaths(run), offline.ITEMS)[0])["written_at"].iloc[0]
    feast_cli(["apply"], run, url)
    rows = pd.DataFrame({"item_id": item, "user_id": 0, "vertical": "shop",
                         "event_timestamp": [written - pd.Timedelta(microseconds=1), written]})  # fmt: skip
    got = historical_features(open_store(run, url), rows, "vm_base")["category"].tolist()
    assert got == [before, before + 1]


def test_compaction_merges_the_small_files_and_changes_no_training_set(streamed):
    run, url, _ = streamed
    paths = RunPaths(run)
    build(run)
    before_files = len(offline.files(paths, offline.IMPRESSIONS))
    before = sources(run)
    assert before_files >= 2
    young = loopfm("stream", "compact", "--run-dir", str(run), "--older-than-s", "3600").stdout  # all younger: left alone
    assert f"stream/impressions: {before_files} files -> {before_files}" in young
    out = loopfm("stream", "compact", "--run-dir", str(run), "--older-than-s", "0").stdout
    assert f"stream/impressions: {before_files} files -> 1" in out
    assert len(offline.files(paths, offline.IMPRESSIONS)) == 1
    build(run)
    after = sources(run)
    for name in before:
        pd.testing.assert_frame_equal(after[name], before[name], obj=name)


def test_a_compaction_cut_short_before_removing_the_small_files_reads_the_same(streamed, monkeypatch):
    """A crash between writing the merged file and removing the small ones leaves both: every
    impression id still reads its first written row."""
    run, _, _ = streamed
    paths = RunPaths(run)
    small = offline.files(paths, offline.IMPRESSIONS)
    duplicate = pd.read_parquet(small[-1]).head(3).assign(available_at=pd.Timestamp.now(tz="UTC"))
    offline.append(paths, offline.IMPRESSIONS, pa.Table.from_pandas(duplicate, preserve_index=False), offline.write_order(small[-1])[0] + 1, "again")  # a re-applied batch
    want = offline.read_impressions(paths)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    offline.compact(paths, older_than_us=time.time_ns() // 1000, log=lambda *_: None)
    assert len(offline.files(paths, offline.IMPRESSIONS)) == len(small) + 2
    pd.testing.assert_frame_equal(offline.read_impressions(paths), want)
    monkeypatch.undo()
    offline.compact(paths, older_than_us=time.time_ns() // 1000, log=lambda *_: None)
    assert len(offline.files(paths, offline.IMPRESSIONS)) == 1
    pd.testing.assert_frame_equal(offline.read_impressions(paths), want)


def test_a_worker_started_after_the_id_maps_grew_gives_the_next_new_user_the_next_index(live):
    run, url = live
    messages = wave(run, 20, time.time_ns() // 1000 - US_PER_S, seed=3)
    publish(run, url, messages)
    drain(run, url)
    build(run)
    grown = len(load_id_maps(RunPaths(run))[0].source)
    later = {**messages[0], "impression_id": 5 * 10**9, "user_id": 7_000_009, "event_timestamp": time.time_ns() // 1000}
    publish(run, url, [later])
    drain(run, url, name="started-later")  # reads the grown map from disk
    build(run)
    users = load_id_maps(RunPaths(run))[0]
    assert len(users.source) == grown + 1 and users.source.iloc[grown] == 7_000_009
