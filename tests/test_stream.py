"""The live loop (loopfm/stream/): events published to Redis Streams become the same online
features, and the same offline rows, as the batch builders compute from the same events;
exactly once, in order per user, whatever is killed; bad messages become dead letters."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from loopfm.core.config import RunConfig
from loopfm.contract.names import (
    FM_HISTORY,
    ITEM_ACTIVITY,
    ITEM_FEATURES_VIEW,
    PROJECT,
    USER_PROFILE,
    VM_CLICK_HISTORY,
    views,
)
from loopfm.data.ids import load_id_maps
from loopfm.features.build import (
    build_fm_history,
    build_item_activity,
    build_vm_click_history,
    fm_history_members,
)
from loopfm.features.store import open_store
from loopfm.core.files import read_parquet, write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.data import streamed as offline
from loopfm.stream.keys import StreamKeys
from loopfm.stream.producer import Producer
from loopfm.stream.worker import Worker
from serving.feast_layout import feature_refs

from conftest import LOOPFM, PrivateRedis, copy_keys, loopfm, refusal

START_US = (time.time_ns() // 1000 // 86_400_000_000 - 2) * 86_400_000_000  # two days ago: after every test world, never in the future


@pytest.fixture(scope="module")
def base(tmp_path_factory, built_run: Path):
    """A copy of the built run materialized into a Valkey of its own (the template of each test)."""
    root = tmp_path_factory.mktemp("stream-base")
    run = root / "run"
    shutil.copytree(built_run, run)
    server = PrivateRedis(root / "valkey")
    server.start()
    loopfm("features", "apply", "--run-dir", str(run), "--redis-url", server.url)
    yield run, server
    server.stop()


@pytest.fixture
def live(base, tmp_path: Path):
    """(run dir, redis url): a private copy of the materialized run and of its online store."""
    run, server = base
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = PrivateRedis(tmp_path / "valkey")
    target.start()
    copy_keys(redis.Redis.from_url(server.url), redis.Redis.from_url(target.url))
    yield copy, target.url
    target.stop()


def set_partitions(run: Path, partitions: int) -> None:
    path = run / "config.json"
    raw = json.loads(path.read_text())
    raw["stream"] = {**raw.get("stream", {}), "partitions": partitions}
    path.write_text(json.dumps(raw))


def events_of(run: Path, n: int, seed: int = 0, new_users: tuple = (), new_items: tuple = ()) -> list[dict]:
    """n impressions of the run's users and items (plus new ones), in time order from START_US;
    some share a user and a timestamp (the same second, and the same microsecond)."""
    rng = np.random.default_rng(seed)
    users, items = load_id_maps(RunPaths(run))
    cfg = RunConfig.load(run)
    user_ids = [int(u) for u in users.source.iloc[:40]] + list(new_users)
    item_ids = [int(i) for i in items.source.iloc[:200]] + list(new_items)
    t = START_US + np.cumsum(rng.integers(1, 2_000_000, n))
    same = rng.random(n) < 0.2  # the previous event's timestamp, often the previous event's user
    out = []
    for k in range(n):
        repeat = k > 0 and same[k]
        out.append({
            "impression_id": 10**9 + seed * 10**6 + k,
            "user_id": out[-1]["user_id"] if repeat else user_ids[rng.integers(len(user_ids))],
            "item_id": item_ids[rng.integers(len(item_ids))],
            "vertical": cfg.world.verticals[rng.integers(len(cfg.world.verticals))],
            "event_timestamp": out[-1]["event_timestamp"] if repeat else int(t[k]),
            "label": int(rng.random() < 0.4),
        })  # fmt: skip
    return out


def publish(run: Path, url: str, messages: list[dict]) -> list[str]:
    producer = Producer(url, RunConfig.load(run).stream.partitions)
    try:
        return producer.events(messages)
    finally:
        producer.close()


def drain(run: Path, url: str, **options) -> dict:
    return Worker(run, url, name=options.pop("name", "w0"), log=lambda *_: None).run(idle_exit_s=options.pop("idle_exit_s", 0.5), **options)


def newest_batch_snapshots(run: Path) -> dict[str, pd.DataFrame]:
    """The batch builders over the run's impressions and log plus every streamed row: each
    entity's newest snapshot, keyed by source ids (what the online store must hold)."""
    paths, cfg = RunPaths(run), RunConfig.load(run)
    streamed = offline.read_impressions(paths)
    imp = pd.concat([read_parquet(paths.table("impressions")), streamed[read_parquet(paths.table("impressions")).columns]], ignore_index=True)
    log = pd.concat([read_parquet(paths.fm_log), streamed[read_parquet(paths.fm_log).columns]], ignore_index=True)
    member = fm_history_members(imp["label"].to_numpy(), cfg.fm.history_events)
    tables = {
        FM_HISTORY: build_fm_history(log, member, cfg.vm.history_length),
        VM_CLICK_HISTORY: build_vm_click_history(imp, cfg.world.verticals, cfg.vm.history_length),
        ITEM_ACTIVITY: build_item_activity(imp),
    }
    sources = {"user_id": pd.concat([load_id_maps(paths)[0].source, streamed.drop_duplicates("user_id").set_index("user_id")["user_source"]]),
               "item_id": pd.concat([load_id_maps(paths)[1].source, streamed.drop_duplicates("item_id").set_index("item_id")["item_source"]])}
    out = {}
    for view, t in tables.items():
        keys = [k for k in ("user_id", "vertical", "item_id") if k in t]
        newest = t.sort_values("event_timestamp", kind="stable").groupby(keys).tail(1)
        for key in ("user_id", "item_id"):
            if key in newest:
                newest[key] = [int(s) for s in sources[key].groupby(level=0).first().loc[newest[key]]]
        out[view] = newest.reset_index(drop=True)
    return out


