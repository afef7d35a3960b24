"""Redis key names of the live loop, and the stable user -> partition hash.

Every key carries the Feast project, as Feast's own keys do, so two projects share a server.
Keys hold no hash tags: on Redis Cluster the P stream keys spread over the shards, and no
command of the loop touches two keys at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

GROUP = "loopfm-stream"  # the consumer group of every partition
ITEMS_WRITTEN_MAX_LEN = 10_000  # entries of contract.names.items_written_key kept, about


def partition_of(source_id: int | str, partitions: int) -> int:
    """The partition of an entity: crc32 of its source id's text, mod `partitions`. Stable across
    processes and machines (Python's hash() is not); an int64 id and its decimal text agree."""
    return zlib.crc32(str(source_id).encode()) % partitions


@dataclass(frozen=True)
class StreamKeys:
    """The keys of one project's loop with `partitions` stream keys."""

    project: str
    partitions: int

    def _key(self, *parts: object) -> str:
        return ":".join(["loopfm", self.project, *map(str, parts)])

    def events(self, partition: int) -> str:
        """The stream of partition `partition` (events and catalog upserts)."""
        return self._key("events", partition)

    def all_events(self) -> list[str]:
        return [self.events(p) for p in range(self.partitions)]

    @property
    def dead_letters(self) -> str:
        """The stream of refused messages, each with its reason and its original fields."""
        return self._key("dead-letters")

    def lease(self, partition: int) -> str:
        """Who may read partition `partition` now (a worker name, expiring)."""
        return self._key("lease", partition)

    @property
    def workers(self) -> str:
        """Sorted set: live worker names, scored by the unix ms their heartbeat expires."""
        return self._key("workers")

    def new_ids(self, entity: str) -> str:
        """Hash: dense index of each source id the run's id map did not hold, and `next`."""
        return self._key("ids", entity)

    @property
    def bootstrapped(self) -> str:
        """Set once every user's and item's starting state is stored (loopfm/stream/bootstrap.py)."""
        return self._key("bootstrapped")
