"""`loopfm bench stream`: how fresh the live loop keeps the online store, at what rate, at
what cost per event, and what it costs `/score` beside it: the running, which writes
benchmarks-stream.json (loopfm/bench/stream_report.py renders benchmarks-stream.md and the plot).

Freshness is what a reader sees, XADD to the user's hash saying the event is applied
(loopfm/stream/openloop.py: a producer process sends open loop and samples ~200 events a second).

The bench builds its own world (BENCH_WORLD, about 10^5 impressions, a `loopfm_kd` VM served
over ONNX) in `--run-dir` unless one is there, and a private Valkey. Its parts, in order:

1. history cost: worker CPU per event at a fixed rate on the world's store (~10^5 stored
   events), then on the same store grown to `history_events` by cloning every user's hash
   (DUMP/RESTORE: the state, FM history and click histories) under new user ids and scaling
   the items' counts. A worker touches only an event's user and item keys and appends a new
   offline file, so nothing it does reads the stored history; the clones make the key space
   and memory as large as such a store's would be.
2. freshness points: for 1 and 2 workers, `duration_s` per offered rate, on the grown store;
   achieved rate (entries acked per second of schedule), group lag, dead letters, worker and
   Valkey CPU per event;
3. beside serving: `/score` (100 candidates, open loop) at `serving_rate` alone, then while a
   worker applies `serving_stream_eps`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from loopfm.bench.loadtest import LoadSpec, format_ms, run_load, warm_up
from loopfm.bench.loadtest import pinned
from loopfm.bench.serving import request_pool
from loopfm.contract.names import PROJECT
from loopfm.core.config import RunConfig
from loopfm.core.files import read_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.data.ids import load_id_maps
from loopfm.stream.keys import GROUP, StreamKeys
from loopfm.stream.online import ITEM_CLICKS, ITEM_IMPRESSIONS, item_key, user_key
from loopfm.stream.openloop import DRAIN_TIMEOUT_S, send
from loopfm.stream.worker import start_worker_process, wait_for_leases

VARIANT = "loopfm_kd"
# About 1.0e5 impressions (1,600 users x 14 days); small training settings: the bench
# measures the loop, not model quality.
BENCH_WORLD = ["--users", "1600", "--days", "14", "--seed", "7", "--set", "fm.warmup_days=5", "--set", "vm.eval_days=4",
               "--set", "vm.epochs=2", "--set", "fm.warmup_epochs=4", "--set", "fm.passes_per_day=1"]  # fmt: skip


@dataclass
class StreamBenchSpec:
    rates: tuple[float, ...] = (500, 1000, 2000, 5000, 10000)  # offered events/s per freshness point
    workers: tuple[int, ...] = (1, 2)
    duration_s: float = 60.0  # per freshness point
    history_events: int = 10_000_000  # the grown store of the history-cost part
    cost_rate: float = 2000.0  # events/s offered while CPU per event is measured
    cost_duration_s: float = 20.0
    serving_rate: float = 200.0  # /score requests/s, 100 candidates
    serving_stream_eps: float = 1000.0
    serving_duration_s: float = 30.0
    new_entity_share: float = 0.001  # events from a user (and for an item) the run has never seen
    warmup_s: float = 3.0  # each warm-up at 500 events/s (and of /score), and the stream's lead before /score is measured


# ---- the world ---------------------------------------------------------------------------------


def _loopfm(*args: str, log) -> None:
    command = [sys.executable, "-m", "loopfm.pipeline.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`loopfm {' '.join(args)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    log(f"  loopfm {' '.join(args[:2])}: done")


def ensure_world(run_dir: Path, redis_url: str, log=print) -> None:
    """Build BENCH_WORLD in `run_dir` (about a minute) unless its served model is there; then
    apply and materialize it into `redis_url`. The run's streamed rows (stream/) are removed:
    the bench's world is its own."""
    r = ["--run-dir", str(run_dir)]
    if not (RunPaths(run_dir).vm / VARIANT / "onnx" / "model.onnx").exists():
        log(f"building the bench world in {run_dir}")
        _loopfm("data", "synth", *r, *BENCH_WORLD, log=log)
        for stage in (("fm", "train"), ("fm", "log"), ("features", "build")):
            _loopfm(*stage, *r, log=log)
        _loopfm("features", "apply", *r, "--redis-url", redis_url, log=log)
        _loopfm("vm", "train", *r, "--variant", "base", "--variant", VARIANT, log=log)  # every variant is compared with base
        _loopfm("vm", "export", *r, "--variant", VARIANT, log=log)
    else:
        _loopfm("features", "apply", *r, "--redis-url", redis_url, log=log)
    shutil.rmtree(RunPaths(run_dir).root / "stream", ignore_errors=True)


