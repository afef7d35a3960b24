"""`loopfm ingest`: fresh impressions reach /score through the offline FM log and Feast's push
API, a run killed midway and re-run loses and duplicates nothing, and bad files are refused."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import LOOPFM, loopfm
from loopfm.io import RunPaths, read_parquet
from loopfm.server_process import start_server, stop_server

USER = 3
BODY = {"user_id": USER, "candidate_item_ids": [801, 802, 850], "context": {"hour": 9}}


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def fresh_events(run: Path, n: int = 5) -> pd.DataFrame:
    """n clicks of USER on shop items, stamped in the last minutes (the world itself is older)."""
    paths = RunPaths(run)
    imp = read_parquet(paths.table("impressions"))
    shop = read_parquet(paths.table("items")).query("vertical == 'shop'")["item_id"].to_numpy()[:n]
    now = pd.Timestamp.now(tz="UTC").floor("s")
    return pd.DataFrame({
        "impression_id": imp["impression_id"].max() + 1 + pd.RangeIndex(n),
        "user_id": USER, "item_id": shop, "vertical": "shop",
        "event_timestamp": [now - pd.Timedelta(minutes=10 - i) for i in range(n)], "label": 1,
    })  # fmt: skip


def digest(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_a_killed_ingest_rerun_adds_each_event_once_and_score_sees_the_new_history(run, private_redis, tmp_path):
    paths = RunPaths(run)
    events = fresh_events(run)
    events.to_parquet(tmp_path / "batch.parquet")
    n_imp, n_log = len(read_parquet(paths.table("impressions"))), len(read_parquet(paths.fm_log))
    proc, url = start_server(paths.vm / "loopfm_kd" / "onnx", private_redis.url, tmp_path / "server.log")
    try:
        before = httpx.post(f"{url}/score", json=BODY).json()
        assert before["feature_age_s"]["fm_history"] > 86400  # the world ended weeks ago

        args = [LOOPFM, "ingest", "--run-dir", str(run), "--events", str(tmp_path / "batch.parquet"),
                "--redis-url", private_redis.url]  # fmt: skip
        killed = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        for line in killed.stdout:
            if line.startswith("[2/4]"):  # impressions appended, FM logging under way
                killed.send_signal(signal.SIGKILL)
                break
        killed.wait()
        assert killed.returncode == -signal.SIGKILL
        assert len(read_parquet(paths.table("impressions"))) == n_imp + 5  # every file still reads whole

        loopfm("ingest", "--run-dir", str(run), "--events", str(tmp_path / "batch.parquet"), "--redis-url", private_redis.url)
        state = digest(paths.table("impressions"), paths.fm_log, paths.features / "fm_history.parquet")
        again = loopfm("ingest", "--run-dir", str(run), "--events", str(tmp_path / "batch.parquet"),
                       "--redis-url", private_redis.url).stdout  # fmt: skip
        assert "'new_impressions': 0, 'newly_logged': 0" in again
        assert digest(paths.table("impressions"), paths.fm_log, paths.features / "fm_history.parquet") == state

        log = read_parquet(paths.fm_log)
        assert len(log) == n_log + 5 and log["impression_id"].is_unique
        assert (log["impression_id"].to_numpy() == read_parquet(paths.table("impressions"))["impression_id"].to_numpy()).all()
        newest = read_parquet(paths.features / "fm_history.parquet").query("user_id == @USER").iloc[-1]
        batch_codes = log.set_index("impression_id").loc[events["impression_id"], "fm_code"]
        assert newest["fm_codes"].endswith(b"".join(batch_codes))  # the history ends with the batch, in order

        after = httpx.post(f"{url}/score", json=BODY).json()
        assert after["feature_age_s"]["fm_history"] < 3600 and after["feature_age_s"]["vm_click_history"] < 3600
        assert after["scores"] != before["scores"]
    finally:
        stop_server(proc)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda df: df.drop(columns="label"), "missing column(s) ['label']"),
        (lambda df: df.astype({"user_id": object}).assign(user_id=[3, 3, "x", 3, 3]), "column 'user_id', row 3: not an integer"),
        (lambda df: df.assign(item_id=[801, 10**9, 802, 803, 804]), "column 'item_id', row 2: item not in"),
        (lambda df: df.assign(label=[1, 0, 2, 1, 1]), "column 'label', row 3: labels must be 0 or 1"),
        (lambda df: df.assign(user_id=10**7), "column 'user_id', row 1: user unknown to the FM"),
        (lambda df: df.assign(vertical="cars"), "column 'vertical', row 1: vertical not in"),
        (lambda df: df.assign(event_timestamp=[1790848800, 12345, 1790848801, 1790848802, 1790848803]),
         "column 'event_timestamp', row 2: a unix time whose unit cannot be told"),
        (lambda df: df.astype({"user_id": object}).assign(user_id=[3, 3, 3, "inf", 3]), "column 'user_id', row 4: not an integer"),
        (lambda df: df.astype({"item_id": object}).assign(item_id=[801, 802, 2**63, 803, 804]),
         "column 'item_id', row 3: an integer outside"),
    ],
)
def test_a_bad_events_file_is_refused_by_name_and_nothing_is_written(run, private_redis, tmp_path, change, message):
    paths = RunPaths(run)
    bad = tmp_path / "bad.csv"
    change(fresh_events(run)).to_csv(bad, index=False)
    state = digest(paths.table("impressions"), paths.fm_log)
    result = loopfm("ingest", "--run-dir", str(run), "--events", str(bad), "--redis-url", private_redis.url, check=False)
    assert result.returncode == 2 and str(bad) in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert digest(paths.table("impressions"), paths.fm_log) == state


@pytest.mark.parametrize("unit, value", [(None, 1790848800), ("s", 1790848800), ("ms", 1790848800_000), (None, 1790848800_000_000_000)])
def test_unix_times_in_an_events_file_are_read_in_their_unit_not_as_nanoseconds(built_run, tmp_path, unit, value):
    """1790848800 is 2026-10-01 10:00 UTC in seconds (it was stored as 1970-01-01 00:00:01.79)."""
    from loopfm.config import RunConfig
    from loopfm.pipeline.ingest import read_events

    batch = tmp_path / "batch.csv"
    fresh_events(built_run, n=1).assign(event_timestamp=value).to_csv(batch, index=False)
    events = read_events(batch, RunConfig.load(built_run), RunPaths(built_run), **({"time_unit": unit} if unit else {}))
    assert events["event_timestamp"].iloc[0] == pd.Timestamp("2026-10-01 10:00", tz="UTC")
    assert events["hour"].iloc[0] == 10


def ingest_cmd(run: Path, batch: Path, redis_url: str) -> list[str]:
    return [LOOPFM, "ingest", "--run-dir", str(run), "--events", str(batch), "--redis-url", redis_url]


def test_a_reused_impression_id_with_other_values_is_refused_naming_it(run, private_redis, tmp_path):
    paths = RunPaths(run)
    shop_item = int(read_parquet(paths.table("items")).query("vertical == 'shop'")["item_id"].iloc[-1])
    stored = read_parquet(paths.table("impressions")).iloc[0]
    assert (stored["user_id"], stored["item_id"]) != (7, shop_item)
    batch = tmp_path / "reused.csv"
    batch.write_text(f"impression_id,user_id,item_id,vertical,event_timestamp,label\n0,7,{shop_item},shop,2026-10-01T10:00:00Z,1\n")
    state = digest(paths.table("impressions"), paths.fm_log)
    result = subprocess.run(ingest_cmd(run, batch, private_redis.url), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "impression_id(s) [0] already stored" in result.stderr and "give new events new ids" in result.stderr
    assert digest(paths.table("impressions"), paths.fm_log) == state


def test_a_late_event_becomes_available_when_ingested_online_equals_offline_and_the_past_is_unchanged(
    run, private_redis, tmp_path
):
    """A click stamped a day before USER's newest snapshot: offline and online newest rows hold
    it, stamped at the ingest; every older snapshot stays as it was."""
    from loopfm.features.store import open_store

    paths = RunPaths(run)
    views = {"fm_history": ["user_id"], "vm_click_history": ["user_id", "vertical"]}
    before = {v: read_parquet(paths.features / f"{v}.parquet") for v in views}
    newest = before["vm_click_history"].query("user_id == @USER and vertical == 'shop'")["event_timestamp"].max()
    late = fresh_events(run, n=1).assign(event_timestamp=(newest - pd.Timedelta(days=1)).isoformat())
    late.to_csv(tmp_path / "late.csv", index=False)
    started = pd.Timestamp.now(tz="UTC")
    loopfm("ingest", "--run-dir", str(run), "--events", str(tmp_path / "late.csv"), "--redis-url", private_redis.url)

    imp = read_parquet(paths.table("impressions")).set_index("impression_id")
    assert imp.loc[late["impression_id"].iloc[0], "event_timestamp"] == newest - pd.Timedelta(days=1)
    code = read_parquet(paths.fm_log).set_index("impression_id").loc[late["impression_id"].iloc[0], "fm_code"]
    online = open_store(run, private_redis.url).get_online_features(
        features=["fm_history:fm_codes", "vm_click_history:item_ids"], entity_rows=[{"user_id": USER, "vertical": "shop"}]
    ).to_dict()
    for view, keys in views.items():
        after = read_parquet(paths.features / f"{view}.parquet")
        mine = after.query("user_id == @USER" + (" and vertical == 'shop'" if "vertical" in keys else ""))
        top = mine.sort_values("event_timestamp").iloc[-1]
        assert top["event_timestamp"] >= started  # available when ingested, not at its event time
        value = top["fm_codes"] if view == "fm_history" else top["item_ids"]
        assert value == online["fm_codes" if view == "fm_history" else "item_ids"][0]  # online equals offline
        held = code if view == "fm_history" else np.int32(late["item_id"].iloc[0]).tobytes()
        assert held in value
        old = after[after["event_timestamp"] < started].reset_index(drop=True)
        pd.testing.assert_frame_equal(old, before[view].reset_index(drop=True))  # no earlier row sees it
    item = int(late["item_id"].iloc[0])  # its counts so far, by every user, now include the late event
    counts = read_parquet(paths.features / "item_activity.parquet").query("item_id == @item").sort_values("event_timestamp").iloc[-1]
    shown = imp[imp["item_id"] == item]
    assert (counts["item_impressions"], counts["item_clicks"]) == (len(shown), shown["label"].sum())
    assert counts["event_timestamp"] >= started
    online_item = open_store(run, private_redis.url).get_online_features(
        features=["item_activity:item_impressions"], entity_rows=[{"item_id": item}]).to_dict()  # fmt: skip
    assert online_item["item_impressions"][0] == len(shown)


def test_two_ingests_on_one_run_directory_never_lose_or_corrupt_a_batch(run, private_redis, tmp_path):
    """Started together: one writes, the other stops at once naming the holder; every table
    still reads, and nothing is lost: the refused batch goes in when run again."""
    paths = RunPaths(run)
    events = fresh_events(run, n=20)
    batches = [tmp_path / "a.csv", tmp_path / "b.csv"]
    events.iloc[:10].to_csv(batches[0], index=False)
    events.iloc[10:].assign(user_id=USER + 1).to_csv(batches[1], index=False)
    procs = [subprocess.Popen(ingest_cmd(run, b, private_redis.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for b in batches]  # fmt: skip
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all("Traceback" not in err for _, _, err in outs), outs
    refused = [i for i, (code, _, _) in enumerate(outs) if code != 0]
    assert len(refused) <= 1, outs
    for i in refused:
        assert outs[i][0] == 2 and "is being written by pid" in outs[i][2] and "loopfm ingest" in outs[i][2]
        loopfm("ingest", "--run-dir", str(run), "--events", str(batches[i]), "--redis-url", private_redis.url)
    stored = read_parquet(paths.table("impressions"))["impression_id"]
    assert set(events["impression_id"]) <= set(stored) and stored.is_unique
    assert set(events["impression_id"]) <= set(read_parquet(paths.fm_log)["impression_id"])
    assert not list(run.rglob("*.tmp")) and not (tmp_path / ".run.lock.holder").exists()


def test_an_events_file_reads_alike_as_csv_tsv_compressed_or_parquet_with_float_ids(built_run, tmp_path):
    """The separator follows the name before `.gz`; a parquet file's float64 ids are read exactly."""
    from loopfm.config import RunConfig
    from loopfm.pipeline.ingest import IngestError, read_events

    paths, cfg = RunPaths(built_run), RunConfig.load(built_run)
    batch = fresh_events(built_run)
    batch.to_csv(tmp_path / "events.csv", index=False)
    expected = read_events(tmp_path / "events.csv", cfg, paths)
    batch.to_csv(tmp_path / "events.tsv.gz", sep="\t", index=False)
    batch.to_csv(tmp_path / "events.CSV.gz", index=False)
    batch.astype({"user_id": "float64", "item_id": "float64"}).to_parquet(tmp_path / "events.parquet")
    for name in ("events.tsv.gz", "events.CSV.gz", "events.parquet"):
        pd.testing.assert_frame_equal(read_events(tmp_path / name, cfg, paths), expected, obj=name)
    batch.assign(user_id=float(2**53 + 2)).to_parquet(tmp_path / "rounded.parquet")
    with pytest.raises(IngestError, match=r"rounded.parquet: column 'user_id', row 1: .* beyond 2\*\*53"):
        read_events(tmp_path / "rounded.parquet", cfg, paths)
