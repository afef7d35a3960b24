"""Open-loop HTTP load generator (`loopfm loadtest`).

Requests leave on a fixed schedule (constant or Poisson arrivals) whether or not earlier
ones have answered, and each latency is measured from its *scheduled* send time, so a
server that stalls cannot hide its tail by slowing the client down (coordinated omission).
Traffic goes to loopback only; every run is bounded by a request count and a duration.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np
import orjson
import uvloop

from loopfm.io import write_text

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadSpec:
    rate: float  # requests per second
    duration_s: float
    candidates: int = 100
    arrival: str = "poisson"  # poisson | constant
    hot_fraction: float = 0.8  # share of requests for the hot users
    hot_users: int = 100
    timeout_s: float = 2.0
    max_connections: int = 512
    seed: int = 0


@dataclass
class RequestPool:
    """Ids a load test draws from: users with stored features, and the item catalogue."""

    known_users: np.ndarray
    all_users: int  # ids >= this are unknown to the store (cold users include some)
    items: np.ndarray


def schedule(spec: LoadSpec, rng: np.random.Generator) -> np.ndarray:
    """Send-time offsets in seconds, within [0, duration)."""
    n = int(spec.rate * spec.duration_s)
    if spec.arrival == "constant":
        return np.arange(n) / spec.rate
    if spec.arrival != "poisson":
        raise ValueError(f"arrival must be 'poisson' or 'constant', got {spec.arrival!r}")
    # Draw well past the expected count, then cut at the duration: the count itself is random.
    offsets = np.cumsum(rng.exponential(1 / spec.rate, int(n * 1.2) + 50))
    return offsets[offsets < spec.duration_s]


def request_bodies(spec: LoadSpec, pool: RequestPool, n: int, rng: np.random.Generator) -> list[bytes]:
    """Pre-serialized /score bodies: hot users repeat, cold users are drawn from everyone
    (about 5% of the cold draws are users unknown to the store)."""
    hot = rng.choice(pool.known_users, min(spec.hot_users, len(pool.known_users)), replace=False)
    cold_range = int(pool.all_users * 1.05)
    bodies = []
    for _ in range(n):
        user = rng.choice(hot) if rng.random() < spec.hot_fraction else rng.integers(0, cold_range)
        items = rng.choice(pool.items, spec.candidates, replace=spec.candidates > len(pool.items))
        body = {"user_id": int(user), "candidate_item_ids": items.tolist(), "context": {"hour": int(rng.integers(24))}}
        bodies.append(orjson.dumps(body))
    return bodies


def _check_loopback(url: str) -> None:
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"load tests target loopback only (127.0.0.1, localhost, ::1), not {url}")


async def _send(client: aiohttp.ClientSession, path: str, body: bytes | None) -> int:
    if body is None:
        request = client.get(path)
    else:
        request = client.post(path, data=body, headers={"content-type": "application/json"})
    async with request as response:
        await response.read()
        return response.status


async def _fire(
    url: str, path: str, offsets: np.ndarray, bodies: list[bytes] | None, spec: LoadSpec
) -> tuple[float, list[tuple]]:
    """aiohttp, not httpx: its per-request client cost is lower, and on a 2-core machine the
    client's CPU time shows up in every measured latency."""
    records: list[tuple] = []
    connector = aiohttp.TCPConnector(limit=spec.max_connections)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        # Open a pool of keep-alive connections before the clock starts, as a long-running
        # client would have; otherwise the first burst measures TCP set-up.
        first = bodies[0] if bodies else None
        await asyncio.gather(*(_send(client, path, first) for _ in range(16)), return_exceptions=True)
        # perf_counter, not loop.time(): uvloop's loop clock ticks in whole milliseconds.
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            kind = "ok"
            try:
                status = await _send(client, path, None if bodies is None else bodies[i])
                if status != 200:
                    kind = f"http_{status}"
            except asyncio.TimeoutError:
                kind = "timeout"
            except aiohttp.ClientError as exc:
                kind = f"transport_{type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - one odd failure must not drop every record
                kind = f"other_{type(exc).__name__}"
            records.append((offsets[i], time.perf_counter() - (start + offsets[i]), kind))

        # One dispatcher releases each request at its scheduled time, whatever earlier
        # requests are doing; latency is counted from that scheduled time.
        in_flight = []
        for i, offset in enumerate(offsets):
            while (remaining := start + offset - time.perf_counter()) > 0:  # never release early
                await asyncio.sleep(remaining)
            in_flight.append(asyncio.create_task(one(i)))
        await asyncio.gather(*in_flight)
    return start, records


