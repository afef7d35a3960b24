"""In-process cache of tensorized item rows: bounded, expiring, with a measured hit rate.

Item features change rarely and a request carries up to 1,000 of them, so re-reading them
from Redis on every request dominates the read path. User features are never cached.
Items absent from the store are cached too (as unknown).

Rows the live loop rewrites are dropped as soon as the loop says so: every stream worker
appends the ids of the items it wrote to `loopfm:{project}:items-written` after writing them
(loopfm/stream/keys.py), and each request reads the entries it has not seen yet in its one
round trip (`written_query`), then drops those rows (`forget_written`): an ingested event's
item counts reach the scorer with the next request, as its user's history does. The TTL
bounds what that feed does not carry: `loopfm features apply` (a materialization), and a row
read in the very round trip during which its item is written.

The rows live in one [max_items, width] matrix and the index maps an id to its slot, so a
request's cached rows come out with one gather, taken at lookup, before the request awaits
Redis: stacking per-item arrays on every request costs more than one gather
(docs/serving.md, "Where the time goes").
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np


WRITTEN_PAGE = 1_000  # feed entries read per request; a full page drops every row (more were written)


def _entry_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id "ms-seq" as a comparable pair."""
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    return int(ms), int(seq)


class ItemCache:
    def __init__(self, max_items: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_items, self.ttl_s, self._clock = max_items, ttl_s, clock  # clock: seconds, for the TTL
        self._index: OrderedDict[int | str, tuple[float, int]] = OrderedDict()  # id -> (expires, slot), LRU first
        self._matrix: np.ndarray | None = None  # [max_items, width], allocated at the first store
        self._written_after: tuple[int, int] | None = None  # newest items-written entry seen; None: none read yet
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_items > 0 and self.ttl_s > 0

    def lookup(self, item_ids: Sequence[int | str]) -> tuple[np.ndarray | None, np.ndarray, list[int | str]]:
        """The cached rows gathered now, in request order ([C, W], rows of missing ids left for
        `complete`; None before the first store), which ids were hit ([C] bool), and the
        missing ids, each once, in first-seen order. Gathered here, not after the Redis read:
        a request that stores meanwhile may give an evicted row's slot to another item."""
        now = self._clock()
        slots = np.full(len(item_ids), -1, dtype=np.int64)
        missing: dict[int | str, None] = {}
        for position, item in enumerate(item_ids):
            entry = self._index.get(item)
            if entry is not None and entry[0] > now:
                self._index.move_to_end(item)
                slots[position] = entry[1]
            else:
                missing[item] = None
        hit = slots >= 0
        self.hits += int(hit.sum())
        self.misses += len(item_ids) - int(hit.sum())
        rows = None if self._matrix is None else self._matrix[np.where(hit, slots, 0)]
        return rows, hit, list(missing)

    def complete(self, item_ids: Sequence[int | str], rows: np.ndarray | None, hit: np.ndarray,
                 missing: Sequence[int | str], fresh: np.ndarray | None) -> np.ndarray:  # fmt: skip
        """[C, W] rows in request order: the ones `lookup` gathered where `hit`, the others from
        `fresh` [M, W] (the rows of `missing`, in its order), which are then stored. ValueError
        if an id has neither."""
        if fresh is None or not len(missing):
            if rows is None or not hit.all():
                raise ValueError("ids without a cached row need their fresh rows")
            return rows
        out = np.empty((len(item_ids), fresh.shape[1]), dtype=fresh.dtype)
        if rows is not None and hit.any():
            out[hit] = rows[hit]
        fresh_row = {item: k for k, item in enumerate(missing)}
        gaps = np.flatnonzero(~hit)
        out[gaps] = fresh[[fresh_row[item_ids[g]] for g in gaps]]
        self.store(missing, fresh)
        return out

    def store(self, item_ids: Sequence[int | str], rows: np.ndarray) -> None:
        """Cache `rows` [M, W] of `item_ids` (distinct ids) until the TTL, evicting the least
        recently used rows beyond `max_items`."""
        if not self.enabled:
            return
        if self._matrix is None or self._matrix.shape[1:] != rows.shape[1:] or self._matrix.dtype != rows.dtype:
            self._matrix, self._index = np.zeros((self.max_items, *rows.shape[1:]), dtype=rows.dtype), OrderedDict()
        expires = self._clock() + self.ttl_s
        for item, row in zip(item_ids, rows):
            entry = self._index.pop(item, None)
            if entry is not None:
                slot = entry[1]
            elif len(self._index) < self.max_items:
                slot = len(self._index)
            else:  # full: the least recently used row gives up its slot
                slot = self._index.popitem(last=False)[1][1]
            self._matrix[slot] = row
            self._index[item] = (expires, slot)

    def written_query(self, key: str) -> tuple | None:
        """The command reading the items-written feed `key` past the newest entry seen (the
        newest entry only, the first time); None when the cache is off."""
        if not self.enabled:
            return None
        if self._written_after is None:
            return ("XREVRANGE", key, "+", "-", "COUNT", 1)
        ms, seq = self._written_after
        return ("XRANGE", key, f"({ms}-{seq}", "+", "COUNT", WRITTEN_PAGE)

    def forget_written(self, entries: list[tuple[Any, dict]] | None) -> None:
        """Expire the rows of the items `entries` name (the reply of `written_query`: [(entry
        id, {b"items": JSON list of ids})]); a full page expires every row. Called after the
        request stored its own rows, so a row read before its item was written goes too."""
        if entries is None:
            return
        first = self._written_after is None
        newest = max((_entry_id(entry_id) for entry_id, _ in entries), default=(0, 0))
        self._written_after = max(self._written_after or (0, 0), newest)
        if first:
            return
        if len(entries) >= WRITTEN_PAGE:
            items = list(self._index)
        else:
            items = [item for _, fields in entries for item in json.loads(fields[b"items"]) if item in self._index]
        for item in items:
            self._index[item] = (0.0, self._index[item][1])  # expired, its slot kept for the next store

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._index)
