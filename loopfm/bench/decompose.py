"""Where one /score's time goes, per candidate count, measured in one run (issue 39): a
section of `loopfm bench serving` (1 worker), written into docs/benchmarks.md.

- In process, pinned to the server's core (beside Valkey, as the worker runs), back to back
  on one uvloop loop: request parsing and validation (what FastAPI does with the body), the
  item cache lookup, the Redis round trip (warm cache: the user's row and the items-written
  feed), tensorization, ONNX Runtime, response encoding, and the Scorer whole. The steps
  run interleaved, request by request, so a neighbour's noise slows them alike; medians.
- Over HTTP, the client pinned to its own core, one keep-alive connection, back to back:
  GET /healthz (the no-op) and POST /score, with the same bodies.
- CPU: the uvicorn process's (and its workers') CPU time per /score over an open-loop run
  at a fixed rate (`/proc/<pid>/stat`, utime + stime), against the Scorer's own CPU time per
  call in process (`time.process_time`, ONNX Runtime's threads included), back to back and
  paced like the open loop (the same rate, Poisson gaps: on this machine a call that follows
  an idle gap costs more CPU than one that follows another, docs/serving.md), and the
  server's CPU per GET /healthz at the same rate (what the HTTP stack costs with no handler).
- A bare ASGI app under the same uvicorn command on the server's core
  (loopfm/bench/bare_app.py), sent the same POST bodies back to back and at the same rate:
  what uvicorn alone costs a request, so (bare app + Scorer) ÷ Scorer is the least server
  CPU ÷ Scorer CPU any app on this server could reach.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
import redis.asyncio
import uvloop

from loopfm.bench.loadtest import (LoadSpec, RequestPool, format_ms, http_request, pinned, request_body, request_bodies, run_load,
                                   warm_up)

if TYPE_CHECKING:  # serving is imported when the bench runs (the serving install has no bench)
    from serving.schemas import ScoreRequest
    from serving.scorer import Scorer

CANDIDATES = (10, 100, 1000)
REQUESTS = {10: 400, 100: 400, 1000: 150}  # distinct bodies per count, each step timed once per body
FULL_SECONDS = 10.0  # the CPU run of `make bench-serving`; a shorter run times fewer bodies (at least MIN_REQUESTS)
MIN_REQUESTS = 40
WARMUP = 30  # requests per count before timing: caches filled, code paths warm
CPU_RATE = {10: 200.0, 100: 200.0, 1000: 50.0}  # req/s of the CPU run (the open-loop points of the bench)
STEPS = ("parse", "lookup", "redis", "tensorize", "onnx", "encode", "scorer")
LABELS = {
    "noop": "HTTP no-op (GET /healthz)",
    "parse": "parse + validate the body",
    "lookup": "item cache lookup",
    "redis": "Redis round trip (warm cache)",
    "tensorize": "tensorization",
    "onnx": "ONNX Runtime",
    "encode": "response encoding",
    "scorer": "Scorer in process (lookup to scores)",
    "score": "POST /score over HTTP",
    "bare": "bare ASGI app under the same uvicorn, the same POST",
}


def parse_body(raw: bytes) -> ScoreRequest:
    """What FastAPI does with a /score body before the handler: JSON, then the model's validation."""
    from serving.schemas import ScoreRequest

    return ScoreRequest.model_validate(json.loads(raw))


def worker_scorer(model_dir: Path) -> Scorer:
    """A Scorer as a worker builds it with the default settings, on the cores this process has."""
    from serving.item_cache import ItemCache
    from serving.scorer import Scorer
    from serving.settings import Settings, cores_per_worker

    return Scorer(model_dir, Settings.ort_threads, ItemCache(Settings.item_cache_size, Settings.item_cache_ttl_s),
                  Settings.large_batch, min(Settings.ort_threads_large, cores_per_worker(1)))  # fmt: skip


def catalogue(pool: RequestPool) -> list[bytes]:
    """/score bodies that hold every item of `pool` once (1,000 a body): sent first, they fill
    the item caches as a server's steady state has them (hit ratio above 0.99 in the bench)."""
    user = pool.known_users[0].item()
    return [request_body(user, pool.items[i : i + 1000].tolist(), 0) for i in range(0, len(pool.items), 1000)]


