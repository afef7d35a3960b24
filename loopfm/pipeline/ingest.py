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

An ingest stopped before its events are applied (killed, or its wait timed out) leaves a
record in stream/ingests/ (written before the first entry is published, removed once every
entry is applied), and `loopfm features build` refuses to read the half-applied rows while it
is there (`unfinished`). Running the same ingest again completes it: when the stopped one
had published the whole file, nothing is published again and the worker applies what is left.

The file checks are loopfm/data/event_files.py's, shared with `loopfm events publish`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from loopfm.core.config import RunConfig
from loopfm.core.files import write_text
from loopfm.core.rundir import RunPaths
from loopfm.data import streamed as offline
from loopfm.data.event_files import read_event_file
from loopfm.stream.keys import StreamKeys


def _records(paths: RunPaths) -> list[tuple[Path, dict]]:
    """The records of the ingests into this run that have not finished (module docstring)."""
    return [(p, json.loads(p.read_text())) for p in sorted(offline.folder(paths, "ingests").glob("*.json"))]


def unfinished(paths: RunPaths) -> str | None:
    """Why the run's streamed rows are not whole: the first unfinished ingest and how to finish
    it, or None when every ingest into the run finished."""
    found = _records(paths)
    if not found:
        return None
    path, record = found[0]
    return (f"an ingest into {paths.root} did not finish: `loopfm ingest --events {record['events']}` (pid {record['pid']}, "
            f"started {record['started']}) was stopped or is still running, so its events are only partly applied "
            f"({path}); run `loopfm ingest --run-dir {paths.root} --events {record['events']}` again (with the Redis it "
            f"published to): it applies the rest, skipping what was applied; or remove {path} to use only what was "
            "applied")  # fmt: skip


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    digests = {"sha256": _digest(events_path.read_bytes()), "redis": _digest(redis_url.encode())}  # no credentials in the run
    earlier = [(p, r) for p, r in _records(paths) if digests.items() <= r.items()]
    record_path = offline.folder(paths, "ingests") / f"{os.getpid()}.json"
    record = {"pid": os.getpid(), "events": str(events_path), **digests,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "published": False}  # fmt: skip
    write_text(record_path, json.dumps(record))
    if any(r["published"] for _, r in earlier):  # every entry is in the streams: apply what is left, publish nothing
        log(f"ingest: {events_path} was published whole by an ingest that did not finish; applying what it left")
        published = 0
    else:
        with contextlib.closing(Producer(redis_url, cfg.stream.partitions)) as producer:
            producer.events(messages)
        published = len(messages)
    write_text(record_path, json.dumps(record | {"published": True}))
    summary = run_worker(run_dir, redis_url, f"ingest-{os.getpid()}", idle_exit_s=0.5, progress_s=30.0)
    _wait_applied(redis_url, StreamKeys(PROJECT, cfg.stream.partitions), timeout_s)
    finished = {p for p, _ in earlier} | {p for p, r in _records(paths) if r["published"]}  # every published entry is applied
    for path in finished:
        path.unlink(missing_ok=True)
    summary = {"published": published, **summary}
    log(f"ingest: published {published} impressions from {events_path}; this worker applied {summary['applied']}, "
        f"skipped {summary['duplicates']} already applied, {summary['dead_letters']} dead letters")  # fmt: skip
    log(json.dumps(summary))
    return summary
