"""`loopfm stream`: a long-running worker of the consumer group that applies events to the
online store (Feast's Redis layout) and the offline side, within a second of their XADD.

One micro-batch, at a cost that does not depend on the stored history:

  1. read up to `stream.batch_size` entries of each partition this worker leases (waiting at
     most `stream.max_wait_ms`), and what arrives until the oldest is `stream.linger_ms` old;
     refuse bad ones to the dead-letter stream with the reason;
  2. one pipelined round trip: each user's running state and profile, each item's counts and
     catalog features; new source ids get dense indices (a second round trip, only for them);
  3. per event, in stream order: the FM's inputs from its user's state (fm/inputs.py's point-
     in-time rule), then its counts and clicks into the state;
  4. FM-encode the batch with the current checkpoint (fm/log.py: encode, as `fm log`);
  5. append the rows to the offline side (a new file), then write the online values in one
     pipelined round trip (idempotent: loopfm/stream/online.py), then XACK.

Partitions: a worker heartbeats in a sorted set of live workers and leases the partitions
p with p % n_live == its rank; a lease expires `stream.lease_ms` after its owner stops
renewing it, and the next owner claims the entries its predecessor left pending (XAUTOCLAIM)
and applies them first. So one user's events are applied in order by one worker at a time.
The FM checkpoint is checked between micro-batches (at each lease check): a newer checkpoint of
the training that logged the history is swapped in whole; a new training's checkpoints are not
(`newest_checkpoint`): the worker keeps encoding with the FM it loaded and says so, until
`loopfm fm log` has re-logged the history, so one history never holds codes of two FMs.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from loopfm.contract.names import ITEM_FEATURES, ITEM_FEATURES_VIEW, PROJECT, USER_FEATURES, USER_PROFILE, items_written_key
from loopfm.contract.redis_url import cluster_node_url
from loopfm.contract.tensorize import activity_bucket_arrays
from loopfm.core.config import RunConfig
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.data import streamed as offline
from loopfm.data.ids import load_id_maps
from loopfm.data.vocab import Vocab
from loopfm.features.build import fm_history_members
from loopfm.features.store import sync_client
from loopfm.stream.keys import GROUP, ITEMS_WRITTEN_MAX_LEN, StreamKeys
from loopfm.stream.messages import BadMessage, Impression, ItemUpsert, Schema, parse
from loopfm.stream.online import (
    ITEM_CLICKS,
    ITEM_COUNTS_SCRIPT,
    ITEM_IMPRESSIONS,
    NEW_ID_SCRIPT,
    STATE_FIELD,
    item_count_args,
    item_feature_fields,
    item_key,
    user_fields,
    user_key,
    user_vertical_key,
    vm_history_fields,
)
from loopfm.stream.state import ALL, UserState
from serving.feast_layout import CorruptValue, decode_value, feature_field

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR
MEMBERSHIP_CHECK_S = 0.5  # heartbeat, lease renewal and share check: a joining worker gets its share within ~1 s
FRESHNESS_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_USER_FIELDS = [STATE_FIELD, *(feature_field(USER_PROFILE, f) for f in USER_FEATURES)]
_ITEM_FIELDS = [ITEM_IMPRESSIONS, ITEM_CLICKS, *(feature_field(ITEM_FEATURES_VIEW, f) for f in ITEM_FEATURES)]


def stream_schema(paths: RunPaths, cfg: RunConfig) -> Schema:
    """What a valid message holds in this run (loopfm/stream/messages.py)."""
    users, items = load_id_maps(paths)
    vocab = Vocab.load(paths)
    return Schema(users.id_type, items.id_type, tuple(cfg.world.verticals), vocab.n_categories, vocab.n_brands,
                  int(cfg.stream.future_skew_s * 1e6))  # fmt: skip


def newest_checkpoint(paths: RunPaths, cfg: RunConfig) -> Path:
    """The checkpoint that encodes live events: the warm-up one under `frozen`, the newest
    written under `rolling` (fm/log.py's scheme for events after the last trained day).
    Raises FileNotFoundError when there is none, or when the run's log was imported (`loopfm fm
    import-log`): its codes come from another FM, which loopfm cannot run on new events, even
    with checkpoints of its own FM in fm/. Raises ValueError when the checkpoints are of
    another training than the one that wrote the log: one history, one embedding space."""
    from loopfm.fm.log import log_source
    from loopfm.fm.train import checkpoint_dir, checkpoint_path, training

    source = log_source(paths)
    if source["fm"] == "imported":
        raise FileNotFoundError(f"this run's FM log was imported ({paths.fm / source['summary']}): new events need the FM "
                                "that made it, and loopfm has no checkpoint of it (checkpoints in fm/ made no code of the "
                                "log); run `loopfm fm log` to log with loopfm's own FM")  # fmt: skip
    if not checkpoint_dir(paths).exists():
        raise FileNotFoundError(f"no FM checkpoint in {checkpoint_dir(paths)}: run `loopfm fm train` first")
    if training(paths)["training_id"] != source["training_id"]:
        raise ValueError(f"the FM checkpoints in {checkpoint_dir(paths)} are of another training than the one that wrote "
                         f"{paths.fm_log}: run `loopfm fm log`, `loopfm features build` and `loopfm features apply` so "
                         "new events join a history of the same FM")  # fmt: skip
    if cfg.fm.checkpoint_scheme == "frozen":
        path = checkpoint_path(paths, cfg.fm.warmup_days)
        found = [path] if path.exists() else []
    else:
        found = sorted(checkpoint_dir(paths).glob("ckpt_*.pt"))
    if not found:
        raise FileNotFoundError(f"no FM checkpoint in {checkpoint_dir(paths)}: run `loopfm fm train` first")
    return found[-1]


class FMEncoder:
    """The FM checkpoint live events are encoded with; `refresh` swaps in a newer one whole,
    between micro-batches, so one batch never mixes two embedding spaces."""

    def __init__(self, paths: RunPaths, cfg: RunConfig):
        self.paths, self.cfg, self.identity = paths, cfg, None
        self.refresh()

    def refresh(self) -> bool:
        """Load the scheme's checkpoint if it changed on disk since the last load; True if so."""
        import torch

        from loopfm.fm.train import load_checkpoint

        torch.set_num_threads(1)  # micro-batches are small, and a worker runs per core (docs/stream.md)

        path = newest_checkpoint(self.paths, self.cfg)
        stat = path.stat()
        identity = (path.name, stat.st_mtime_ns, stat.st_size)
        if identity == self.identity:
            return False
        index = int(path.stem.split("_")[1])
        self.fm, self.compressor, self.layers, self.trained_until_us, self.known_users, self.known_items = load_checkpoint(
            self.paths, index
        )
        self.intent_dim = int(torch.load(path, weights_only=False)["shapes"]["intent_dim"])
        self.identity, self.name = identity, path.name
        return True

    def encode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """FM inputs of n events (fm/inputs.py's names and shapes) -> logits [n], codes [n, bytes]."""
        from loopfm.fm.inputs import input_batch
        from loopfm.fm.log import encode

        batch = input_batch(arrays, np.arange(len(arrays["user_id"])), self.known_users, self.known_items)
        return encode(self.fm, self.compressor, self.layers, batch, self.cfg)


@dataclass
class Totals:
    """What a worker did since it started (its summary and its progress line)."""

    applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    trimmed: int = 0  # pending entries trimmed from the stream before they were applied (lost)
    items_upserted: int = 0
    batches: int = 0
    busy_s: float = 0.0  # wall time spent applying batches (not waiting for entries)
    freshness_ms: list[float] = field(default_factory=list)  # XADD -> online write, per applied event (newest 200k)

    def add_freshness(self, values: list[float]) -> None:
        self.freshness_ms.extend(values)
        if len(self.freshness_ms) > 400_000:
            del self.freshness_ms[:-200_000]

    def summary(self) -> dict:
        f = np.asarray(self.freshness_ms)
        pct = {f"p{q}": float(np.percentile(f, q)) if f.size else None for q in (50, 90, 99)}
        return {"applied": self.applied, "duplicates": self.duplicates, "dead_letters": self.dead_letters, "trimmed": self.trimmed,
                "items_upserted": self.items_upserted, "batches": self.batches, "busy_s": round(self.busy_s, 3),
                "freshness_ms": pct}  # fmt: skip


class Metrics:
    """The worker's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.events = Counter("loopfm_stream_events", "Messages handled, by outcome", ["outcome"], registry=self.registry)
        self.freshness = Histogram("loopfm_stream_freshness_seconds", "XADD to online write, per applied event",
                                   buckets=FRESHNESS_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.lag = Gauge("loopfm_stream_lag", "Entries not yet delivered in this worker's partitions", registry=self.registry)
        self.partitions = Gauge("loopfm_stream_partitions", "Partitions this worker leases", registry=self.registry)


def activity_buckets(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FM's rate and count buckets (contract/tensorize.py) of each scope's impressions and
    clicks so far, for the whole batch at once: [n] -> rate_{scope}, count_{scope} [n]."""
    out = dict(inputs)
    for scope in ("all", "vertical", "recent", "item"):
        out[f"rate_{scope}"], out[f"count_{scope}"] = activity_bucket_arrays(out.pop(f"impressions_{scope}"), out.pop(f"clicks_{scope}"))
    return out


def _decoded(blob) -> int | None:
    try:
        value = decode_value(blob)
    except CorruptValue:
        return None
    return value if isinstance(value, int) else None


def _text(fields: dict) -> dict[str, str]:
    return {k.decode() if isinstance(k, bytes) else k: v.decode(errors="replace") if isinstance(v, bytes) else str(v)
            for k, v in fields.items()}  # fmt: skip


class Worker:
    """One `loopfm stream` process (module docstring). `run` returns its Totals summary."""

    def __init__(self, run_dir: Path, redis_url: str, name: str | None = None, log=print):
        self.paths, self.cfg = RunPaths(run_dir), RunConfig.load(run_dir)
        self.keys = StreamKeys(PROJECT, self.cfg.stream.partitions)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.log = log
        self.client = sync_client(redis_url)
        self.cluster = cluster_node_url(redis_url) is not None
        self.schema = stream_schema(self.paths, self.cfg)
        self.user_map, self.item_map = load_id_maps(self.paths)
        self.encoder = FMEncoder(self.paths, self.cfg)
        users, items = read_parquet(self.paths.table("users")), read_parquet(self.paths.table("items"))
        # An unseen user's profile and an item outside the catalog are unknown; the FM has no
        # unknown slot for these attributes, so it reads the run's most common value.
        self.default_user = {f: int(users[f].mode().iloc[0]) for f in USER_FEATURES}
        self.default_item = {f: int(items[f].mode().iloc[0]) for f in ("category", "brand", "price_bucket")}
        self.item_script = self.client.register_script(ITEM_COUNTS_SCRIPT)
        self.id_script = self.client.register_script(NEW_ID_SCRIPT)
        self.vertical_ids = {v: i for i, v in enumerate(self.cfg.world.verticals)}
        self.start_us = pd.Timestamp(self.cfg.world.start_date, tz="UTC").value // 1000
        self.signal_dim = self.encoder.intent_dim // (1 + len(self.cfg.fm.intent_half_lives))  # k per day
        self.held: set[int] = set()
        self.replay: set[int] = set()  # leased partitions whose pending entries come first
        self.totals, self.metrics = Totals(), Metrics()
        self.stopping = False
        self._refused = ""  # the last reason a newer checkpoint was not taken
        self.share_complete = False
        self._next_lease_check = 0.0

    # ---- partitions -------------------------------------------------------------------------

    def _renew_membership(self) -> None:
        """Heartbeat, then lease this worker's share of the partitions and release the rest."""
        now_ms = int(time.time() * 1000)
        lease = self.cfg.stream.lease_ms
        self.client.zadd(self.keys.workers, {self.name: now_ms + lease})
        self.client.zremrangebyscore(self.keys.workers, "-inf", now_ms)
        live = sorted(m.decode() for m in self.client.zrange(self.keys.workers, 0, -1))
        rank = live.index(self.name) if self.name in live else 0
        mine = {p for p in range(self.keys.partitions) if p % max(len(live), 1) == rank} if not self.stopping else set()
        for p in sorted(self.held - mine):
            self._release(p)
        for p in sorted(self.held & mine):
            if self.client.get(self.keys.lease(p)) == self.name.encode():
                self.client.pexpire(self.keys.lease(p), lease)
            else:
                self.held.discard(p)
        for p in sorted(mine - self.held):
            if self.client.set(self.keys.lease(p), self.name, nx=True, px=lease):
                self._take_over(p)
        self.share_complete = mine <= self.held  # else a stopped worker's leases have yet to expire
        self.metrics.partitions.set(len(self.held))

    def _take_over(self, p: int) -> None:
        """A newly leased partition: make sure its group exists, claim what others left pending."""
        key = self.keys.events(p)
        try:
            self.client.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        cursor, trimmed = "0-0", 0
        while True:
            cursor, _, *deleted = self.client.xautoclaim(key, GROUP, self.name, min_idle_time=0, start_id=cursor, count=1000)
            trimmed += len(deleted[0]) if deleted else 0  # pending, but trimmed from the stream: dropped by XAUTOCLAIM
            cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            if cursor == "0-0":
                break
        if trimmed:
            self._trimmed(trimmed)
        self.held.add(p)
        self.replay.add(p)

    def _release(self, p: int) -> None:
        if self.client.get(self.keys.lease(p)) == self.name.encode():
            self.client.delete(self.keys.lease(p))
        self.held.discard(p)
        self.replay.discard(p)

    # ---- reading ----------------------------------------------------------------------------

    def _batch(self) -> list[tuple[int, str, dict]]:
        """One micro-batch: the entries of one read and, unless the oldest of them is already
        `stream.linger_ms` old, of one more read once it is (as Kafka's linger.ms), so that a
        light stream still makes batches of several events, each batch's fixed cost (an FM
        forward pass, an offline file, three round trips) shared."""
        entries = self._read()
        if entries and not self.replay:
            oldest_s = min(int(entry_id.split("-")[0]) for _, entry_id, _ in entries) / 1000
            wait_s = min(oldest_s + self.cfg.stream.linger_ms / 1000 - time.time(), self.cfg.stream.linger_ms / 1000)
            if wait_s > 0:
                time.sleep(wait_s)
                entries += self._read(block=False)
        return entries

    def _read(self, block: bool = True) -> list[tuple[int, str, dict]]:
        """Up to stream.batch_size entries per leased partition: a replayed partition's pending
        entries first, else new ones (waiting at most stream.max_wait_ms if `block`)."""
        if not self.held:
            time.sleep(self.cfg.stream.max_wait_ms / 1000 or 0.001)
            return []
        ids = {self.keys.events(p): "0" if p in self.replay else ">" for p in sorted(self.held)}
        count, wait = self.cfg.stream.batch_size, self.cfg.stream.max_wait_ms if block else 0
        if self.cluster or self.replay:  # no blocking read across slots; pending reads never block
            replies = []
            for key, start in ids.items():
                replies += self.client.xreadgroup(GROUP, self.name, {key: start}, count=count) or []
            if not any(entries for _, entries in replies) and not self.replay and wait:
                time.sleep(wait / 1000)
        else:
            replies = self.client.xreadgroup(GROUP, self.name, ids, count=count, block=wait or None) or []
        out, trimmed = [], defaultdict(list)
        for key, entries in replies:
            p = int((key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[1])
            if p in self.replay and not entries:
                self.replay.discard(p)
            for entry_id, fields in entries:
                if fields is None:  # pending, but trimmed from the stream (stream.max_len) before it was applied
                    trimmed[p].append(entry_id)
                else:
                    out.append((p, entry_id.decode(), fields))
        if trimmed:
            self._ack(trimmed)
            self._trimmed(sum(map(len, trimmed.values())))
        return out

    def _trimmed(self, n: int) -> None:
        self.totals.trimmed += n
        self.metrics.events.labels("trimmed").inc(n)
        self.log(f"stream {self.name}: {n} pending entries were trimmed from the stream (stream.max_len) before they were "
                 "applied; they are lost")  # fmt: skip

    def _ack(self, ids: dict[int, list]) -> None:
        """XACK entry ids by partition, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for p, entry_ids in ids.items():
            pipe.xack(self.keys.events(p), GROUP, *entry_ids)
        pipe.execute()

    # ---- applying ---------------------------------------------------------------------------

    def apply(self, entries: list[tuple[int, str, dict]]) -> None:
        """Apply one micro-batch (module docstring, steps 1-5)."""
        started = time.perf_counter()
        now_us = time.time_ns() // 1000
        events: list[tuple[int, str, Impression]] = []
        upserts: list[tuple[int, str, ItemUpsert]] = []
        dead = []
        for p, entry_id, raw in entries:
            fields = _text(raw)
            try:
                record = parse(fields, self.schema, now_us)
            except BadMessage as exc:
                dead.append({**fields, "dead_reason": str(exc), "dead_partition": str(p), "dead_entry": entry_id})
                continue
            (events if isinstance(record, Impression) else upserts).append((p, entry_id, record))
        write_us = time.time_ns() // 1000
        pipe = self.client.pipeline(transaction=False)
        for letter in dead:
            pipe.xadd(self.keys.dead_letters, letter)
        if upserts:
            self._upsert_items(upserts, pipe, write_us)
        if events:
            self._apply_events(events, pipe, write_us)
        pipe.execute()
        written = list(dict.fromkeys([u.item for _, _, u in upserts] + [e.item for _, _, e in events]))
        if written:  # after the writes, never beside them: a server reading it then reads the new values
            self.client.xadd(items_written_key(self.keys.project), {"items": json.dumps(written)},
                             maxlen=ITEMS_WRITTEN_MAX_LEN, approximate=True)  # fmt: skip
        done_ms = time.time() * 1000
        by_partition = defaultdict(list)
        for p, entry_id, _ in entries:
            by_partition[p].append(entry_id)
        self._ack(by_partition)
        freshness = [done_ms - int(entry_id.split("-")[0]) for _, entry_id, _ in events]
        self.totals.add_freshness(freshness)
        for f in freshness:
            self.metrics.freshness.observe(f / 1000)
        self.totals.dead_letters += len(dead)
        self.metrics.events.labels("dead_letter").inc(len(dead))
        self.totals.batches += 1
        self.totals.busy_s += time.perf_counter() - started

    def _dense(self, id_map, sources: list, entity: str) -> dict:
        """{source id: dense index}: the run's map, else a new index from the store (once per id)."""
        found = id_map.to_dense(pd.Series(sources, dtype=id_map.source.dtype))
        out = {s: int(d) for s, d in zip(sources, found) if d >= 0}
        new = [s for s in sources if s not in out]
        if new:
            pipe = self.client.pipeline(transaction=False)
            for s in new:
                self._script(pipe, self.id_script, self.keys.new_ids(entity), [f"id:{s}", len(id_map.source)])
            out.update(zip(new, (int(d) for d in pipe.execute())))
        return out

    def _upsert_items(self, upserts: list[tuple[int, str, ItemUpsert]], pipe, write_us: int) -> None:
        dense = self._dense(self.item_map, list(dict.fromkeys(u.item for _, _, u in upserts)), "item")
        for _, _, u in upserts:
            pipe.hset(item_key(self.keys.project, u.item), mapping=item_feature_fields(dense[u.item], u.category, u.brand, u.price_bucket, write_us))
        rows = pa.table({
            "item_source": [str(u.item) for _, _, u in upserts],
            "item_id": pa.array([dense[u.item] for _, _, u in upserts], pa.int64()),
            **{name: pa.array([getattr(u, name) for _, _, u in upserts], pa.int64()) for name in ("category", "brand", "price_bucket")},
            "written_at": pa.array([write_us] * len(upserts), offline.TIME),
            "entry_id": [entry_id for _, entry_id, _ in upserts],
        })  # fmt: skip
        offline.append(self.paths, offline.ITEMS, rows, write_us, self.name)
        self.totals.items_upserted += len(upserts)

    def _script(self, pipe, script, key, args: list) -> None:
        """Queue a one-key script on `pipe`: EVALSHA (the server keeps the script), or EVAL of its
        text on a cluster. redis-py 7.4's ClusterPipeline refuses EVALSHA (its
        PIPELINE_BLOCKED_COMMANDS) and shadows `eval` with a method of no arguments
        (`RedisCluster.from_url(u).pipeline().eval("return 1", 0)` raises TypeError), so the
        command goes through execute_command, which routes EVAL by its key."""
        if self.cluster:
            pipe.execute_command("EVAL", script.script, 1, key, *args)
        else:
            script(keys=[key], args=args, client=pipe)

    def _read_entities(self, users: list, items: list) -> tuple[list, list]:
        pipe = self.client.pipeline(transaction=False)
        for u in users:
            pipe.hmget(user_key(self.keys.project, u), _USER_FIELDS)
        for i in items:
            pipe.hmget(item_key(self.keys.project, i), _ITEM_FIELDS)
        replies = pipe.execute()
        return replies[: len(users)], replies[len(users) :]

    def _apply_events(self, events: list[tuple[int, str, Impression]], pipe, write_us: int) -> None:
        cfg = self.cfg
        users = list(dict.fromkeys(e.user for _, _, e in events))
        items = list(dict.fromkeys(e.item for _, _, e in events))
        user_rows, item_rows = self._read_entities(users, items)
        new_users = [u for u, row in zip(users, user_rows) if row[0] is None]
        user_dense = self._dense(self.user_map, new_users, "user") if new_users else {}
        states, profile = {}, {}
        for u, row in zip(users, user_rows):
            states[u] = UserState.from_bytes(row[0]) if row[0] is not None else self._new_user(user_dense[u])
            profile[u] = [_decoded(v) for v in row[1:]]
        item_info = {}
        unlisted = []
        for i, row in zip(items, item_rows):
            n, k = int(row[0] or 0), int(row[1] or 0)
            index, *attributes = (_decoded(v) for v in row[2:])
            item_info[i] = [n, k, index, attributes]
            if index is None:
                unlisted.append(i)
        for i, d in (self._dense(self.item_map, unlisted, "item") if unlisted else {}).items():
            item_info[i][2] = d

        # Per event in stream order: FM inputs from the state, then the event into the state.
        applied, inputs = [], defaultdict(list)
        touched_users, touched_pairs = set(users), set()
        item_entries: dict[tuple, list] = defaultdict(list)
        for p, entry_id, e in events:
            state = states[e.user]
            info = item_info[e.item]
            redelivered = state.redelivered(entry_id)
            if not state.resent(e.impression_id) or redelivered:  # the item's script skips what it counted
                item_entries[(e.item, p)].append((entry_id, e.label))
            if redelivered or state.resent(e.impression_id):
                self.totals.duplicates += 1
                self.metrics.events.labels("duplicate").inc()
                touched_pairs.update((e.user, v) for v in state.vm_clicks.keys() | {e.vertical})
                continue
            state.advance(e.time_us, cfg.fm.raw_history_length, cfg.fm.recent_half_life)
            self._inputs(inputs, state, profile[e.user], info, e)
            state.record(entry_id, e.impression_id, e.vertical, info[2], e.label, cfg.vm.history_length, cfg.stream.dedup_window)
            info[0], info[1] = info[0] + 1, info[1] + e.label  # later events of this batch see it
            touched_pairs.add((e.user, e.vertical))
            applied.append((p, entry_id, e, state.dense, info[2]))

        if applied:
            logits, codes = self.encoder.encode(activity_buckets({k: np.asarray(v) for k, v in inputs.items()}))
            labels = np.array([e.label for _, _, e, _, _ in applied])
            member = fm_history_members(labels, cfg.fm.history_events)
            delay_us = cfg.fm.logging_delay_s * 1_000_000
            available = [max(e.time_us + delay_us, write_us) for _, _, e, _, _ in applied]
            until = self.encoder.trained_until_us
            for (_, _, e, _, _), code, avail, is_member in zip(applied, codes, available, member):
                if is_member:
                    states[e.user].add_code(code.tobytes(), avail, until, cfg.vm.history_length)
            self._write_offline(applied, logits, codes, available, write_us)
        for u in touched_users:
            pipe.hset(user_key(self.keys.project, u), mapping=user_fields(states[u], write_us))
        for u, v in touched_pairs:
            pipe.hset(user_vertical_key(self.keys.project, u, v), mapping=vm_history_fields(states[u], v, write_us))
        for (i, p), entries in item_entries.items():
            self._script(pipe, self.item_script, item_key(self.keys.project, i), item_count_args(p, entries, write_us))
        self.totals.applied += len(applied)
        self.metrics.events.labels("applied").inc(len(applied))

    def _new_user(self, dense: int) -> UserState:
        """The state of a user the run has never seen: nothing so far, no FM-only signals."""
        h = len(self.cfg.fm.intent_half_lives)
        return UserState(dense, intent_total=[[0.0] * self.signal_dim for _ in range(h)], intent_weight=[0.0] * h)

    def _inputs(self, inputs: dict, state: UserState, profile: list, info: list, e: Impression) -> None:
        """Append one event's FM inputs (fm/inputs.py: build_inputs, from the running state)."""
        raw = self.cfg.fm.raw_history_length
        for name, items in (("raw_history", state.clicks_before), ("raw_declined", state.declined_before)):
            history = [i + 1 for i in items[-raw:]] if raw else []
            inputs[name].append([0] * (raw - len(history)) + history)
        n, k, index, attributes = info
        listed = index is not None and all(a is not None for a in attributes)
        for name, value in zip(("category", "brand", "price_bucket"), attributes if listed else [None] * 3):
            inputs[name].append(self.default_item[name] if value is None else value)
        for name, value in zip(USER_FEATURES, profile):
            inputs[name].append(self.default_user[name] if value is None else value)
        inputs["user_id"].append(state.dense)
        inputs["item_id"].append(index if listed else -1)
        inputs["vertical_id"].append(self.vertical_ids[e.vertical])
        inputs["hour"].append((e.time_us // US_PER_HOUR) % 24)
        day = (e.time_us - self.start_us) // US_PER_DAY
        inputs["intent"].append(state.intent(day, self.cfg.fm.intent_half_lives, self.signal_dim))
        scopes = (("all", state.counts(ALL)), ("vertical", state.counts(e.vertical)), ("recent", state.recent_before), ("item", (n, k)))
        for scope, (sn, sk) in scopes:
            inputs[f"impressions_{scope}"].append(sn)  # bucketed per batch: activity_buckets
            inputs[f"clicks_{scope}"].append(sk)

    def _write_offline(self, applied: list, logits: np.ndarray, codes: np.ndarray, available: list[int], write_us: int) -> None:
        times = np.array([e.time_us for _, _, e, _, _ in applied], dtype=np.int64)
        rows = pa.table({
            "impression_id": pa.array([e.impression_id for _, _, e, _, _ in applied], pa.int64()),
            "user_id": pa.array([u for _, _, _, u, _ in applied], pa.int64()),
            "item_id": pa.array([i for _, _, _, _, i in applied], pa.int64()),
            "user_source": [str(e.user) for _, _, e, _, _ in applied],
            "item_source": [str(e.item) for _, _, e, _, _ in applied],
            "vertical": [e.vertical for _, _, e, _, _ in applied],
            "event_timestamp": pa.array(times, offline.TIME),
            "hour": (times // US_PER_HOUR) % 24,
            "label": pa.array([e.label for _, _, e, _, _ in applied], pa.int64()),
            "fm_code": pa.array([c.tobytes() for c in codes], pa.binary()),
            "fm_logit": logits.astype(np.float32),
            "fm_trained_until": pa.array([self.encoder.trained_until_us] * len(applied), offline.TIME),
            "available_at": pa.array(available, offline.TIME),
            "partition": pa.array([p for p, _, _, _, _ in applied], pa.int64()),
            "entry_id": [entry_id for _, entry_id, _, _, _ in applied],
        })  # fmt: skip
        offline.append(self.paths, offline.IMPRESSIONS, rows, write_us, self.name)

    # ---- the loop ---------------------------------------------------------------------------

    def lag(self) -> int:
        """Entries of this worker's partitions not yet delivered to the group (XINFO GROUPS)."""
        total = 0
        for p in self.held:
            for group in self.client.xinfo_groups(self.keys.events(p)):
                if group["name"] in (GROUP, GROUP.encode()):
                    total += int(group.get("lag") or 0)
        return total

    def _refresh_encoder(self) -> None:
        """Swap in a newer checkpoint of the log's training. A new training's checkpoints are not
        taken (newest_checkpoint refuses them): the worker keeps the FM it has loaded, the one
        the stored history was logged with, and says so once, until the history is re-logged."""
        try:
            if self.encoder.refresh():
                self.log(f"stream: now encoding with {self.encoder.name}")
        except (ValueError, FileNotFoundError) as exc:
            if str(exc) != self._refused:
                self._refused = str(exc)
                self.log(f"stream {self.name}: still encoding with {self.encoder.name}: {exc}")

    def stop(self, *_) -> None:
        """Finish the current micro-batch, release the partitions and return (SIGTERM, SIGINT)."""
        self.stopping = True

    def run(self, idle_exit_s: float | None = None, max_events: int | None = None, progress_s: float = 5.0,
            metrics_port: int | None = None) -> dict:  # fmt: skip
        """Apply micro-batches until stopped, until `idle_exit_s` pass with nothing to read while
        this worker holds its whole share of the partitions, or until `max_events` messages
        were handled. Returns Totals.summary()."""
        from loopfm.stream.bootstrap import ensure_bootstrapped

        if metrics_port is not None:
            start_http_server(metrics_port, addr="127.0.0.1", registry=self.metrics.registry)
        ensure_bootstrapped(self.client, self.keys, self.paths, self.cfg, self.log)
        gc.freeze()  # the start-up heap (torch, pandas, the id maps) leaves the collector's scans
        idle_since, next_progress, last_applied = time.monotonic(), time.monotonic() + progress_s, 0
        try:
            while not self.stopping:
                if time.monotonic() >= self._next_lease_check:
                    self._renew_membership()
                    self._next_lease_check = time.monotonic() + MEMBERSHIP_CHECK_S
                    self._refresh_encoder()
                entries = self._batch()
                if entries:
                    self.apply(entries)
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s and self.share_complete and not self.replay:
                    break
                handled = self.totals.applied + self.totals.duplicates + self.totals.dead_letters + self.totals.items_upserted
                if max_events is not None and handled >= max_events:
                    break
                if time.monotonic() >= next_progress:
                    lag = self.lag()
                    self.metrics.lag.set(lag)
                    rate = (self.totals.applied - last_applied) / progress_s
                    f = self.totals.summary()["freshness_ms"]
                    self.log(f"stream {self.name}: {self.totals.applied} applied ({rate:.0f}/s), freshness p50 "
                             f"{f['p50'] or 0:.0f} ms p99 {f['p99'] or 0:.0f} ms, lag {lag}, dead letters "
                             f"{self.totals.dead_letters}, partitions {sorted(self.held)}")  # fmt: skip
                    last_applied, next_progress = self.totals.applied, time.monotonic() + progress_s
        finally:
            self.stopping = True
            for p in sorted(self.held):
                self._release(p)
            self.client.zrem(self.keys.workers, self.name)
        return self.totals.summary()


def run_worker(run_dir: Path, redis_url: str, name: str | None = None, **options) -> dict:
    """`loopfm stream`: a Worker that drains and exits cleanly on SIGTERM or SIGINT."""
    worker = Worker(run_dir, redis_url, name)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    return worker.run(**options)


def start_worker_process(run_dir: Path, redis_url: str, name: str, log_path: Path, cores: list[int] | None = None,
                         options: tuple[str, ...] = ()) -> subprocess.Popen:  # fmt: skip
    """`loopfm stream` in a process of its own (pinned to `cores` if given), output to `log_path`;
    it gets SIGTERM (drains and exits) if this process dies."""
    from loopfm.core.children import dies_with_this_process

    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "loopfm.pipeline.cli", "stream", "--run-dir", str(run_dir), "--redis-url", redis_url,
               "--name", name, *options]  # fmt: skip
    with_parent = dies_with_this_process()

    def prepare() -> None:
        with_parent()
        if cores:
            os.sched_setaffinity(0, cores)

    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=prepare)


def wait_for_leases(client, keys: StreamKeys, names: list[str], procs: list[subprocess.Popen], within_s: float = 120.0) -> None:
    """Until every partition is leased and each of `names` holds a share (start-up and the
    first worker's bootstrap included). Raises RuntimeError if a process exits or time runs out."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        holders = client.mget([keys.lease(p) for p in range(keys.partitions)])
        if all(holders) and {h.decode() for h in holders} == set(names):
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a stream worker exited before leasing its partitions; see its log")
        time.sleep(0.1)
    raise RuntimeError(f"the stream workers did not lease every partition within {within_s:g} s")