def in_process(scorer: Scorer, redis_url: str, bodies: list[bytes], rate: float | None = None) -> dict[str, list[float]]:
    """{step: seconds per body} after WARMUP bodies, and "scorer_cpu": the Scorer's CPU
    seconds per call; with `rate`, also "scorer_cpu_paced": its CPU seconds per call when the
    calls are spaced as an open loop at `rate` spaces requests (Poisson gaps, the loop idle in
    between); `scorer` as worker_scorer builds it, its cache filled (`catalogue`)."""
    from serving.routers.score import scored_response

    clock = time.perf_counter

    async def steps(client) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {step: [] for step in STEPS}
        scorer_cpu = 0.0
        for n, raw in enumerate(bodies):
            t0 = clock()
            body = parse_body(raw)
            t1 = clock()
            looked_up = scorer.items.lookup(body.candidate_item_ids)
            t2 = clock()
            user, fetched, written = await scorer.read(client, body.user_id, looked_up[2])
            t3 = clock()
            tensors = scorer.tensorize(user, fetched, body.candidate_item_ids, looked_up, body.context.hour)
            scorer.items.forget_written(written)
            t4 = clock()
            scorer.run(tensors)
            t5 = clock()
            cpu = time.process_time()
            result = await scorer.score(client, body.user_id, body.candidate_item_ids, body.context.hour)
            t6 = clock()
            cpu = time.process_time() - cpu
            scored_response(result, scorer.version)
            t7 = clock()
            if n >= WARMUP:
                for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t7 - t6, t6 - t5)):
                    out[step].append(seconds)
                scorer_cpu += cpu
        out["scorer_cpu"] = [scorer_cpu / max(1, len(bodies) - WARMUP)]
        if rate is not None:
            out["scorer_cpu_paced"] = [await paced_cpu(client, [parse_body(raw) for raw in bodies[WARMUP:]])]
        return out

    async def paced_cpu(client, bodies: list[ScoreRequest]) -> float:
        gaps = np.random.default_rng(5).exponential(1 / rate, len(bodies))
        used = 0.0
        for body, gap in zip(bodies, gaps):
            await asyncio.sleep(gap)
            cpu = time.process_time()
            await scorer.score(client, body.user_id, body.candidate_item_ids, body.context.hour)
            used += time.process_time() - cpu
        return used / max(1, len(bodies))

    async def with_client() -> dict[str, list[float]]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await steps(client)
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(with_client())


def _read_response(sock: socket.socket, pending: bytes) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length; return what followed it. RuntimeError unless 200."""
    while b"\r\n\r\n" not in pending:
        pending += sock.recv(65536)
    head, _, rest = pending.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the decomposition's request got {head.decode(errors='replace').splitlines()[0]}")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return rest[length:]


def over_http(url: str, requests: list[bytes]) -> list[float]:
    """Seconds per request after WARMUP, one keep-alive connection, each sent once the last answered."""
    parsed = urlparse(url)
    samples, pending = [], b""
    with socket.create_connection((parsed.hostname, parsed.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for request in requests:
            started = time.perf_counter()
            sock.sendall(request)
            pending = _read_response(sock, pending)
            samples.append(time.perf_counter() - started)
    return samples[WARMUP:]


def cpu_seconds(pids: set[int]) -> float:
    """utime + stime of `pids` (/proc/<pid>/stat fields 14 and 15, in clock ticks)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu_per_request(url: str, server_pid: int, pool: RequestPool | None, candidates: int, seconds: float,
                           api_key: str | None = None, path: str = "/score") -> dict:  # fmt: skip
    """The server's CPU µs per request to `path` (a GET without `pool`) over an open-loop run
    at CPU_RATE[candidates], and what the run saw."""
    from loopfm.pipeline.services import descendants

    pids = {server_pid} | descendants(server_pid)
    rate = CPU_RATE[candidates]
    warm_up(url, pool, path, candidates=candidates, rate=rate, seconds=min(2.0, seconds), api_key=api_key)
    before = cpu_seconds(pids)
    report, _ = run_load(url, LoadSpec(rate=rate, duration_s=seconds, candidates=candidates, seed=3), pool, path, api_key)
    used = cpu_seconds(pids) - before
    return {"rate": rate, "seconds": seconds, "ok": report["ok"], "errors": report["errors"], "p50_ms": report["p50_ms"],
            "p99_ms": report["p99_ms"], "cpu_us": 1e6 * used / max(1, report["ok"])}  # fmt: skip