@dataclass
class Pool:
    """What the producer draws events from: source ids and the run's click rate."""

    users: np.ndarray
    items: np.ndarray
    verticals: list[str]
    vertical_mix: list[float]
    click_rate: float
    first_impression_id: int
    new_user_base: int  # source ids from here on are new users (int64 runs)
    new_item_base: int


def event_pool(run_dir: Path) -> Pool:
    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    users, items = load_id_maps(paths)
    imp = read_parquet(paths.table("impressions"), columns=["impression_id", "label"])
    if users.source.dtype.kind != "i" or items.source.dtype.kind != "i":
        raise ValueError(f"the stream bench draws int64 ids; {run_dir} has text ids")
    return Pool(users.source.to_numpy(), items.source.to_numpy(), list(cfg.world.verticals), list(cfg.world.vertical_mix),
                float(imp["label"].mean()), int(imp["impression_id"].max()) + 1,
                int(users.source.max()) + 10**9, int(items.source.max()) + 10**9)  # fmt: skip


def grow_store(url: str, pool: Pool, clones: int, log=print) -> np.ndarray:
    """Clone every user's keys (its Feast hash with the loop's state, and its per-vertical click
    histories) `clones` times under new source ids, and multiply every item's counts by
    clones + 1. Returns the user source ids of the grown store (originals first)."""
    from loopfm.features.store import sync_client
    from loopfm.stream.online import user_vertical_key

    client = sync_client(url)
    started, out = time.perf_counter(), [pool.users]
    step = int(pool.users.max()) + 1
    for c in range(1, clones + 1):
        new = pool.users + c * step
        for lo in range(0, len(pool.users), 500):
            keys = [user_key(PROJECT, int(u)) for u in pool.users[lo : lo + 500]]
            keys += [user_vertical_key(PROJECT, int(u), v) for u in pool.users[lo : lo + 500] for v in pool.verticals]
            targets = [user_key(PROJECT, int(u)) for u in new[lo : lo + 500]]
            targets += [user_vertical_key(PROJECT, int(u), v) for u in new[lo : lo + 500] for v in pool.verticals]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.dump(key)
            dumps = pipe.execute()
            pipe = client.pipeline(transaction=False)
            for key, blob in zip(targets, dumps):
                if blob is not None:
                    pipe.restore(key, 0, blob, replace=True)
            pipe.execute()
        out.append(new)
        if c % 10 == 0 or c == clones:
            log(f"  cloned the users {c}/{clones} times ({time.perf_counter() - started:.0f} s)")
    pipe = client.pipeline(transaction=False)
    for i in pool.items:
        key = item_key(PROJECT, int(i))
        pipe.hget(key, ITEM_IMPRESSIONS)
        pipe.hget(key, ITEM_CLICKS)
    counts = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for i, n, k in zip(pool.items, counts[::2], counts[1::2]):
        pipe.hset(item_key(PROJECT, int(i)), mapping={ITEM_IMPRESSIONS: int(n or 0) * (clones + 1), ITEM_CLICKS: int(k or 0) * (clones + 1)})
    pipe.execute()
    client.close()
    return np.concatenate(out)


# ---- the producer (a process of its own) ---------------------------------------------------------


