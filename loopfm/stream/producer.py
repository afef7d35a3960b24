"""Producers of the loop: impressions and catalog upserts onto the partitioned streams.

From Python:

    from loopfm.stream.producer import Producer
    producer = Producer("redis://127.0.0.1:6379", partitions=8)
    producer.events([{"impression_id": 1, "user_id": 42, "item_id": 7, "vertical": "shop",
                      "event_timestamp": 1_767_225_600_000_000, "label": 1}])
    producer.items([{"item_id": 7, "category": 3, "brand": 11, "price_bucket": 4}])

(fields of loopfm/stream/messages.py; event_timestamp in unix µs). From the shell,
`loopfm events publish --run-dir R FILE` and `loopfm items upsert --run-dir R FILE` check the
whole file first, naming the file, column and row of the first fault, and publish nothing
from a bad file. A worker checks each message again and files a bad one, with its reason, in
the dead-letter stream: a producer may be anything.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from loopfm.contract.names import PROJECT
from loopfm.core.config import RunConfig, StreamConfig
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import unix_us
from loopfm.data.event_files import read_event_file, read_item_file
from loopfm.stream.keys import StreamKeys, partition_of
from loopfm.stream.messages import IMPRESSION_FIELDS

_CHUNK = 1000  # XADDs per pipeline


class Producer:
    """XADDs messages to partition crc32(id) % partitions of `project`'s loop (loopfm/stream/keys.py):
    impressions by user id, catalog upserts by item id. Returns the entry ids, in input order.
    Each partition keeps about `max_len` entries (XADD MAXLEN ~, trimmed oldest first;
    `stream.max_len` of the run's config)."""

    def __init__(self, redis_url: str, partitions: int, max_len: int = StreamConfig.max_len, project: str = PROJECT):
        from loopfm.features.store import sync_client

        self.client, self.keys, self.max_len = sync_client(redis_url), StreamKeys(project, partitions), max_len

    def _publish(self, messages: Iterable[Mapping], by: str, kind: str) -> list[str]:
        ids: list[str] = []
        pipe = self.client.pipeline(transaction=False)
        for n, message in enumerate(messages, start=1):
            fields = {k: str(v) for k, v in message.items()} | {"kind": kind}
            pipe.xadd(self.keys.events(partition_of(fields.get(by, ""), self.keys.partitions)), fields, maxlen=self.max_len, approximate=True)
            if n % _CHUNK == 0:
                ids += pipe.execute()
        ids += pipe.execute()
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    def events(self, messages: Iterable[Mapping]) -> list[str]:
        """Impressions: maps with the fields IMPRESSION_FIELDS."""
        return self._publish(messages, "user_id", "impression")

    def items(self, messages: Iterable[Mapping]) -> list[str]:
        """Catalog upserts: maps with the fields ITEM_FIELDS."""
        return self._publish(messages, "item_id", "item")

    def close(self) -> None:
        self.client.close()


def event_messages(events: pd.DataFrame) -> list[dict]:
    """A checked events frame (loopfm.data.event_files.read_event_file) -> messages."""
    frame = events.assign(event_timestamp=unix_us(events["event_timestamp"]))
    return frame[list(IMPRESSION_FIELDS)].to_dict("records")


def publish_file(run_dir: Path, path: Path, redis_url: str, kind: str, time_unit: str | None = None, log=print) -> int:
    """`loopfm events publish` (kind "events") / `loopfm items upsert` (kind "items"): check
    the whole file, then publish every row. Returns the number of messages."""
    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    if kind == "events":
        messages = event_messages(read_event_file(path, cfg, paths, time_unit))
    else:
        messages = read_item_file(path, paths).to_dict("records")
    with contextlib.closing(Producer(redis_url, cfg.stream.partitions, cfg.stream.max_len)) as producer:
        (producer.events if kind == "events" else producer.items)(messages)
    log(f"published {len(messages)} {'impressions' if kind == 'events' else 'catalog upserts'} from {path} "
        f"to {cfg.stream.partitions} partitions")  # fmt: skip
    return len(messages)
