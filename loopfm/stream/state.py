"""One user's running state: what the FM needs to encode the user's next event, and the VM
histories the online store serves, updated in O(1) per event.

The same point-in-time rule as the batch FM inputs (fm/inputs.py: build_inputs): an event's
inputs see the user's events with an *earlier* timestamp only. The state keeps what lies
strictly before the newest applied time (`*_before`) apart from what happened at that time
(`*_at`); a newer event first folds the second into the first. An event older than the
newest applied one (late) reads the state as of that newest time: it is applied in arrival
order, never re-ordered into the past (its code becomes available when it is applied).

Idempotency: `applied` is the newest stream entry id applied (one user's events all come
through one partition, in order) and `recent` the user's last impression ids, so a
redelivered entry and a re-sent event (within `stream.dedup_window`) change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import orjson

ALL = "*"  # the counts scope of every vertical together


def entry_order(entry_id: str) -> tuple[int, int]:
    """A Redis Streams entry id "ms-seq" as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class UserState:
    """Shapes: lists hold dense ids or hex codes, oldest first, at most the configured length."""

    dense: int  # the user's dense index (loopfm/data/ids.py)
    t_last: int = -1  # unix µs: the newest applied event time
    applied: str = "0-0"  # the newest applied stream entry id
    recent: list[int] = field(default_factory=list)  # impression ids applied lately
    clicks_before: list[int] = field(default_factory=list)  # clicked items (all verticals) before t_last
    clicks_at: list[int] = field(default_factory=list)  # clicked items at t_last
    declined_before: list[int] = field(default_factory=list)  # items shown without a click (all verticals) before t_last
    declined_at: list[int] = field(default_factory=list)  # ... at t_last
    counts_before: dict[str, list[int]] = field(default_factory=dict)  # scope -> [impressions, clicks] before t_last
    counts_at: dict[str, list[int]] = field(default_factory=dict)
    # [impressions, clicks] before t_last over every vertical, each weighted 2^(-m / fm.recent_half_life)
    # for the m events since (core/sequences.decayed_before): the FM's `rate_recent`.
    recent_before: list[float] = field(default_factory=lambda: [0.0, 0.0])
    vm_clicks: dict[str, list[int]] = field(default_factory=dict)  # vertical -> last L clicked items (vm_click_history)
    fm_codes: list[str] = field(default_factory=list)  # last L FM codes, hex (fm_history)
    fm_newest_available_us: int = 0
    fm_trained_until_us: int = 0
    # The FM-only signal filter (fm/inputs.py: _intent; synthetic worlds, else empty) on day
    # `intent_day`, the first after the signals table: per half-life a decayed sum and weight.
    intent_day: int = 0
    intent_total: list[list[float]] = field(default_factory=list)
    intent_weight: list[float] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson serializes a dataclass as asdict would, without the copy

    @classmethod
    def from_bytes(cls, blob: bytes) -> "UserState":
        return cls(**orjson.loads(blob))

    def intent(self, day: int, half_lives: Sequence[float], k: int) -> np.ndarray:
        """The FM's intent input [k * (1 + len(half_lives))] float32 for an event on `day`: no
        signal of its own (none exist after the table), then each half-life's average, decayed
        from `intent_day` as `_intent` does (a day inside the table reads as `intent_day`)."""
        if k == 0:
            return np.zeros(0, dtype=np.float32)
        parts = [np.zeros(k)]
        total = np.asarray(self.intent_total, dtype=np.float64).reshape(len(half_lives), k)
        weight = np.asarray(self.intent_weight, dtype=np.float64).reshape(len(half_lives))
        for h, (t, w) in enumerate(zip(total, weight)):
            decay = 0.5 ** (max(day - self.intent_day, 0) / half_lives[h])
            parts.append(t * decay / max(w * decay, 1e-12))
        return np.concatenate(parts).astype(np.float32)

    def redelivered(self, entry_id: str) -> bool:
        """True for a stream entry at or before the newest applied one (a replay after a crash)."""
        return entry_order(entry_id) <= entry_order(self.applied)

    def resent(self, impression_id: int) -> bool:
        """True for an impression id applied lately under another entry (a producer's retry)."""
        return impression_id in self.recent

    def advance(self, time_us: int, raw_length: int, recent_half_life: float) -> None:
        """Move to an event at `time_us`: when it is newer than t_last, what happened at t_last
        becomes "before" (each raw history keeps its newest `raw_length`; the decayed counts
        decay by the number of events at t_last, then add them)."""
        if time_us <= self.t_last:
            return
        n_at, k_at = self.counts_at.get(ALL, (0, 0))
        keep = 0.5 ** (n_at / recent_half_life)
        self.recent_before = [keep * self.recent_before[0] + n_at, keep * self.recent_before[1] + k_at]
        self.clicks_before = (self.clicks_before + self.clicks_at)[-raw_length:] if raw_length else []
        self.declined_before = (self.declined_before + self.declined_at)[-raw_length:] if raw_length else []
        for scope, (n, k) in self.counts_at.items():
            before = self.counts_before.setdefault(scope, [0, 0])
            before[0], before[1] = before[0] + n, before[1] + k
        self.clicks_at, self.declined_at, self.counts_at, self.t_last = [], [], {}, time_us

    def counts(self, scope: str, include_at: bool = False) -> tuple[int, int]:
        """(impressions, clicks) of a scope (ALL or a vertical) before t_last, or up to and
        including it."""
        n, k = self.counts_before.get(scope, (0, 0))
        if include_at:
            n_at, k_at = self.counts_at.get(scope, (0, 0))
            n, k = n + n_at, k + k_at
        return n, k

    def record(self, entry_id: str, impression_id: int, vertical: str, item: int, label: int, history_length: int,
               dedup_window: int) -> None:  # fmt: skip
        """Apply one event's counts and clicks (after `advance`); its FM code follows in `add_code`."""
        for scope in (ALL, vertical):
            at = self.counts_at.setdefault(scope, [0, 0])
            at[0], at[1] = at[0] + 1, at[1] + label
        if label:
            self.clicks_at.append(item)
            self.vm_clicks[vertical] = (self.vm_clicks.get(vertical, []) + [item])[-history_length:]
        else:
            self.declined_at.append(item)
        self.applied = entry_id
        self.recent = (self.recent + [impression_id])[-dedup_window:] if dedup_window else []

    def add_code(self, code: bytes, available_us: int, trained_until_us: int, history_length: int) -> None:
        """Append the FM code of an event that is an FM history member (fm.history_events)."""
        self.fm_codes = (self.fm_codes + [code.hex()])[-history_length:]
        self.fm_newest_available_us = max(self.fm_newest_available_us, available_us)
        self.fm_trained_until_us = max(self.fm_trained_until_us, trained_until_us)
