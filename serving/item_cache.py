"""In-process cache of tensorized item rows: bounded, expiring, with a measured hit rate.

Item features change rarely and a request carries up to 1,000 of them, so re-reading them
from Redis on every request dominates the read path. User features are never cached.
Items absent from the store are cached too (as unknown), so the TTL also bounds how long
a newly materialized item stays unknown to this process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Sequence

import numpy as np


class ItemCache:
    def __init__(self, max_items: int, ttl_s: float):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._rows: OrderedDict[int | str, tuple[float, np.ndarray]] = OrderedDict()
        self.hits = self.misses = 0

    def lookup(self, item_ids: Sequence[int | str]) -> tuple[list[np.ndarray | None], list[int | str]]:
        """Cached rows in request order (None where missing or expired) and the missing ids."""
        now = time.monotonic()
        rows: list[np.ndarray | None] = []
        missing: list[int | str] = []
        for item in item_ids:
            entry = self._rows.get(item)
            if entry is not None and entry[0] > now:
                self._rows.move_to_end(item)
                rows.append(entry[1])
            else:
                rows.append(None)
                missing.append(item)
        self.hits += len(item_ids) - len(missing)
        self.misses += len(missing)
        return rows, missing

    def store(self, item_ids: Sequence[int | str], rows: np.ndarray) -> None:
        if self.max_items <= 0 or self.ttl_s <= 0:
            return
        expires = time.monotonic() + self.ttl_s
        for item, row in zip(item_ids, rows):
            self._rows[item] = (expires, row.copy())  # a view would keep the whole batch alive
            self._rows.move_to_end(item)
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._rows)
