"""An open-loop producer that measures freshness: how long after its XADD an event is visible
to a reader of the online store (`loopfm bench stream`, `make demo`).

Messages leave on a fixed schedule whatever the workers do. For about SAMPLES_PER_S events a
second the producer polls the event's user hash until the user's state says the event is
applied (`applied` >= its entry id; the state is written in the same HSET as the user's
`fm_history`, so the new code is visible then). Freshness = that moment minus the entry id's
millisecond (the server's clock at XADD): it includes up to a poll interval (POLL_S) and the
id's truncation (< 1 ms). Each tick polls only the oldest sample in flight of each partition (a
partition is applied in order), so sampling costs the store a few keys a millisecond however
far the workers fall behind.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

import numpy as np

from loopfm.contract.names import PROJECT
from loopfm.features.store import sync_client
from loopfm.stream.keys import StreamKeys, partition_of
from loopfm.stream.online import STATE_FIELD, user_key
from loopfm.stream.state import entry_order

SAMPLES_PER_S = 200
POLL_S = 0.001  # the producer's tick: sends what is due, polls the samples in flight
DRAIN_TIMEOUT_S = 120.0  # the longest send waits for the last samples (and the bench for a drain)
# Per key, the newest applied entry id of the user's state (loopfm/stream/state.py), without
# shipping the whole state back: one round trip for every sample in flight.
APPLIED_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, ARGV[1])
  out[i] = state and string.match(state, '"applied":"([^"]*)"') or ''
end
return out
"""


def send(url: str, partitions: int, max_len: int, messages: list[dict], rate: float,
         schedule_done: Callable[[], None] = lambda: None, wait_s: float = DRAIN_TIMEOUT_S) -> dict:
    """XADD `messages` (impression fields, ids of the run's types, without event_timestamp: the
    send time is stamped) open loop at `rate` per second, sampling freshness (module docstring); call
    `schedule_done` when the last is sent, then wait up to `wait_s` for the samples in flight.
    Returns sent, schedule_s, drain_s (schedule end -> the last sample applied), freshness_ms
    (one value per sample), unapplied_samples and send_lag_p99_ms (how late the producer sent)."""
    client = sync_client(url)
    keys = StreamKeys(PROJECT, partitions)
    applied = client.register_script(APPLIED_SCRIPT)
    partition = [partition_of(m["user_id"], partitions) for m in messages]
    every = max(1, round(rate / SAMPLES_PER_S))
    pending = [collections.deque() for _ in range(partitions)]  # per partition: (user key, entry id), oldest first
    freshness, lags = [], []
    origin, sent, n = time.perf_counter(), 0, len(messages)

    def poll() -> None:
        """The oldest sample in flight of each partition, again while one turns up applied: a
        partition is applied in order, so a newer sample is not visible before an older one."""
        while True:
            heads = [q for q in pending if q]
            if not heads:
                return
            got = applied(keys=[q[0][0] for q in heads], args=[STATE_FIELD])
            now_ms = time.time() * 1000
            seen = False
            for q, entry in zip(heads, got):
                entry = entry.decode() if isinstance(entry, bytes) else entry
                if entry and entry_order(entry) >= entry_order(q[0][1]):
                    freshness.append(now_ms - int(q.popleft()[1].split("-")[0]))
                    seen = True
            if not seen:
                return

    while sent < n:
        elapsed = time.perf_counter() - origin
        due = min(n, int(rate * elapsed) + 1)
        if due > sent:
            lags.append(elapsed - sent / rate)  # how late the oldest due message leaves
            now_us = time.time_ns() // 1000
            pipe = client.pipeline(transaction=False)
            for j in range(sent, due):
                fields = {k: str(v) for k, v in messages[j].items()} | {"kind": "impression", "event_timestamp": str(now_us)}
                pipe.xadd(keys.events(partition[j]), fields, maxlen=max_len, approximate=True)
            for j, entry in zip(range(sent, due), pipe.execute()):
                if j % every == 0:
                    pending[partition[j]].append((user_key(PROJECT, messages[j]["user_id"]), entry.decode()))
            sent = due
        poll()
        now = time.perf_counter()
        time.sleep(max(POLL_S / 2, min(origin + (sent + 1) / rate, now + POLL_S) - now) if sent < n else 0)
    schedule_s = time.perf_counter() - origin
    schedule_done()
    deadline = time.monotonic() + wait_s
    while any(pending) and time.monotonic() < deadline:
        poll()
        time.sleep(POLL_S)
    drain_s = time.perf_counter() - origin - schedule_s
    client.close()
    return {"sent": sent, "schedule_s": schedule_s, "drain_s": drain_s, "freshness_ms": freshness,
            "unapplied_samples": sum(map(len, pending)),
            "send_lag_p99_ms": float(np.percentile(lags, 99) * 1000) if lags else 0.0}  # fmt: skip
