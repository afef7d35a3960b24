"""`python -m loopfm.bench.scaling --run-dir R`: the local figures behind docs/scaling.md.

Measured, not modelled: `feast materialize` of the run into one Valkey and into a local
three-master cluster; one online read (1 user + 100 candidates) against each; Valkey's
MEMORY USAGE of the run's real keys; and of copies of the fullest real user hash whose
`fm_codes` value is resized to each code format (int4 / fp32 / Matryoshka int4 prefixes at
L codes), so the per-key overhead of the encoding Valkey picks is measured rather than
assumed; and parquet bytes per embedding-log row, logging real codes in each format.
Writes JSON to stdout. A benchmark, not a test: the numbers move with machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import redis
from feast.protos.feast.types.Value_pb2 import Value

from loopfm.contract.codec import code_bytes
from loopfm.core.config import RunConfig
from loopfm.contract.names import (
    FM_HISTORY,
    FM_HISTORY_FEATURE,
    ITEM_ACTIVITY,
    ITEM_FEATURES_VIEW,
    ITEM_KEY,
    PROJECT,
    USER_KEY,
    USER_PROFILE,
    VERTICAL_KEY,
    VM_CLICK_HISTORY,
    views,
)
from loopfm.contract.redis_url import cluster_node_url
from loopfm.core.files import write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.fm.inputs import build_inputs
from loopfm.fm.log import log_events
from loopfm.pipeline.services import local_redis, local_redis_cluster
from loopfm.pipeline.stages import materialize
from serving.feast_layout import feature_field
from serving.online_reader import read_online_features
from serving.redis_client import async_client

USER_VIEWS, CLICK_VIEWS, ITEM_VIEWS = views(USER_PROFILE, FM_HISTORY), views(VM_CLICK_HISTORY), views(ITEM_FEATURES_VIEW, ITEM_ACTIVITY)
FORMATS = {"int4 d=8": (8, "int4"), "int4 d=16": (16, "int4"), "int4 d=32": (32, "int4"), "fp32 d=32": (32, "fp32")}
COPIES = 2000


def _read_p50_ms(url: str, n_users: int, n_items: int, vertical: str, repeats: int = 200) -> float:
    """One /score's read: the user's key, its (user, vertical) click key and 100 item keys."""

    async def run() -> float:
        client = async_client(url, 2.0)
        rng, times = np.random.default_rng(0), []
        for _ in range(repeats):
            user, items = int(rng.integers(n_users)), [(int(i),) for i in rng.integers(n_items, size=100)]
            requests = [
                ((USER_KEY,), [(user,)], USER_VIEWS),
                ((USER_KEY, VERTICAL_KEY), [(user, vertical)], CLICK_VIEWS),
                ((ITEM_KEY,), items, ITEM_VIEWS),
            ]
            t = time.perf_counter()
            await read_online_features(client, PROJECT, requests)
            times.append(time.perf_counter() - t)
        await client.aclose()
        return float(np.median(times) * 1e3)

    return asyncio.run(run())


def _kind(key: bytes) -> str:
    """Which entity a Feast key belongs to (its join-key names are in the key)."""
    return "user_vertical" if b"vertical" in key else "user" if b"user_id" in key else "item"


def _key_sizes(client: redis.Redis) -> dict:
    sizes: dict[str, dict[str, list[int]]] = {}
    for key in client.scan_iter(count=1000):
        fields = client.hgetall(key)
        kind = sizes.setdefault(_kind(key), {"usage": [], "payload": []})
        kind["usage"].append(client.memory_usage(key, samples=0))
        kind["payload"].append(len(key) + sum(len(f) + len(v) for f, v in fields.items()))
    return {
        kind: {"keys": len(v["usage"]), "memory_usage_mean_b": float(np.mean(v["usage"])), "payload_mean_b": float(np.mean(v["payload"]))}
        for kind, v in sizes.items()
    }  # fmt: skip


def _per_format(client: redis.Redis, history_length: int) -> dict:
    """MEMORY USAGE and used_memory growth per key for COPIES copies of a real user hash with
    fm_codes resized to L codes of each format."""
    users = [k for k, _ in zip((k for k in client.scan_iter(count=1000) if _kind(k) == "user"), range(1000))]
    template = max((client.hgetall(k) for k in users), key=lambda h: sum(map(len, h.values())))  # fullest history
    out = {}
    for name, (dim, fmt) in FORMATS.items():
        value_bytes = history_length * code_bytes(dim, fmt)
        fields = {**template, feature_field(FM_HISTORY, FM_HISTORY_FEATURE): Value(bytes_val=b"\x5a" * value_bytes).SerializeToString()}
        before = client.info("memory")["used_memory"]
        pipe = client.pipeline(transaction=False)
        for i in range(COPIES):
            pipe.hset(b"fmt:%s:%d" % (name.encode(), i), mapping=fields)
        pipe.execute()
        grown = (client.info("memory")["used_memory"] - before) / COPIES
        key = b"fmt:%s:0" % name.encode()
        out[name] = {
            "fm_codes_value_b": value_bytes, "memory_usage_b": client.memory_usage(key, samples=0),
            "used_memory_per_key_b": grown, "encoding": client.object("encoding", key).decode(),
        }  # fmt: skip
        client.delete(*[b"fmt:%s:%d" % (name.encode(), i) for i in range(COPIES)])
    return out


def _log_bytes_per_row(paths: RunPaths, cfg: RunConfig, sample: int = 100_000) -> dict:
    """Parquet bytes per embedding-log row for each format, on real codes of `sample` events
    (the run's checkpoints must have code_dim >= 32)."""
    arrays, imp = build_inputs(paths, cfg)
    rows = np.linspace(0, len(imp) - 1, min(sample, len(imp))).astype(np.int64)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (dim, fmt) in FORMATS.items():
            fm = replace(cfg.fm, code_dim=dim, code_format=fmt)
            log = log_events(paths, replace(cfg, fm=fm), arrays, imp, rows, progress=False)
            write_parquet(log, Path(tmp) / "log.parquet")
            out[name] = {"code_b": code_bytes(dim, fmt), "parquet_b_per_row": (Path(tmp) / "log.parquet").stat().st_size / len(log)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--history-length", type=int, default=50, help="L for the per-format key sizes")
    args = parser.parse_args(argv)
    cfg = RunConfig.load(args.run_dir)
    world = cfg.world
    n_items = world.n_items_per_vertical * len(world.verticals)
    report: dict = {}
    with local_redis() as single, local_redis_cluster(3) as cluster:
        for name, url in (("single", single), ("cluster3", cluster)):
            t = time.perf_counter()
            materialize(args.run_dir, url)
            report[f"materialize_s_{name}"] = time.perf_counter() - t
            report[f"read_1_user_100_items_p50_ms_{name}"] = _read_p50_ms(url, world.n_users, n_items, cfg.vm.target_vertical)
        client = redis.Redis.from_url(single)
        report["keys"] = _key_sizes(client)
        report["used_memory_b"] = client.info("memory")["used_memory"]
        report["per_format_user_key"] = _per_format(client, args.history_length)
        cluster_client = redis.RedisCluster.from_url(cluster_node_url(cluster))
        report["cluster_keys_per_master"] = [cluster_client.get_redis_connection(n).dbsize() for n in cluster_client.get_primaries()]
    report["embedding_log"] = _log_bytes_per_row(RunPaths(args.run_dir), cfg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