def assert_online_equals_batch(run: Path, url: str, users: list, items: list) -> None:
    """Feast's get_online_features for `users` and `items` equals the batch builders' newest snapshots."""
    store = open_store(run, url)
    cfg = RunConfig.load(run)
    batch = newest_batch_snapshots(run)
    fm = store.get_online_features(feature_refs(views(FM_HISTORY)), [{"user_id": u} for u in users]).to_dict()
    expected = batch[FM_HISTORY].set_index("user_id").loc[users]
    assert fm["fm_codes"] == expected["fm_codes"].tolist()
    assert fm["fm_newest_available_at_us"] == expected["fm_newest_available_at_us"].tolist()
    rows = [{"user_id": u, "vertical": v} for u in users for v in cfg.world.verticals]
    vm = store.get_online_features(feature_refs(views(VM_CLICK_HISTORY)), rows).to_dict()
    expected = batch[VM_CLICK_HISTORY].set_index(["user_id", "vertical"])
    for r, got_items, got_n, got_k in zip(rows, vm["item_ids"], vm["impressions"], vm["clicks"]):
        key = (r["user_id"], r["vertical"])
        if key in expected.index:
            want = expected.loc[key]
            assert (got_items, got_n, got_k) == (want["item_ids"], want["impressions"], want["clicks"]), key
    counts = store.get_online_features(feature_refs(views(ITEM_ACTIVITY)), [{"item_id": i} for i in items]).to_dict()
    expected = batch[ITEM_ACTIVITY].set_index("item_id").loc[items]
    assert counts["item_impressions"] == expected["item_impressions"].tolist()
    assert counts["item_clicks"] == expected["item_clicks"].tolist()


def touched(messages: list[dict]) -> tuple[list, list]:
    return sorted({m["user_id"] for m in messages}), sorted({m["item_id"] for m in messages})


def test_streamed_events_give_the_online_features_the_batch_builders_compute(live):
    run, url = live
    messages = events_of(run, 400)
    publish(run, url, messages)
    summary = drain(run, url)
    assert summary["applied"] == 400 and summary["dead_letters"] == 0
    users, items = touched(messages)
    assert_online_equals_batch(run, url, users, items)
    rows = offline.read(RunPaths(run), offline.IMPRESSIONS)
    assert sorted(rows["impression_id"]) == sorted(m["impression_id"] for m in messages)
    # several events of one user in one second and in one microsecond all landed
    frame = pd.DataFrame(messages)
    same_us = frame[frame.duplicated(["user_id", "event_timestamp"], keep=False)]
    assert len(same_us) >= 10
    assert set(same_us["impression_id"]) <= set(rows["impression_id"])


def test_a_redelivered_or_resent_event_changes_nothing(live):
    run, url = live
    messages = events_of(run, 120, seed=1)
    publish(run, url, messages)
    drain(run, url)
    client = redis.Redis.from_url(url)
    before = {k: client.dump(k) for k in client.scan_iter(count=1000) if not k.startswith(b"loopfm:")}
    publish(run, url, messages[-30:])  # a producer's retry: the same impressions again
    summary = drain(run, url)
    assert summary["applied"] == 0 and summary["duplicates"] == 30
    after = {k: client.dump(k) for k in client.scan_iter(count=1000) if not k.startswith(b"loopfm:")}
    changed = [k for k in before if before[k] != after.get(k)]
    # only the write times (_ts) of the rewritten users may differ; the features do not
    users, items = touched(messages)
    assert_online_equals_batch(run, url, users, items)
    assert len(offline.read_impressions(RunPaths(run))) == 120
    assert set(after) == set(before) and changed  # the users were rewritten, idempotently