def _messages(pool: Pool, users: np.ndarray, n: int, first_id: int, seed: int, new_share: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    user = users[rng.integers(len(users), size=n)]
    item = pool.items[rng.integers(len(pool.items), size=n)]
    new = rng.random(n) < new_share
    user = np.where(new, pool.new_user_base + first_id + np.arange(n), user)
    item = np.where(new, pool.new_item_base + first_id + np.arange(n), item)
    vertical = rng.choice(len(pool.verticals), size=n, p=np.asarray(pool.vertical_mix) / sum(pool.vertical_mix))
    label = (rng.random(n) < pool.click_rate).astype(int)
    return [{"impression_id": first_id + j, "user_id": int(user[j]), "item_id": int(item[j]),
             "vertical": pool.verticals[vertical[j]], "label": int(label[j])} for j in range(n)]  # fmt: skip


def produce(url: str, partitions: int, max_len: int, messages: list[dict], rate: float, cores: list[int], results) -> None:
    """The producer process: on `cores`, openloop.send (schedule end and report on `results`)."""
    os.sched_setaffinity(0, cores)
    results.put(send(url, partitions, max_len, messages, rate, lambda: results.put({"schedule_done": True})))


# ---- measuring ---------------------------------------------------------------------------------


class Workers:
    """`len(cores)` `loopfm stream` processes, worker k pinned to cores[k]; stopped by SIGTERM."""

    def __init__(self, run_dir: Path, url: str, cores: list[list[int]], logs: Path):
        self.keys = StreamKeys(PROJECT, RunConfig.load(run_dir).stream.partitions)
        self.names = [f"bench{k}" for k in range(len(cores))]
        self.procs = [start_worker_process(run_dir, url, name, logs / f"stream-{name}.log", c, ("--progress-s", "10"))
                      for name, c in zip(self.names, cores)]  # fmt: skip

    def wait_for_leases(self, client) -> None:
        wait_for_leases(client, self.keys, self.names, self.procs)

    def cpu_s(self) -> float:
        return sum(_process_cpu_s(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _store_cpu_s(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def group_progress(client, keys: StreamKeys) -> dict[str, int]:
    """Over every partition: entries acked by the group, pending (delivered, not acked), lag
    (not yet delivered), and the dead-letter stream's length."""
    out = {"acked": 0, "pending": 0, "lag": 0}
    for p in range(keys.partitions):
        try:
            groups = client.xinfo_groups(keys.events(p))
        except Exception:  # the stream does not exist yet
            continue
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                out["acked"] += int(g.get("entries-read") or 0) - int(g["pending"])
                out["pending"] += int(g["pending"])
                out["lag"] += int(g.get("lag") or 0)
    out["dead_letters"] = int(client.xlen(keys.dead_letters)) if client.exists(keys.dead_letters) else 0
    return out


def _drain(client, keys: StreamKeys, within_s: float = DRAIN_TIMEOUT_S) -> None:
    """Until every partition's lag and pending are 0 (at most `within_s`)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        g = group_progress(client, keys)
        if g["lag"] == 0 and g["pending"] == 0:
            return
        time.sleep(0.1)


def offered_point(url: str, run_dir: Path, workers: Workers, pool: Pool, users: np.ndarray, rate: float, duration_s: float,
                  cores: list[int], seed: int, new_share: float) -> dict:  # fmt: skip
    """One open-loop point: the producer process sends for `duration_s`; this process samples
    the group's lag each second. Returns the point's row."""
    from loopfm.features.store import sync_client

    cfg = RunConfig.load(run_dir)
    client, keys = sync_client(url), workers.keys
    n = int(rate * duration_s)
    first = pool.first_impression_id
    pool.first_impression_id += n
    messages = _messages(pool, users, n, first, seed, new_share)
    before, cpu0, store0 = group_progress(client, keys), workers.cpu_s(), _store_cpu_s(client)
    results = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=produce, args=(url, cfg.stream.partitions, cfg.stream.max_len,
                                                                              messages, rate, cores, results))  # fmt: skip
    proc.start()
    lag_max, end, report = 0, None, None
    while report is None:
        g = group_progress(client, keys)
        lag_max = max(lag_max, g["lag"] + g["pending"])
        try:
            message = results.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the producer process exited with {proc.exitcode} before reporting")
            continue
        if message.get("schedule_done"):
            end = group_progress(client, keys)
        else:
            report = message
    proc.join(timeout=10)
    _drain(client, keys)
    after, cpu1, store1 = group_progress(client, keys), workers.cpu_s(), _store_cpu_s(client)
    applied = after["acked"] - before["acked"]
    fresh = np.asarray(report["freshness_ms"])
    client.close()
    return {
        "offered_eps": report["sent"] / report["schedule_s"],
        "achieved_eps": min(end["acked"] - before["acked"], report["sent"]) / report["schedule_s"],
        "freshness_ms": {q: float(np.percentile(fresh, int(q[1:]))) if fresh.size else None for q in ("p50", "p90", "p99")}
        | {"max": float(fresh.max()) if fresh.size else None, "samples": int(fresh.size),
           "not_applied_within_drain": report["unapplied_samples"]},  # fmt: skip
        "lag_max": lag_max,
        "lag_at_end": end["lag"] + end["pending"],
        "drain_s": round(report["drain_s"], 2),  # schedule end -> the last sample visible
        "dead_letters": after["dead_letters"] - before["dead_letters"],
        "events": applied,
        "worker_cpu_us_per_event": (cpu1 - cpu0) / max(applied, 1) * 1e6,
        "store_cpu_us_per_event": (store1 - store0) / max(applied, 1) * 1e6,
        "producer_send_lag_p99_ms": report["send_lag_p99_ms"],
    }


# ---- the bench ---------------------------------------------------------------------------------


def run_stream_bench(run_dir: Path, out_dir: Path, spec: StreamBenchSpec = StreamBenchSpec(), log=print) -> dict:
    """Every part (module docstring); writes out_dir/benchmarks-stream.json (loopfm/bench/stream_report.py
    renders the summary)."""
    from loopfm.features.store import sync_client
    from loopfm.pipeline.services import redis_url_or_local

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise ValueError(f"the stream bench pins workers and the store to separate cores; this process may use only {cores}")
    a, b = cores[:2]
    logs = RunPaths(run_dir).root / "bench_logs"
    started = time.perf_counter()
    summary: dict = {"spec": asdict(spec), "points": []}
    with pinned([b]), redis_url_or_local() as url:  # Valkey, the producer and this process on core b
        ensure_world(run_dir, url, log)
        logs.mkdir(parents=True, exist_ok=True)
        pool = event_pool(run_dir)
        client = sync_client(url)
        stored = len(read_parquet(RunPaths(run_dir).table("impressions"), columns=["label"]))
        clones = max(0, round(spec.history_events / stored) - 1)

        log(f"history cost: 1 worker on core {a}, {spec.cost_rate:g} events/s for {spec.cost_duration_s:g} s")
        workers = Workers(run_dir, url, [[a]], logs)
        workers.wait_for_leases(client)
        offered_point(url, run_dir, workers, pool, pool.users, 500, spec.warmup_s, [b], 0, 0.0)  # warm-up
        cost = []
        for label, users in (("world", pool.users), ("grown", None)):
            if users is None:
                log(f"  growing the store to ~{stored * (clones + 1):,} stored events ({clones} clones of every user)")
                users = grow_store(url, pool, clones, log)
            point = offered_point(url, run_dir, workers, pool, users, spec.cost_rate, spec.cost_duration_s, [b], 1, 0.0)
            cost.append({"stored_events": stored * (1 if label == "world" else clones + 1), "users": len(users)} | point)
            log(f"  {label}: {cost[-1]['stored_events']:,} stored events, {len(users):,} users: worker "
                f"{point['worker_cpu_us_per_event']:.0f} µs CPU/event, Valkey {point['store_cpu_us_per_event']:.0f} µs")
        workers.stop()
        grown_users = users
        summary["history_cost"] = {
            "stored_events": [c["stored_events"] for c in cost],
            "users": [c["users"] for c in cost],
            "cpu_us_per_event": [round(c["worker_cpu_us_per_event"], 1) for c in cost],
            "store_cpu_us_per_event": [round(c["store_cpu_us_per_event"], 1) for c in cost],
            "freshness_ms_p99": [c["freshness_ms"]["p99"] for c in cost],
            "offered_eps": spec.cost_rate, "duration_s": spec.cost_duration_s,
            "how": f"the world's users' keys cloned {clones} times (DUMP/RESTORE) under new ids, items' counts scaled",
        }  # fmt: skip

        for n_workers in spec.workers:
            worker_cores = [[a]] if n_workers == 1 else [[a], [b]]
            log(f"freshness, {n_workers} worker(s) on cores {worker_cores}; Valkey and the producer on core {b}")
            workers = Workers(run_dir, url, worker_cores, logs)
            workers.wait_for_leases(client)
            offered_point(url, run_dir, workers, pool, grown_users, 500, spec.warmup_s, [b], 2, spec.new_entity_share)  # warm-up
            for i, rate in enumerate(spec.rates):
                point = offered_point(url, run_dir, workers, pool, grown_users, rate, spec.duration_s, [b], 10 + i,
                                      spec.new_entity_share)  # fmt: skip
                point = {"workers": n_workers, "cores": {"workers": worker_cores, "store": [b], "producer": [b]}} | point
                summary["points"].append(point)
                f = point["freshness_ms"]
                log(f"  {rate:>6g} offered: {point['achieved_eps']:.0f} achieved events/s, freshness p50 {format_ms(f['p50'])} "
                    f"p99 {format_ms(f['p99'])}, lag max {point['lag_max']}, drain {point['drain_s']} s, "
                    f"worker {point['worker_cpu_us_per_event']:.0f} µs/event")  # fmt: skip
            workers.stop()

        summary["beside_serving"] = beside_serving(run_dir, url, pool, grown_users, spec, a, b, logs, log)
        client.close()
    shutil.rmtree(RunPaths(run_dir).root / "stream", ignore_errors=True)
    summary["machine"] = {"cores": len(cores), "python": platform.python_version(), "platform": platform.platform()}
    summary["command"] = "make bench-stream" if spec == StreamBenchSpec() else "loopfm bench stream (non-default spec)"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "benchmarks-stream.json", json.dumps(summary, indent=2))
    return summary


def beside_serving(run_dir: Path, url: str, pool: Pool, users: np.ndarray, spec: StreamBenchSpec, a: int, b: int,
                   logs: Path, log) -> dict:  # fmt: skip
    """/score p50/p99 at spec.serving_rate, alone and while one worker applies spec.serving_stream_eps."""
    from loopfm.pipeline.services import start_server, stop_server

    with pinned([a]):
        proc, server = start_server(RunPaths(run_dir).vm / VARIANT / "onnx", url, logs / "bench-stream-server.log")
    requests = request_pool(run_dir)
    out = {"rate": spec.serving_rate, "candidates": 100, "stream_eps": spec.serving_stream_eps,
           "cores": {"server": [a], "client": [b], "store": [b], "worker": [b], "producer": [b]}}  # fmt: skip
    try:
        warm_up(server, requests, rate=spec.serving_rate, seconds=spec.warmup_s)
        load = LoadSpec(rate=spec.serving_rate, duration_s=spec.serving_duration_s)
        alone, _ = run_load(server, load, requests)
        workers = Workers(run_dir, url, [[b]], logs)
        from loopfm.features.store import sync_client

        client = sync_client(url)
        workers.wait_for_leases(client)
        n = int(spec.serving_stream_eps * (spec.serving_duration_s + 2 * spec.warmup_s))
        first = pool.first_impression_id
        pool.first_impression_id += n
        messages = _messages(pool, users, n, first, 99, spec.new_entity_share)
        cfg = RunConfig.load(run_dir)
        results = multiprocessing.get_context("spawn").Queue()
        producer = multiprocessing.get_context("spawn").Process(target=produce, args=(url, cfg.stream.partitions, cfg.stream.max_len,
                                                                                      messages, spec.serving_stream_eps, [b], results))  # fmt: skip
        producer.start()
        time.sleep(spec.warmup_s)  # the stream at its rate before the load starts
        streaming, _ = run_load(server, load, requests)
        report = results.get(timeout=spec.serving_duration_s + 60)  # the end of the schedule
        report = results.get(timeout=DRAIN_TIMEOUT_S + 10)
        producer.join(timeout=10)
        workers.stop()
        client.close()
    finally:
        stop_server(proc)
    fresh = np.asarray(report["freshness_ms"])
    out |= {"score_p50_ms_alone": alone["p50_ms"], "score_p99_ms_alone": alone["p99_ms"],
            "score_p50_ms_streaming": streaming["p50_ms"], "score_p99_ms_streaming": streaming["p99_ms"],
            "score_errors": {"alone": alone["errors"], "streaming": streaming["errors"]},
            "stream_freshness_ms_p99": float(np.percentile(fresh, 99)) if fresh.size else None}  # fmt: skip
    log(f"beside serving: /score p99 {format_ms(alone['p99_ms'])} alone, {format_ms(streaming['p99_ms'])} while a worker "
        f"applies {spec.serving_stream_eps:g} events/s")  # fmt: skip
    return out


# ---- the report --------------------------------------------------------------------------------