def summarize(records: list[tuple], spec: LoadSpec) -> dict:
    """Percentiles over *every* request, failures included at the time they failed (a
    time-out counts as at least the time-out), so errors cannot flatter the tail."""
    latency = np.array([lat for _, lat, _ in records]) * 1000
    ok = sum(kind == "ok" for _, _, kind in records)
    errors: dict[str, int] = {}
    for _, _, kind in records:
        if kind != "ok":
            errors[kind] = errors.get(kind, 0) + 1
    pct = {f"p{str(q).replace('.', '')}_ms": float(np.percentile(latency, q)) if latency.size else None
           for q in (50, 90, 99, 99.9)}  # fmt: skip
    span = max(spec.duration_s, max((t for t, _, _ in records), default=0.0))
    return {
        "offered_rate": spec.rate,
        "achieved_rate": ok / span,  # successful requests per second of schedule
        "sent": len(records),
        "ok": ok,
        "errors": errors,
        **pct,
        "max_ms": float(latency.max()) if latency.size else None,
    }


def run_load(url: str, spec: LoadSpec, pool: RequestPool | None, path: str = "/score") -> tuple[dict, list[tuple]]:
    """One open-loop run; `pool=None` sends GETs (e.g. a no-op endpoint)."""
    _check_loopback(url)
    rng = np.random.default_rng(spec.seed)
    offsets = schedule(spec, rng)
    bodies = request_bodies(spec, pool, len(offsets), rng) if pool is not None else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # uvloop: less client overhead per request
        origin, records = runner.run(_fire(url, path, offsets, bodies, spec))
    # The schedule's origin on time.perf_counter's clock, to line records up with other events.
    return {"spec": asdict(spec), "path": path, "schedule_origin_perf_counter": origin, **summarize(records, spec)}, records


def warm_up(url: str, pool: RequestPool | None, path: str = "/score", candidates: int = 100, rate: float = 50.0) -> None:
    """Two seconds at the rate about to be measured, then a pause for any backlog to drain."""
    run_load(url, LoadSpec(rate=rate, duration_s=2.0, candidates=candidates, seed=99), pool, path)
    time.sleep(1.0)


def sweep(url: str, base: LoadSpec, pool: RequestPool, rates: list[float], p99_bound_ms: float, log=print) -> dict:
    """Raise the rate until p99 exceeds the bound (or errors appear); report the highest that held."""
    runs, best = [], None
    for rate in rates:
        report, _ = run_load(url, LoadSpec(**{**asdict(base), "rate": rate}), pool)
        runs.append(report)
        held = report["p99_ms"] is not None and report["p99_ms"] <= p99_bound_ms and not report["errors"]
        log(f"  sweep {rate:>6.0f} req/s: p99 {format_ms(report['p99_ms'])}, "
            f"achieved {report['achieved_rate']:.0f} req/s, errors {report['errors']} -> {'ok' if held else 'over'}")  # fmt: skip
        if not held:
            break
        best = rate
    return {"p99_bound_ms": p99_bound_ms, "candidates": base.candidates, "best_rate": best, "runs": runs}


def format_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def plot_load(records: list[tuple], title: str, path: Path) -> None:
    """Latency over time (scheduled send time) and the latency CDF, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r[0] for r in records])
    lat = np.array([r[1] for r in records]) * 1000
    bad = np.array([r[2] != "ok" for r in records])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.scatter(t[~bad], lat[~bad], s=3, alpha=0.5, label="ok")
    if bad.any():
        a.scatter(t[bad], lat[bad], s=6, color="red", label="error")
    a.set(yscale="log", xlabel="scheduled send time (s)", ylabel="latency (ms)", title="latency over time")
    a.legend(loc="upper right")
    ok = np.sort(lat[~bad])
    if ok.size:
        b.plot(ok, np.arange(1, ok.size + 1) / ok.size)
        for q in (0.5, 0.99):
            b.axhline(q, color="grey", lw=0.5)
    b.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests", title="latency CDF")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, records: list[tuple], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "loadtest.json", json.dumps(report, indent=2))
    plot_load(records, title, out / "loadtest.png")


def timed(fn, n: int, warmup: int = 20) -> dict:
    """p50/p99 of an in-process call, and the calls per second of the sequential loop."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p99_ms": float(np.percentile(samples, 99)),
        "rate": 1000 * n / float(np.sum(samples)),
        "n": n,
    }