def test_the_stream_encodes_an_event_as_fm_log_does(live):
    """Same function, same inputs: the stream's code and logit of each event equal `fm log`'s
    on the impressions table extended by the same events (one partition: the batch order)."""
    from loopfm.fm.inputs import build_inputs
    from loopfm.fm.log import log_events

    run, url = live
    set_partitions(run, 1)
    messages = events_of(run, 150, seed=2)
    messages = [m for i, m in enumerate(messages) if i == 0 or m["event_timestamp"] != messages[i - 1]["event_timestamp"]]
    publish(run, url, messages)
    drain(run, url)
    paths, cfg = RunPaths(run), RunConfig.load(run)
    streamed = offline.read_impressions(paths)
    imp = read_parquet(paths.table("impressions"))
    write_parquet(pd.concat([imp, streamed[imp.columns]], ignore_index=True), paths.table("impressions"))
    arrays, extended = build_inputs(paths, cfg)
    logged = log_events(paths, cfg, arrays, extended, np.arange(len(imp), len(extended)), progress=False)
    assert logged["impression_id"].tolist() == streamed["impression_id"].tolist()
    assert logged["fm_code"].tolist() == streamed["fm_code"].tolist()
    np.testing.assert_allclose(logged["fm_logit"], streamed["fm_logit"], rtol=1e-5, atol=1e-5)


def test_each_kind_of_bad_message_is_a_dead_letter_with_its_reason_and_the_partition_flows_on(live):
    run, url = live
    set_partitions(run, 1)
    good = events_of(run, 3, seed=3)
    bad = [
        ({k: v for k, v in good[0].items() if k != "label"} | {"impression_id": 1}, "missing field 'label'"),
        (good[0] | {"impression_id": 2, "label": "yes"}, "field 'label' is not an integer"),
        (good[0] | {"impression_id": 3, "label": 2}, "field 'label' = 2 lies outside [0, 1]"),
        (good[0] | {"impression_id": 4, "event_timestamp": "nan"}, "not a finite number"),
        (good[0] | {"impression_id": 5, "vertical": "radio"}, "vertical 'radio' is not one of"),
        (good[0] | {"impression_id": 6, "event_timestamp": START_US + 10 * 86_400_000_000}, "in the future"),
        (good[0] | {"impression_id": 7, "user_id": "alice"}, "field 'user_id' is not an integer"),
    ]
    publish(run, url, [good[0], *(m for m, _ in bad), good[1], good[2]])
    summary = drain(run, url)
    assert summary["applied"] == 3 and summary["dead_letters"] == len(bad)
    letters = redis.Redis.from_url(url).xrange(StreamKeys(PROJECT, 1).dead_letters)
    reasons = [fields[b"dead_reason"].decode() for _, fields in letters]
    for (_, reason), got in zip(bad, reasons):
        assert reason in got
    assert [int(f[b"impression_id"]) for _, f in letters] == [m["impression_id"] for m, _ in bad]
    assert redis.Redis.from_url(url).xpending(StreamKeys(PROJECT, 1).events(0), "loopfm-stream")["pending"] == 0


def test_pending_entries_trimmed_from_the_stream_are_counted_as_lost_and_the_partition_flows_on(live):
    run, url = live
    set_partitions(run, 1)
    client, key = redis.Redis.from_url(url), StreamKeys(PROJECT, 1).events(0)
    publish(run, url, events_of(run, 5, seed=8))
    client.xgroup_create(key, "loopfm-stream", id="0", mkstream=True)
    client.xreadgroup("loopfm-stream", "gone", {key: ">"}, count=5)  # delivered to a worker that died before acking
    client.xtrim(key, maxlen=0, approximate=False)  # then trimmed away (stream.max_len)
    later = events_of(run, 3, seed=9)
    publish(run, url, later)
    summary = drain(run, url)
    assert (summary["trimmed"], summary["applied"]) == (5, 3)
    assert client.xpending(key, "loopfm-stream")["pending"] == 0


