"""`loopfm bench serving` (make bench-serving), the running: docs/benchmarks.json and each point's
report (loopfm/bench/serving_report.py renders docs/benchmarks.md and the p99 plot from it).

Two configurations, each pinned with os.sched_setaffinity (children inherit it): 1 worker
(server and the Valkey it reads on core 0, the load generator alone on core 1) and 2
workers (server on cores 0 and 1, Valkey on 0, the generator on 1, so it shares a core with
a worker). In each:

- open_loop: loopfm /score, open loop, Poisson arrivals, 100 candidates at 200 and 500
  req/s, 1,000 candidates at 50 req/s (the issue's goals), with the server's own latency
  histogram (`loopfm_request_seconds`, every worker scraped) beside the client's view;
- noop: the same generator against GET /healthz at the same rates: the floor of what the
  client and the HTTP stack add;
- capacity_p99_5ms: the highest rate of a sweep at 100 candidates whose p99 stays <= 5 ms;
- wrk_closed_loop: `wrk` (Debian package) with a Lua script cycling through request bodies,
  one connection per worker, as a second opinion (skipped with a note if wrk is missing);
- feast_sdk (1 worker only: it compares designs per request, not cores): the four paths of
  before at low rates: (a) loopfm, (b) a handler calling Feast's get_online_features,
  (c) the Scorer in process, (d) /healthz.

With an API key (`--api-key`, default $LOOPFM_API_KEY) the bench's servers require it, as a
production server would, and every request and scrape carries it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Iterable

import httpx
import numpy as np
import redis.asyncio
import uvloop

from loopfm.bench.decompose import decomposition
from loopfm.bench.loadtest import (LoadSpec, RequestPool, auth_headers, format_ms, pinned, request_bodies, require_success, run_load,
                                   sweep, warm_up, write_report)
from loopfm.bench.wrk import wrk_closed_loop
from loopfm.core.files import read_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.data.ids import load_id_maps

OPEN_LOOP = {100: (200.0, 500.0), 1000: (50.0,)}  # candidates: offered rates (the goals)
NOOP_RATES = (50.0, 200.0, 500.0)
CAPACITY_RATES = [200, 300, 400, 500, 600, 700, 800, 1000, 1200, 1500, 2000]
CAPACITY_P99_MS = 5.0
CANDIDATES = (10, 100, 1000)  # the feast_sdk table
PATHS = ("loopfm", "feast_sdk", "floor", "noop")
TABLE_RATE = {10: 20.0, 100: 20.0, 1000: 5.0}  # low, so (a), (c), (d) show service time, not queueing
SCRAPE_TIMEOUT_S = 30.0  # a scrape waits behind whatever backlog the last point left


def request_pool(run_dir: Path) -> RequestPool:
    paths = RunPaths(run_dir)
    known = read_parquet(paths.features / "vm_eval_entities.parquet", columns=["user_id"])["user_id"].unique()
    items = read_parquet(paths.features / "item_features.parquet", columns=["item_id"])["item_id"].to_numpy()  # source ids
    users = load_id_maps(paths)[0].source.to_numpy()
    n_unseen = max(1, len(users) // 20)  # ~5% of cold draws: users the store never saw, of the run's id type
    if users.dtype.kind == "i":
        unseen = np.arange(n_unseen) + users.max() + 1
    else:
        unseen = np.array([f"unseen-{i}" for i in range(n_unseen)], dtype=object)
    return RequestPool(known_users=np.sort(known), cold_users=np.concatenate([users, unseen]), items=items)


def configurations(cores: list[int]) -> dict[str, dict]:
    """The two pinned set-ups on the first two of `cores`; ValueError with fewer than two."""
    if len(cores) < 2:
        raise ValueError(f"the serving bench pins server and client to separate cores; this process may use only {cores}")
    a, b = cores[:2]
    return {"1_worker": {"workers": 1, "cores": {"server": [a], "store": [a], "client": [b]}},
            "2_workers": {"workers": 2, "cores": {"server": [a, b], "store": [a], "client": [b]}}}  # fmt: skip


def floor_latency(scorer, redis_url: str, pool: RequestPool, candidates: int, n: int, warmup: int = 20) -> dict:
    """The server's own Scorer, awaited in process one request at a time on one uvloop event
    loop (as a worker runs it, without HTTP): p50/p99 ms of `n` calls after `warmup`, and
    their rate (calls/s)."""
    rng = np.random.default_rng(1)
    spec = LoadSpec(rate=1, duration_s=n, candidates=candidates)
    bodies = [json.loads(b) for b in request_bodies(spec, pool, n + warmup, rng)]

    async def calls() -> list[float]:
        client = redis.asyncio.Redis.from_url(redis_url)
        samples = []
        try:
            for b in bodies:
                started = time.perf_counter()
                await scorer.score(client, b["user_id"], b["candidate_item_ids"], b["context"]["hour"])
                samples.append((time.perf_counter() - started) * 1000)
        finally:
            await client.aclose()
        return samples[warmup:]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        samples_ms = runner.run(calls())
    return {"p50_ms": float(np.percentile(samples_ms, 50)), "p99_ms": float(np.percentile(samples_ms, 99)),
            "rate": 1000 * n / float(np.sum(samples_ms)), "n": n}  # fmt: skip


def run_serving_bench(run_dir: Path, variant: str, out_dir: Path, duration_s: float = 30.0, log=print,
                      api_key: str | None = None) -> dict:  # fmt: skip
    """Both configurations; `duration_s` per open-loop point, a third of it per noop, sweep,
    wrk and feast_sdk point; servers requiring `api_key` if given (module docstring). Writes
    out_dir/benchmarks.json and each open-loop point's report in out_dir/benchmarks/
    (loopfm/bench/serving_report.py renders the summary)."""
    from loopfm.pipeline.services import redis_url_or_local
    from loopfm.pipeline.stages import materialize

    setups = configurations(sorted(os.sched_getaffinity(0)))
    model_dir = RunPaths(run_dir).vm / variant / "onnx"
    pool = request_pool(run_dir)
    started = time.perf_counter()
    results = {}
    with pinned(setups["1_worker"]["cores"]["store"]), redis_url_or_local() as url:  # Valkey inherits the store core
        log(f"materializing {run_dir} into {url}")
        materialize(run_dir, url)
        for name, setup in setups.items():
            log(f"configuration {name}: {setup}")
            results[name] = _configuration(name, setup, model_dir, url, run_dir, pool, out_dir, duration_s, log, api_key)
    summary = {
        "configurations": results,
        "duration_s": duration_s,
        "variant": variant,
        "model": _model_description(model_dir),
        "machine": {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "platform": platform.platform()},
        "command": "make bench-serving" if duration_s == 30.0 else f"loopfm bench serving --duration {duration_s:g}",
        "seconds": time.perf_counter() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "benchmarks.json", json.dumps(summary, indent=2))
    return summary


def _configuration(name: str, setup: dict, model_dir: Path, url: str, run_dir: Path, pool: RequestPool,
                   out_dir: Path, duration_s: float, log, api_key: str | None = None) -> dict:  # fmt: skip
    from loopfm.pipeline.services import start_server, stop_server

    cores, workers, short = setup["cores"], setup["workers"], duration_s / 3
    warm = min(2.0, short)
    logs = RunPaths(run_dir).root / "bench_logs"
    with pinned(cores["server"]):
        proc, server = start_server(model_dir, url, logs / f"loopfm-{name}.log", workers=workers, env=_key_env(api_key))
    try:
        _wait_for_workers(server, workers)
        result: dict = {"cores": cores, "workers": workers}
        with pinned(cores["client"]):
            result["feast_sdk"] = (_four_paths(model_dir, url, server, run_dir, pool, cores, short, logs, log, api_key)
                                   if workers == 1 else None)  # fmt: skip
            result["open_loop"] = {}
            for candidates, rates in OPEN_LOOP.items():
                for rate in rates:
                    require_success(warm_up(server, pool, candidates=candidates, rate=rate, seconds=warm, api_key=api_key),
                                    f"{name}: the warm-up at {rate:g} req/s")  # fmt: skip
                    before = server_histogram(server, workers, api_key=api_key)
                    spec = LoadSpec(rate=rate, duration_s=duration_s, candidates=candidates)
                    report, records = run_load(server, spec, pool, api_key=api_key)
                    row = _row(report) | {"server": _histogram_summary(server_histogram(server, workers, api_key=api_key), before)}
                    result["open_loop"].setdefault(str(candidates), {})[f"{rate:g}"] = row
                    plot_title = f"{name}: /score, {candidates} candidates, {rate:g} req/s open loop"
                    write_report(report, records, out_dir / "benchmarks" / name / f"score_{candidates}_{rate:g}", plot_title)
                    log(f"  open loop {candidates} candidates at {rate:g} req/s: {_line(row)}; server p99 <= "
                        f"{format_ms(row['server']['p99_le_ms'])}")  # fmt: skip
            result["noop"] = {}
            for rate in NOOP_RATES:
                report, _ = run_load(server, LoadSpec(rate=rate, duration_s=short), None, "/healthz")
                result["noop"][f"{rate:g}"] = _row(report)
                log(f"  noop /healthz at {rate:g} req/s: {_line(result['noop'][f'{rate:g}'])}")
            warm_up(server, pool, candidates=100, rate=CAPACITY_RATES[0], seconds=warm, api_key=api_key)
            found = sweep(server, LoadSpec(rate=1, duration_s=short, candidates=100), pool, CAPACITY_RATES, CAPACITY_P99_MS, log,
                          api_key=api_key)  # fmt: skip
            result["capacity_p99_5ms"] = {"100": found["best_rate"]}
            result["capacity_runs"] = [_row(r) for r in found["runs"]]
            result["wrk_closed_loop"] = {str(c): wrk_closed_loop(server, pool, c, workers, short, api_key) for c in OPEN_LOOP}
            log(f"  capacity (p99 <= {CAPACITY_P99_MS:g} ms): {found['best_rate']} req/s; wrk: {result['wrk_closed_loop']}")
            result["item_cache_hit_ratio"] = _cache_hit_ratio(server, api_key)
            result["decomposition"] = (decomposition(server, proc.pid, model_dir, url, pool, cores, short, logs, log, api_key)
                                       if workers == 1 else None)  # fmt: skip
    finally:
        stop_server(proc)
    return result


def _four_paths(model_dir: Path, url: str, server: str, run_dir: Path, pool: RequestPool, cores: dict,
                seconds: float, logs: Path, log, api_key: str | None = None) -> dict:  # fmt: skip
    """The table of before: (a) loopfm, (b) Feast SDK, (c) in-process floor, (d) /healthz."""
    from loopfm.pipeline.services import start_server, stop_server
    from serving.item_cache import ItemCache
    from serving.scorer import Scorer

    with pinned(cores["server"]):
        # Its start imports the Feast SDK and torch on one core: minutes on a loaded machine.
        sdk_proc, sdk = start_server(model_dir, url, logs / "feast_sdk.log", app="loopfm.bench.feast_sdk_app:create_app",
                                     env={"LOOPFM_RUN_DIR": str(run_dir.resolve())}, ready_within_s=300)  # fmt: skip
    rows: dict = {p: {} for p in PATHS}
    try:
        for c in CANDIDATES:
            spec = LoadSpec(rate=TABLE_RATE[c], duration_s=seconds, candidates=c)
            for path_name, base, body_pool, path in (("loopfm", server, pool, "/score"), ("feast_sdk", sdk, pool, "/score"),
                                                     ("noop", server, None, "/healthz")):  # fmt: skip
                warm_up(base, body_pool, path, candidates=c, rate=spec.rate, seconds=min(2.0, seconds), api_key=api_key)
                rows[path_name][str(c)] = _row(run_load(base, spec, body_pool, path, api_key)[0])
            with pinned(cores["server"]):
                scorer = Scorer(model_dir, threads=1, item_cache=ItemCache(100_000, 300))
                rows["floor"][str(c)] = floor_latency(scorer, url, pool, c, n=300)
            log(f"  four paths, {c} candidates: " + ", ".join(f"{p} p50 {format_ms(rows[p][str(c)]['p50_ms'])}" for p in PATHS))
    finally:
        stop_server(sdk_proc)
    return {"rates": {str(c): r for c, r in TABLE_RATE.items()}, "seconds": seconds, **rows}


def _key_env(api_key: str | None) -> dict[str, str]:
    """The server's LOOPFM_API_KEY: `api_key`, or none (empty), whatever this process's environment holds."""
    return {"LOOPFM_API_KEY": api_key or ""}



def _wait_for_workers(url: str, workers: int, within_s: float = 60.0) -> None:
    """start_server returns when one worker answers; wait until all have."""
    seen, deadline = set(), time.monotonic() + within_s
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only workers {sorted(seen)} of {workers} answered /readyz within {within_s:.0f} s")
        response = httpx.get(f"{url}/readyz", timeout=SCRAPE_TIMEOUT_S)
        if response.status_code == 200:
            seen.add(response.json()["worker"])
        time.sleep(0.02)


def server_histogram(url: str, workers: int, path: str = "/score", within_s: float = 10.0,
                     api_key: str | None = None) -> dict[float, float]:  # fmt: skip
    """{upper bound in seconds: requests <= it} of `loopfm_request_seconds` for `path`, summed
    over every worker: each scrape opens a new connection, which one worker accepts, until
    all `workers` have answered (serving/metrics.py: one registry per worker)."""
    from prometheus_client.parser import text_string_to_metric_families

    per_worker: dict[str, dict[float, float]] = {}
    deadline = time.monotonic() + within_s
    while len(per_worker) < workers and time.monotonic() < deadline:
        worker, buckets = None, {}
        scrape = httpx.get(f"{url}/metrics", headers=auth_headers(api_key), timeout=SCRAPE_TIMEOUT_S)
        for family in text_string_to_metric_families(scrape.raise_for_status().text):
            for sample in family.samples:
                if sample.name == "loopfm_worker_info":
                    worker = sample.labels["worker"]
                elif sample.name == "loopfm_request_seconds_bucket" and sample.labels["path"] == path:
                    buckets[float(sample.labels["le"])] = sample.value
        per_worker[worker] = buckets
    if len(per_worker) < workers:
        raise RuntimeError(f"/metrics answered from {len(per_worker)} of {workers} workers within {within_s:.0f} s")
    return sum_histograms(per_worker.values())


def sum_histograms(histograms: Iterable[dict[float, float]]) -> dict[float, float]:
    """{upper bound: requests <= it} summed over workers' histograms, every bound any of them
    has: a worker that has served no request of the path yet has no buckets at all."""
    histograms = list(histograms)
    return {le: sum(h.get(le, 0.0) for h in histograms) for le in sorted(set().union(*histograms))}


def _histogram_summary(after: dict[float, float], before: dict[float, float]) -> dict:
    """The server's view of one run (scrape after minus scrape before): the cumulative share
    of requests at or under each bucket bound, and the bounds that hold p50 and p99."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts[float("inf")] if counts else 0.0
    share = {f"{le * 1000:g}": (n / total if total else None) for le, n in counts.items() if le != float("inf")}

    def bound(q: float) -> float | None:
        return next((le * 1000 for le, n in counts.items() if total and n / total >= q and le != float("inf")), None)

    return {"requests": total, "share_le_ms": share, "p50_le_ms": bound(0.5), "p99_le_ms": bound(0.99)}


