"""`loopfm ingest`: a file of impressions into the live loop, applied before the command returns.

One writer: ingest is a producer of the loop (loopfm/stream/producer.py) followed by a worker
(loopfm/stream/worker.py) that runs until the published entries are applied, so a file takes
the path a live event takes: FM codes encoded by the worker, the online store written per
event, the offline rows appended under stream/impressions/ (read by `loopfm features build`).
Before anything is published the command checks, in this order, that the Redis URL answers,
that the run has a loopfm FM checkpoint to encode with (not a run whose log was imported), and
the whole file (the file, column and row of the first fault). A re-run of the same file
changes nothing: the worker skips an impression id its user already has (the newest
`stream.dedup_window` per user).

`read_table` and `read_event_file` are the file checks shared with `loopfm events publish` and
`loopfm items upsert`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from loopfm.config import RunConfig
from loopfm.contract.names import ID_INT64
from loopfm.data.ids import IdMap, load_id_maps
from loopfm.io import RunPaths, from_unix_us
from loopfm.parse import INT64_RANGE, BadValues, integers, unix_times_us
from loopfm.stream.keys import StreamKeys

EVENT_COLUMNS = ("impression_id", "user_id", "item_id", "vertical", "event_timestamp", "label")


class IngestError(ValueError):
    """A bad events file; the message names the file, the column and the row."""


def _first_bad(path: Path, column: str, bad, what: str) -> None:
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise IngestError(f"{path}: column {column!r}, row {row + 1}: {what} ({int(bad.sum())} such rows)")


def _parsed(path: Path, raw: pd.DataFrame, column: str, parse):
    """`parse(raw[column])` (loopfm.parse), its BadValues named by file, column and row."""
    _first_bad(path, column, raw[column].isna(), "missing value")
    try:
        return parse(raw[column])
    except BadValues as exc:
        _first_bad(path, column, exc.bad, exc.problem)
        raise


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV (read as text: numbers are parsed exactly later, never through float64) or parquet
    file holding `columns`. Raises IngestError naming the file."""
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    csv = path.suffix.lower() == ".csv"
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""]) if csv else pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many kinds for a file that is not what it says
        raise IngestError(f"{path}: not a readable {'CSV' if csv else 'parquet'} file: {exc}") from None
    missing = [c for c in columns if c not in raw.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
    return raw


def read_event_file(path: Path, cfg: RunConfig, paths: RunPaths, time_unit: str | None = None) -> pd.DataFrame:
    """Load and check a file of impressions (parquet or CSV) against the run it joins, ids kept
    as source ids (int64 or text per the run's entity types, loopfm/data/ids.py). Ids are parsed
    exactly, times by the project's one parser (`time_unit`: the unit of numeric
    event_timestamp values, None infers it). Raises IngestError naming the file, column and row."""
    raw = read_table(path, EVENT_COLUMNS)
    events = pd.DataFrame({"vertical": raw["vertical"].astype(str)})
    for column in ("impression_id", "label"):
        events[column] = _parsed(path, raw, column, lambda v: integers(v, INT64_RANGE)).astype(np.int64)
    for id_map in load_id_maps(paths):
        events[id_map.key] = _source_ids(path, raw, id_map).to_numpy()
    events["event_timestamp"] = from_unix_us(_parsed(path, raw, "event_timestamp", lambda v: unix_times_us(v, time_unit)))
    events["hour"] = events["event_timestamp"].dt.hour.astype(np.int64)
    _first_bad(path, "label", ~events["label"].isin([0, 1]), "labels must be 0 or 1")
    _first_bad(path, "vertical", ~events["vertical"].isin(cfg.world.verticals), f"vertical not in {list(cfg.world.verticals)}")
    return events[["impression_id", "user_id", "item_id", "vertical", "event_timestamp", "hour", "label"]]


def _source_ids(path: Path, raw: pd.DataFrame, id_map: IdMap) -> pd.Series:
    """A batch's id column as the run's source ids: exact int64 for an int64 entity (never
    through float64), text for a string one."""
    if id_map.id_type == ID_INT64:
        return _parsed(path, raw, id_map.key, lambda v: integers(v, INT64_RANGE)).astype(np.int64)
    _first_bad(path, id_map.key, raw[id_map.key].isna(), "missing value")
    return raw[id_map.key].astype(str)


def _reachable(redis_url: str) -> None:
    """Raise RuntimeError (one line) unless the server at `redis_url` answers PING."""
    import redis

    from loopfm.features.store import sync_client

    try:
        with contextlib.closing(sync_client(redis_url)) as client:
            client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RuntimeError(f"cannot reach Redis at {redis_url}: {' '.join(str(exc).split())}") from None


def _wait_applied(redis_url: str, keys: StreamKeys, timeout_s: float) -> None:
    """Poll until every partition's group has nothing undelivered (lag) and nothing unacked
    (pending); other live workers may hold some partitions. Raises RuntimeError on timeout."""
    from loopfm.features.store import sync_client
    from loopfm.stream.keys import GROUP

    deadline = time.monotonic() + timeout_s
    with contextlib.closing(sync_client(redis_url)) as client:
        while True:
            left = 0
            for key in keys.all_events():
                for group in client.xinfo_groups(key) if client.exists(key) else []:
                    if group["name"] in (GROUP, GROUP.encode()):
                        left += int(group.get("lag") or 0) + int(group.get("pending") or 0)
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{left} published entries not applied after {timeout_s:.0f} s: are the loop's workers stuck?")
            time.sleep(0.05)


def ingest(run_dir: Path, events_path: Path, redis_url: str, log=print, time_unit: str | None = None,
           timeout_s: float = 600.0) -> dict:  # fmt: skip
    """Check (module docstring), publish every event, run a worker until they are applied;
    return the worker's summary (applied, duplicates, dead_letters, ...) with `published`."""
    from loopfm.contract.names import PROJECT
    from loopfm.stream.producer import Producer, event_messages
    from loopfm.stream.worker import newest_checkpoint, run_worker

    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    _reachable(redis_url)
    newest_checkpoint(paths, cfg)
    messages = event_messages(read_event_file(events_path, cfg, paths, time_unit))
    with contextlib.closing(Producer(redis_url, cfg.stream.partitions)) as producer:
        producer.events(messages)
    summary = run_worker(run_dir, redis_url, f"ingest-{os.getpid()}", idle_exit_s=0.5, progress_s=30.0)
    _wait_applied(redis_url, StreamKeys(PROJECT, cfg.stream.partitions), timeout_s)
    summary = {"published": len(messages), **summary}
    log(f"ingest: published {len(messages)} impressions from {events_path}; this worker applied {summary['applied']}, "
        f"skipped {summary['duplicates']} already applied, {summary['dead_letters']} dead letters")  # fmt: skip
    log(json.dumps(summary))
    return summary
