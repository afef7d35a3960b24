"""`loopfm ingest`: a producer into the live loop. The file is checked whole, then published,
then applied by a worker before the command returns; a re-run adds nothing; an unreachable
Redis, a bad file or a run without a loopfm FM checkpoint is refused before anything is
published or written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import redis

from conftest import loopfm
from loopfm.core.config import RunConfig
from loopfm.contract.names import PROJECT, items_written_key
from loopfm.core.rundir import RunPaths
from loopfm.data import streamed as offline
from loopfm.stream.keys import StreamKeys
from test_stream import assert_online_equals_batch, base, events_of, live, touched  # noqa: F401  (fixtures)

USER = 3


def fresh_events(run: Path, n: int = 5) -> pd.DataFrame:
    """n clicks of USER on the run's first shop items, stamped in the last minutes."""
    from loopfm.core.files import read_parquet

    paths = RunPaths(run)
    shop = read_parquet(paths.table("items")).query("vertical == 'shop'")["item_id"].to_numpy()[:n]
    now = pd.Timestamp.now(tz="UTC").floor("s")
    return pd.DataFrame({
        "impression_id": 4 * 10**9 + pd.RangeIndex(n), "user_id": USER, "item_id": shop, "vertical": "shop",
        "event_timestamp": [now - pd.Timedelta(minutes=10 - i) for i in range(n)], "label": 1,
    })  # fmt: skip


def digest(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def ingest(run: Path, events: Path, url: str, check: bool = True):
    return loopfm("ingest", "--run-dir", str(run), "--events", str(events), "--redis-url", url, check=check)


def nothing_published(run: Path, url: str) -> bool:
    client = redis.Redis.from_url(url)
    keys = StreamKeys(PROJECT, RunConfig.load(run).stream.partitions)
    return all(client.xlen(k) == 0 for k in keys.all_events()) and not (run / "stream").exists()


def test_an_ingested_file_is_applied_before_the_command_returns_and_a_rerun_adds_nothing(live, tmp_path):
    run, url = live
    messages = events_of(run, 60, seed=11, new_users=(6_000_001,))
    pd.DataFrame(messages).to_csv(tmp_path / "events.csv", index=False)
    out = ingest(run, tmp_path / "events.csv", url).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["published"], summary["applied"], summary["duplicates"]) == (60, 60, 0)
    assert f"published 60 impressions from {tmp_path / 'events.csv'}; this worker applied 60" in out
    paths = RunPaths(run)
    assert sorted(offline.read_impressions(paths)["impression_id"]) == sorted(m["impression_id"] for m in messages)
    assert_online_equals_batch(run, url, *touched(messages))
    files = offline.files(paths, offline.IMPRESSIONS)

    again = json.loads(ingest(run, tmp_path / "events.csv", url).stdout.strip().splitlines()[-1])
    assert (again["published"], again["applied"], again["duplicates"]) == (60, 0, 60)
    assert offline.files(paths, offline.IMPRESSIONS) == files  # no new offline rows
    assert_online_equals_batch(run, url, *touched(messages))  # counts not doubled


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda df: df.drop(columns="label"), "missing column(s) ['label']"),
        (lambda df: df.astype({"user_id": object}).assign(user_id=[3, 3, "x", 3, 3]), "column 'user_id', row 3: not an integer"),
        (lambda df: df.assign(label=[1, 0, 2, 1, 1]), "column 'label', row 3: labels must be 0 or 1"),
        (lambda df: df.assign(vertical="cars"), "column 'vertical', row 1: vertical not in"),
        (lambda df: df.assign(event_timestamp=[1790848800, 12345, 1790848801, 1790848802, 1790848803]),
         "column 'event_timestamp', row 2: a unix time whose unit cannot be told"),
        (lambda df: df.assign(event_timestamp=[str(t.tz_localize(None)) + " EST" for t in df["event_timestamp"]]),
         "column 'event_timestamp', row 1: a time zone abbreviation (EST) that names no one zone"),
        (lambda df: df.astype({"item_id": object}).assign(item_id=[801, 802, 2**63, 803, 804]),
         "column 'item_id', row 3: an integer outside"),
    ],
)
def test_a_bad_file_is_refused_by_name_before_anything_is_published(live, tmp_path, change, message):
    run, url = live
    bad = tmp_path / "bad.csv"
    change(fresh_events(run)).to_csv(bad, index=False)
    result = ingest(run, bad, url, check=False)
    assert result.returncode == 2 and f"{bad}: " in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert nothing_published(run, url)