def test_a_worker_killed_mid_stream_and_restarted_applies_every_event_exactly_once(live):
    run, url = live
    raw = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(raw | {"stream": {"batch_size": 20, "lease_ms": 2000}}))  # many micro-batches
    messages = events_of(run, 3000, seed=4)
    publish(run, url, messages)
    worker = subprocess.Popen([LOOPFM, "stream", "--run-dir", str(run), "--redis-url", url, "--name", "a", "--until-idle", "30"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    paths = RunPaths(run)
    deadline = time.monotonic() + 120
    while len(offline.read(paths, offline.IMPRESSIONS)) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    applied_before = len(offline.read(paths, offline.IMPRESSIONS))
    assert 0 < applied_before < 3000, "the kill must land mid-stream"
    # the lease of the killed worker expires; a worker with another name takes over. Until the
    # dead worker's membership expires (lease_ms after its last heartbeat) b's share is half the
    # partitions: its idle exit must wait past that, or it would end with half of them applied.
    summary = Worker(run, url, name="b", log=lambda *_: None).run(idle_exit_s=3 * 2.0)
    users, items = touched(messages)
    assert_online_equals_batch(run, url, users, items)
    assert sorted(offline.read_impressions(paths)["impression_id"]) == sorted(m["impression_id"] for m in messages)
    assert summary["applied"] + applied_before >= 3000


def test_two_workers_share_the_partitions_and_keep_each_users_order(live):
    run, url = live
    set_partitions(run, 4)
    messages = events_of(run, 2000, seed=5)
    procs = [subprocess.Popen([LOOPFM, "stream", "--run-dir", str(run), "--redis-url", url, "--name", name, "--until-idle", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for name in ("a", "b")]  # fmt: skip
    client, keys, deadline = redis.Redis.from_url(url), StreamKeys(PROJECT, 4), time.monotonic() + 120
    while {client.get(keys.lease(p)) for p in range(4)} != {b"a", b"b"} and time.monotonic() < deadline:
        time.sleep(0.1)  # until each holds a share of the partitions
    publish(run, url, messages)
    outputs = [json.loads(p.communicate(timeout=180)[0].strip().splitlines()[-1]) for p in procs]
    assert sum(o["applied"] for o in outputs) == 2000
    assert all(o["applied"] > 0 for o in outputs), "each worker applied a share"
    users, items = touched(messages)
    assert_online_equals_batch(run, url, users, items)


def test_a_new_user_and_a_new_item_are_scored_from_the_fresh_history(live, trained_run):
    import asyncio

    import redis.asyncio

    from serving.scorer import Scorer

    run, url = live
    items = [{"item_id": 987654321, "category": 1, "brand": 2, "price_bucket": 3}]
    producer = Producer(url, RunConfig.load(run).stream.partitions)
    producer.items(items)
    messages = events_of(run, 30, seed=6, new_users=(5_000_001,), new_items=(987654321, 987654322))
    messages += [{"impression_id": 2 * 10**9 + k, "user_id": 5_000_001, "item_id": 987654321, "vertical": "shop",
                  "event_timestamp": START_US + 10**9 + k, "label": 1} for k in range(3)]  # fmt: skip
    producer.events(messages)
    started = time.monotonic()
    drain(run, url)
    store = open_store(run, url)
    got = store.get_online_features(feature_refs(views(ITEM_FEATURES_VIEW)), [{"item_id": 987654321}]).to_dict()
    assert got["category"] == [1] and got["item_index"][0] >= len(load_id_maps(RunPaths(run))[1].source)
    scorer = Scorer(trained_run / "vm" / "loopfm_kd" / "onnx")

    async def score():
        client = redis.asyncio.Redis.from_url(url)
        try:
            return await scorer.score(client, 5_000_001, [987654321, 987654322, 1], hour=3)
        finally:
            await client.aclose()

    scored = asyncio.run(score())
    assert scored.user_known
    assert time.monotonic() - started < 30
    fm = store.get_online_features(feature_refs(views(FM_HISTORY, USER_PROFILE)), [{"user_id": 5_000_001}]).to_dict()
    assert fm["fm_codes"][0] and fm["age_bucket"] == [None]  # a history, and no profile: it is new
    assert_online_equals_batch(run, url, *touched(messages))


def test_the_publish_and_upsert_commands_check_the_whole_file_then_publish_every_row(live, tmp_path):
    run, url = live
    messages = events_of(run, 20, seed=7)
    pd.DataFrame(messages).to_csv(tmp_path / "events.csv", index=False)
    pd.DataFrame([{"item_id": 555, "category": 1, "brand": 1, "price_bucket": 1}]).to_csv(tmp_path / "items.csv", index=False)
    bad = pd.DataFrame(messages).assign(label=[0] * 19 + [3])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    refused = refusal("events", "publish", "--run-dir", str(run), "--redis-url", url, str(tmp_path / "bad.csv"))
    assert refused.returncode == 2 and "bad.csv: column 'label', row 20: labels must be 0 or 1" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert all(redis.Redis.from_url(url).xlen(k) == 0 for k in StreamKeys(PROJECT, 8).all_events())
    loopfm("events", "publish", "--run-dir", str(run), "--redis-url", url, str(tmp_path / "events.csv"))
    loopfm("items", "upsert", "--run-dir", str(run), "--redis-url", url, str(tmp_path / "items.csv"))
    out = loopfm("stream", "--run-dir", str(run), "--redis-url", url, "--until-idle", "1").stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["applied"], summary["items_upserted"], summary["dead_letters"]) == (20, 1, 0)
    assert_online_equals_batch(run, url, *touched(messages))