def decomposition(url: str, server_pid: int, model_dir: Path, redis_url: str, pool: RequestPool, cores: dict,
                  seconds: float, logs: Path, log=print, api_key: str | None = None) -> dict:  # fmt: skip
    """Per candidate count: {step: p50/p90/p99 µs} (the steps, "noop", "score", "bare") and
    "cpu": the server's CPU µs per /score at a fixed rate beside the Scorer's per call and the
    bare app's per request. `cores` as in loopfm.bench.serving.configurations (server, client);
    `seconds` per CPU run, the bodies per count REQUESTS scaled by seconds / FULL_SECONDS when
    shorter; requests carry `api_key` if given; the bare app's output goes to `logs`."""
    from loopfm.pipeline.services import start_server, stop_server

    with pinned(cores["server"]):
        bare_proc, bare = start_server(model_dir, redis_url, logs / "bare_app.log", wait_for="/healthz",
                                       app="loopfm.bench.bare_app:create_app")  # fmt: skip
    try:
        return _decomposition(url, server_pid, (bare, bare_proc.pid), model_dir, redis_url, pool, cores, seconds, log, api_key)
    finally:
        stop_server(bare_proc)


def _decomposition(url: str, server_pid: int, bare: tuple[str, int], model_dir: Path, redis_url: str, pool: RequestPool,
                   cores: dict, seconds: float, log, api_key: str | None) -> dict:  # fmt: skip
    scale = min(1.0, seconds / FULL_SECONDS)
    requests = {c: max(MIN_REQUESTS, round(n * scale)) for c, n in REQUESTS.items()}
    out: dict = {"requests": requests, "cpu_rate": CPU_RATE, "load": os.getloadavg()}
    fill = catalogue(pool)
    with pinned(cores["server"]):
        scorer = worker_scorer(model_dir)
        in_process(scorer, redis_url, fill)
    with pinned(cores["client"]):
        over_http(url, [http_request(url, "/score", b, api_key) for b in fill])
    for c in CANDIDATES:
        bodies = request_bodies(LoadSpec(rate=1, duration_s=1, candidates=c, seed=11), pool, requests[c],
                                np.random.default_rng(11))  # fmt: skip
        with pinned(cores["server"]):
            steps = in_process(scorer, redis_url, bodies, CPU_RATE[c])
        with pinned(cores["client"]):
            steps["noop"] = over_http(url, [http_request(url, "/healthz", None, api_key)] * len(bodies))
            steps["score"] = over_http(url, [http_request(url, "/score", b, api_key) for b in bodies])
            steps["bare"] = over_http(bare[0], [http_request(bare[0], "/score", b, api_key) for b in bodies])
            cpu = server_cpu_per_request(url, server_pid, pool, c, seconds, api_key)
            noop_cpu = server_cpu_per_request(url, server_pid, None, c, seconds, api_key, "/healthz")
            bare_cpu = server_cpu_per_request(bare[0], bare[1], pool, c, seconds, api_key)
        row = {step: _percentiles(samples) for step, samples in steps.items() if not step.startswith("scorer_cpu")}
        row["cpu"] = cpu | {"scorer_cpu_us": 1e6 * steps["scorer_cpu"][0], "scorer_cpu_paced_us": 1e6 * steps["scorer_cpu_paced"][0],
                            "noop_cpu_us": noop_cpu["cpu_us"], "bare_cpu_us": bare_cpu["cpu_us"]}  # fmt: skip
        out[str(c)] = row
        log(f"  decomposition, {c} candidates: " + ", ".join(f"{s} {row[s]['p50_us']:.0f} µs" for s in LABELS)
            + f"; server CPU {cpu['cpu_us']:.0f} µs per /score, {noop_cpu['cpu_us']:.0f} per /healthz, "
              f"{bare_cpu['cpu_us']:.0f} per bare-app request; Scorer "
              f"{row['cpu']['scorer_cpu_us']:.0f} µs back to back, {row['cpu']['scorer_cpu_paced_us']:.0f} paced")  # fmt: skip
    return out