def test_an_unreachable_redis_is_refused_first_in_one_line(copy_of_run, tmp_path):
    fresh_events(copy_of_run).assign(label=7).to_csv(tmp_path / "bad.csv", index=False)  # a bad file too: Redis comes first
    result = ingest(copy_of_run, tmp_path / "bad.csv", "redis://127.0.0.1:1", check=False)
    assert result.returncode == 2 and result.stderr.startswith("loopfm: error: cannot reach Redis at redis://127.0.0.1:1: ")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (copy_of_run / "stream").exists()


def test_a_run_whose_fm_log_was_imported_is_refused_even_beside_checkpoints_of_loopfms_fm(live, tmp_path):
    """One history, one embedding space: the run still holds loopfm's checkpoints, which made no code of the log."""
    from test_fm_import import embedding_table, write

    run, url = live
    imported = tmp_path / "imported"
    shutil.copytree(run, imported)
    loopfm("fm", "import-log", "--run-dir", str(imported), "--embeddings", str(write(embedding_table(imported), tmp_path / "e.parquet")))
    paths = RunPaths(imported)
    assert list((paths.fm / "checkpoints").glob("ckpt_*.pt"))
    fresh_events(imported).to_csv(tmp_path / "events.csv", index=False)
    before = digest(paths.table("impressions"), paths.fm_log)
    result = ingest(imported, tmp_path / "events.csv", url, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"this run's FM log was imported ({paths.fm / 'import_summary.json'})" in result.stderr
    assert digest(paths.table("impressions"), paths.fm_log) == before
    assert nothing_published(imported, url)


def test_a_run_without_an_fm_checkpoint_is_refused_naming_the_folder(live, tmp_path):
    run, url = live
    checkpoints = RunPaths(run).fm / "checkpoints"
    shutil.rmtree(checkpoints.resolve())
    fresh_events(run).to_csv(tmp_path / "events.csv", index=False)
    result = ingest(run, tmp_path / "events.csv", url, check=False)
    assert result.returncode == 2 and f"no FM checkpoint in {checkpoints}" in result.stderr, result.stderr
    assert nothing_published(run, url)


@pytest.mark.parametrize("unit, value", [(None, 1790848800), ("s", 1790848800), ("ms", 1790848800_000), (None, 1790848800_000_000_000)])
def test_unix_times_in_an_events_file_are_read_in_their_unit_not_as_nanoseconds(built_run, tmp_path, unit, value):
    """1790848800 is 2026-10-01 10:00 UTC in seconds (it was stored as 1970-01-01 00:00:01.79)."""
    from loopfm.data.event_files import read_event_file

    batch = tmp_path / "batch.csv"
    fresh_events(built_run, n=1).assign(event_timestamp=value).to_csv(batch, index=False)
    events = read_event_file(batch, RunConfig.load(built_run), RunPaths(built_run), **({"time_unit": unit} if unit else {}))
    assert events["event_timestamp"].iloc[0] == pd.Timestamp("2026-10-01 10:00", tz="UTC")
    assert events["hour"].iloc[0] == 10


def test_an_events_file_reads_alike_as_csv_tsv_compressed_or_parquet_with_float_ids(built_run, tmp_path):
    """The separator follows the name before `.gz`; a parquet file's float64 ids are read exactly."""
    from loopfm.core.config import RunConfig
    from loopfm.data.event_files import IngestError, read_event_file

    paths, cfg = RunPaths(built_run), RunConfig.load(built_run)
    batch = fresh_events(built_run)
    batch.to_csv(tmp_path / "events.csv", index=False)
    expected = read_event_file(tmp_path / "events.csv", cfg, paths)
    batch.to_csv(tmp_path / "events.tsv.gz", sep="\t", index=False)
    batch.to_csv(tmp_path / "events.CSV.gz", index=False)
    batch.astype({"user_id": "float64", "item_id": "float64"}).to_parquet(tmp_path / "events.parquet")
    for name in ("events.tsv.gz", "events.CSV.gz", "events.parquet"):
        pd.testing.assert_frame_equal(read_event_file(tmp_path / name, cfg, paths), expected, obj=name)
    batch.assign(user_id=float(2**53 + 2)).to_parquet(tmp_path / "rounded.parquet")
    with pytest.raises(IngestError, match=r"rounded.parquet: column 'user_id', row 1: .* beyond 2\*\*53"):
        read_event_file(tmp_path / "rounded.parquet", cfg, paths)


def test_checkpoints_of_another_training_than_the_logs_are_refused_naming_what_to_re_run(live, tmp_path):
    run, url = live
    paths = RunPaths(run)
    source = paths.fm / "log_source.json"
    source.write_text(json.dumps({**json.loads(source.read_text()), "training_id": "an-earlier-training"}))  # as a log of it leaves
    fresh_events(run).to_csv(tmp_path / "events.csv", index=False)
    result = ingest(run, tmp_path / "events.csv", url, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"the FM checkpoints in {paths.fm / 'checkpoints'} are of another training than the one that wrote "
            f"{paths.fm_log}: run `loopfm fm log`") in result.stderr  # fmt: skip
    assert nothing_published(run, url)


def test_the_items_an_ingest_wrote_are_announced_to_the_servers_item_caches(live, tmp_path):
    run, url = live
    events = fresh_events(run)
    events.to_csv(tmp_path / "events.csv", index=False)
    ingest(run, tmp_path / "events.csv", url)
    entries = redis.Redis.from_url(url).xrange(items_written_key(PROJECT))
    assert sorted({item for _, fields in entries for item in json.loads(fields[b"items"])}) == sorted(events["item_id"].tolist())


def killed_ingest(run: Path, events: Path, url: str, when) -> None:
    """`loopfm ingest` killed by SIGKILL as soon as `when(record)` holds for its record in
    stream/ingests/ (None until it is written) and the offline rows streamed so far."""
    import signal
    import subprocess
    import time

    from conftest import LOOPFM

    proc = subprocess.Popen([LOOPFM, "ingest", "--run-dir", str(run), "--events", str(events), "--redis-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    paths, deadline = RunPaths(run), time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            records = [json.loads(p.read_text()) for p in (run / "stream" / "ingests").glob("*.json")]
            if when(records[0] if records else None, len(offline.read(paths, offline.IMPRESSIONS))):
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    "point, when",
    [
        ("published, nothing applied yet", lambda record, streamed: record is not None and record["published"] and streamed == 0),
        ("part applied", lambda record, streamed: 100 <= streamed),
    ],
)
def test_an_ingest_killed_mid_way_is_refused_by_features_build_by_name_until_run_again_which_completes_it(
    live, tmp_path, point, when
):
    """Case 23: the rows of a half-applied ingest never reach a training set as if they were
    the whole file; running the ingest again applies what is left, each event once."""
    run, url = live
    raw = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(raw | {"stream": {"batch_size": 20, "lease_ms": 2000}}))  # many micro-batches
    messages = events_of(run, 3000, seed=12)
    events = tmp_path / "events.csv"
    pd.DataFrame(messages).to_csv(events, index=False)
    paths = RunPaths(run)
    killed_ingest(run, events, url, when)
    streamed = len(offline.read_impressions(paths))
    assert streamed < 3000, f"the kill must land before the ingest finished ({point})"
    features = paths.features.resolve()

    refused = loopfm("features", "build", "--run-dir", str(run), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"an ingest into {run} did not finish: `loopfm ingest --events {events}`" in refused.stderr
    assert f"run `loopfm ingest --run-dir {run} --events {events}` again (with the Redis it published to)" in refused.stderr
    assert paths.features.resolve() == features and len(offline.read_impressions(paths)) == streamed  # nothing written

    again = ingest(run, events, url).stdout
    assert f"{events} was published whole by an ingest that did not finish; applying what it left" in again
    assert json.loads(again.strip().splitlines()[-1])["published"] == 0
    assert sorted(offline.read_impressions(paths)["impression_id"]) == sorted(m["impression_id"] for m in messages)
    assert_online_equals_batch(run, url, *touched(messages))  # each event counted once
    assert not list((run / "stream" / "ingests").glob("*.json"))
    loopfm("features", "build", "--run-dir", str(run))
    assert paths.features.resolve() != features