def _row(report: dict) -> dict:
    """The issue's per-point keys, then what the point offered and what the client cost."""
    keys = ("p50_ms", "p99_ms", "p999_ms", "achieved_rate", "errors", "offered_rate", "sent", "client", "machine")
    return {k: report[k] for k in keys}


def _line(row: dict) -> str:
    return (f"p50 {format_ms(row['p50_ms'])}, p99 {format_ms(row['p99_ms'])}, achieved {row['achieved_rate']:.0f} req/s, "
            f"errors {row['errors'] or 'none'}, client CPU {row['client']['cpu_share']:.0%}, steal {steal(row)}")  # fmt: skip


def steal(row: dict) -> str:
    steal = row["machine"]["steal_share"]
    return "n/a" if steal is None else f"{steal:.0%}"


def _model_description(model_dir: Path) -> str:
    meta = json.loads((model_dir / "model.json").read_text())
    return f"{meta['model_version']}, L = {meta['spec']['history_length']}, code dim {meta['spec']['code_dim']}"


def _cache_hit_ratio(url: str, api_key: str | None = None) -> float | None:
    for line in httpx.get(f"{url}/metrics", headers=auth_headers(api_key), timeout=SCRAPE_TIMEOUT_S).raise_for_status().text.splitlines():
        if line.startswith("loopfm_item_cache_hit_ratio"):
            return float(line.split()[-1])
    return None