def _percentiles(seconds: list[float]) -> dict:
    us = np.asarray(seconds) * 1e6
    return {"p50_us": float(np.median(us)), "p90_us": float(np.percentile(us, 90)), "p99_us": float(np.percentile(us, 99)),
            "n": int(us.size)}  # fmt: skip


def markdown(table: dict) -> list[str]:
    """The section of docs/benchmarks.md."""
    cs = [str(c) for c in CANDIDATES]
    lines = ["### Where a /score's time goes (1 worker, back to back)", "",
             f"Each step timed on its own, p50 (p99) in µs; in process on the server's core, the steps interleaved "
             f"request by request; over HTTP from the client's core, one keep-alive connection, each request sent when "
             f"the last answered. Requests per count: {', '.join(f'{c}: {n}' for c, n in table['requests'].items())}. "
             f"Load average at the start: {', '.join(f'{x:.2f}' for x in table['load'])}.", "",
             "| step | " + " | ".join(f"{c} candidates" for c in cs) + " |", "|---|" + "---|" * len(cs)]  # fmt: skip
    for step, label in LABELS.items():
        lines.append(f"| {label} | " + " | ".join(f"{table[c][step]['p50_us']:.0f} ({table[c][step]['p99_us']:.0f})" for c in cs) + " |")
    http_rest = [table[c]["score"]["p50_us"] - table[c]["scorer"]["p50_us"] - table[c]["noop"]["p50_us"] for c in cs]
    lines.append("| /score − Scorer − no-op (the framework's own share) | " + " | ".join(f"{x:.0f}" for x in http_rest) + " |")
    ratio = [table[c]["score"]["p50_us"] / (table[c]["scorer"]["p50_us"] + table[c]["noop"]["p50_us"]) for c in cs]
    lines.append("| /score ÷ (Scorer + no-op), p50 (goal at 100: ≤ 1.15) | " + " | ".join(f"{x:.2f}" for x in ratio) + " |")
    lines.append("| server CPU per /score at a fixed rate, µs | "
                 + " | ".join(f"{table[c]['cpu']['cpu_us']:.0f} at {table[c]['cpu']['rate']:g} req/s" for c in cs) + " |")  # fmt: skip
    lines.append("| Scorer CPU per call in process, µs | " + " | ".join(f"{table[c]['cpu']['scorer_cpu_us']:.0f}" for c in cs) + " |")
    lines.append("| server CPU ÷ Scorer CPU (goal at 100: ≤ 1.5) | "
                 + " | ".join(f"{table[c]['cpu']['cpu_us'] / table[c]['cpu']['scorer_cpu_us']:.2f}" for c in cs) + " |")  # fmt: skip
    lines.append("| Scorer CPU per call in process, paced as the open loop (same rate, Poisson gaps), µs | "
                 + " | ".join(f"{table[c]['cpu']['scorer_cpu_paced_us']:.0f}" for c in cs) + " |")  # fmt: skip
    lines.append("| server CPU ÷ paced Scorer CPU | "
                 + " | ".join(f"{table[c]['cpu']['cpu_us'] / table[c]['cpu']['scorer_cpu_paced_us']:.2f}" for c in cs) + " |")  # fmt: skip
    lines.append("| server CPU per GET /healthz at the same rate, µs | "
                 + " | ".join(f"{table[c]['cpu']['noop_cpu_us']:.0f}" for c in cs) + " |")  # fmt: skip
    lines.append("| bare app's server CPU per POST at the same rate, µs | "
                 + " | ".join(f"{table[c]['cpu']['bare_cpu_us']:.0f}" for c in cs) + " |")  # fmt: skip
    least = [(table[c]["cpu"]["bare_cpu_us"] + table[c]["cpu"]["scorer_cpu_us"]) / table[c]["cpu"]["scorer_cpu_us"] for c in cs]
    lines.append("| least server CPU ÷ Scorer CPU on this uvicorn: (bare app + Scorer) ÷ Scorer | "
                 + " | ".join(f"{x:.2f}" for x in least) + " |")  # fmt: skip
    lines.append("| open-loop p50 / p99 during the CPU run | "
                 + " | ".join(f"{format_ms(table[c]['cpu']['p50_ms'])} / {format_ms(table[c]['cpu']['p99_ms'])}" for c in cs) + " |")  # fmt: skip
    return lines + [""]
