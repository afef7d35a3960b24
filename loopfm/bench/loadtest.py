"""Open-loop HTTP load generator (`loopfm loadtest`, `loopfm bench serving`).

Requests leave on a fixed schedule (constant or Poisson arrivals) whether or not earlier
ones have answered, and each latency is measured from its *scheduled* send time, so a
server that stalls cannot hide its tail by slowing the client down (coordinated omission).
Traffic goes to loopback only; every run is bounded by a request count and a duration.

The client is built to cost little, because on a small machine its own time shows up in
every latency it reports: one process, one epoll loop over non-blocking sockets (no asyncio,
no HTTP library), every request's bytes (request line, headers, body) encoded before the
clock starts, a pool of pre-opened HTTP/1.1 keep-alive connections taken in turn (FIFO, so
load spreads over the connections and with them over a server's worker processes), a
response parser that reads the status line and Content-Length only, and a Linux timerfd
that wakes the loop at each send time to the microsecond without spinning (epoll's own
time-out has whole milliseconds). What it still costs is reported, not assumed: each report
gives the client's CPU time and how late it sent (`send_lag`), and the serving bench runs
the same generator against /healthz at the same rates (the floor).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
import orjson

from loopfm.core.files import write_text

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
    connections: int = 32  # opened before the clock starts (at most max_connections)
    seed: int = 0


@dataclass
class RequestPool:
    """Ids a load test draws from: users with stored features, and the item catalogue."""

    known_users: np.ndarray  # source ids (int64 or str) with stored features
    cold_users: np.ndarray  # every user of the run, and about 5% ids of the same type it never saw
    items: np.ndarray  # source ids


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


def request_body(user: int | str, items: list[int] | list[str], hour: int) -> bytes:
    """One /score body (the only place the bench spells the request schema); ids as the
    model's entity types say (source ids: int64 or str)."""
    return orjson.dumps({"user_id": user, "candidate_item_ids": items, "context": {"hour": hour}})


def request_bodies(spec: LoadSpec, pool: RequestPool, n: int, rng: np.random.Generator) -> list[bytes]:
    """Pre-serialized /score bodies: hot users repeat, cold users are drawn from everyone
    (`pool.cold_users`, some of them unknown to the store)."""
    hot = rng.choice(pool.known_users, min(spec.hot_users, len(pool.known_users)), replace=False)
    bodies = []
    for _ in range(n):
        users = hot if rng.random() < spec.hot_fraction else pool.cold_users
        user = users[rng.integers(len(users))]
        items = rng.choice(pool.items, spec.candidates, replace=spec.candidates > len(pool.items))
        bodies.append(request_body(user.item() if isinstance(user, np.generic) else user, items.tolist(), int(rng.integers(24))))
    return bodies


@contextlib.contextmanager
def pinned(cores: list[int]) -> Iterator[None]:
    """Run this process (and what it starts meanwhile) on `cores`, then restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def check_loopback(url: str) -> None:
    """ValueError naming `url` unless its host is loopback."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"load tests target loopback only (127.0.0.1, localhost, ::1), not {url}")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header that carries `api_key` (serving/guards.py): for raw requests, httpx and wrk."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def http_request(url: str, path: str, body: bytes | None, api_key: str | None = None) -> bytes:
    """The whole HTTP/1.1 request as bytes: a GET without a body, or a JSON POST; with
    `api_key`, an `authorization: Bearer` header (the server's LOOPFM_API_KEY)."""
    host = urlparse(url).netloc
    auth = "".join(f"{name}: {value}\r\n" for name, value in auth_headers(api_key).items())
    if body is None:
        return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n".encode()
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\n{auth}content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _Timer:
    """A Linux timerfd on CLOCK_MONOTONIC (the clock of time.perf_counter), through ctypes
    (os.timerfd_* arrive in Python 3.13): readable at the armed time, to the microsecond."""

    class _Spec(ctypes.Structure):  # struct itimerspec: interval, then value; each (tv_sec, tv_nsec)
        _fields_ = [("interval_s", ctypes.c_long), ("interval_ns", ctypes.c_long),
                    ("value_s", ctypes.c_long), ("value_ns", ctypes.c_long)]  # fmt: skip

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        clock_monotonic, tfd_nonblock_cloexec = 1, os.O_NONBLOCK | os.O_CLOEXEC
        self.fd = self._libc.timerfd_create(clock_monotonic, tfd_nonblock_cloexec)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")

    def arm(self, at: float) -> None:
        """Fire once at `at` (seconds on time.perf_counter's clock); 0 would disarm, so a past
        time becomes 1 ns."""
        ns = max(int(at * 1e9), 1)
        spec = self._Spec(0, 0, ns // 1_000_000_000, ns % 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None) != 0:  # 1 = TFD_TIMER_ABSTIME
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class _Connection:
    """One keep-alive connection: at most one request in flight, its response bytes so far."""

    __slots__ = ("sock", "buf", "request", "connected", "idle_since")

    def __init__(self, address: tuple, family: int):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)  # a whole request in one send
        self.sock.setblocking(False)
        self.buf, self.request, self.idle_since, self.connected = bytearray(), -1, 0.0, False
        self.sock.connect_ex(address)  # EINPROGRESS: writable once connected

    def response(self) -> tuple[int, bool] | None:
        """(status, keep-alive) once the buffered bytes hold a whole response, else None."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return None
        del self.buf[: end + 4 + length]
        keep_alive = head.startswith(b"http/1.1") and b"connection: close" not in head
        return int(head[9:12]), keep_alive


SEND_BUFFER = 1 << 20
IDLE_CLOSE_S = 2.0  # uvicorn closes keep-alive connections idle for 5 s; the client drops them first


def _fire(url: str, requests: list[bytes], offsets: np.ndarray, spec: LoadSpec) -> dict:
    """Send request i at start + offsets[i] (cycling through `requests`); return the schedule's
    origin on time.perf_counter's clock, one (offset, latency_s, kind) record per request, the
    send lags (how late the loop released each request: timer wake-up and loop work, not a
    wait for a free connection, which the latency counts) and the client's CPU seconds."""
    parsed = urlparse(url)
    family = socket.AF_INET6 if parsed.hostname == "::1" else socket.AF_INET
    address = ("::1" if family == socket.AF_INET6 else "127.0.0.1", parsed.port or 80)
    n = len(offsets)
    records: list[tuple | None] = [None] * n
    lags = np.full(n, np.nan)
    poller, timer = select.epoll(), _Timer()
    poller.register(timer.fd, select.EPOLLIN)
    by_fd: dict[int, _Connection] = {}
    idle: deque[_Connection] = deque()
    waiting: deque[int] = deque()  # due, not yet sent (no free connection)
    deadlines: deque[int] = deque()  # released requests in schedule order, for time-outs
    owner: dict[int, _Connection] = {}

    def open_connection() -> _Connection:
        conn = _Connection(address, family)
        by_fd[conn.sock.fileno()] = conn
        poller.register(conn.sock.fileno(), select.EPOLLOUT)
        return conn

    def close(conn: _Connection) -> None:
        by_fd.pop(conn.sock.fileno(), None)
        poller.unregister(conn.sock.fileno())
        conn.sock.close()
        conn.request = -1

    def finish(i: int, kind: str, at: float) -> None:
        records[i] = (offsets[i], at - (start + offsets[i]), kind)
        owner.pop(i, None)

    def send(conn: _Connection, i: int) -> None:
        now = time.perf_counter()
        conn.request, owner[i] = i, conn
        try:
            conn.sock.send(requests[i % len(requests)])
        except OSError as exc:
            close(conn)
            finish(i, f"transport_{type(exc).__name__}", now)

    for _ in range(min(spec.connections, spec.max_connections)):
        open_connection()  # idle once connected, in the 50 ms before the clock starts
    # perf_counter, not the epoll clock: epoll's time-out ticks in whole milliseconds.
    start = time.perf_counter() + 0.05
    cpu_started = time.process_time()
    released = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pause inside a measured latency
    try:
        while True:
            now = time.perf_counter()
            while released < n and start + offsets[released] <= now:
                lags[released] = now - (start + offsets[released])  # the loop's lateness, not a wait for a connection
                waiting.append(released)
                deadlines.append(released)
                released += 1
            while idle and now - idle[0].idle_since > IDLE_CLOSE_S:
                close(idle.popleft())
            while waiting:
                if records[waiting[0]] is not None:  # timed out before a connection was free
                    waiting.popleft()
                elif idle:
                    send(idle.popleft(), waiting.popleft())
                elif len(by_fd) < spec.max_connections:
                    conn = open_connection()
                    conn.request = waiting.popleft()  # sent once connected
                    owner[conn.request] = conn
                else:
                    break
            while deadlines and (records[deadlines[0]] is not None or now > start + offsets[deadlines[0]] + spec.timeout_s):
                i = deadlines.popleft()
                if records[i] is None:
                    if i in owner:
                        close(owner[i])  # its answer may still come: the connection is not reused
                    finish(i, "timeout", now)
            if released >= n and not deadlines:
                break  # every request answered, failed or timed out
            if released < n:
                timer.arm(start + offsets[released])
            wait = -1.0 if not deadlines else max(0.0, start + offsets[deadlines[0]] + spec.timeout_s - now)
            for fd, events in poller.poll(wait):
                if fd == timer.fd:
                    timer.clear()
                    continue
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                if not conn.connected:
                    error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    i = conn.request
                    if error:
                        close(conn)
                        if i >= 0 and records[i] is None:
                            finish(i, f"transport_{os.strerror(error).replace(' ', '')}", time.perf_counter())
                        continue
                    conn.connected = True
                    poller.modify(fd, select.EPOLLIN)
                    if i >= 0 and records[i] is None:
                        send(conn, i)
                    else:
                        conn.request, conn.idle_since = -1, time.perf_counter()
                        idle.append(conn)
                    continue
                try:
                    data = conn.sock.recv(1 << 16)
                except OSError as exc:
                    data, failure = b"", f"transport_{type(exc).__name__}"
                else:
                    failure = "transport_ServerDisconnected"
                received = time.perf_counter()
                if not data:  # closed by the server: an idle connection is simply dropped
                    i = conn.request
                    if conn in idle:
                        idle.remove(conn)
                    close(conn)
                    if i >= 0 and records[i] is None:
                        finish(i, failure, received)
                    continue
                conn.buf += data
                answer = conn.response()
                if answer is None or conn.request < 0:
                    continue
                status, keep_alive = answer
                i, conn.request = conn.request, -1
                finish(i, "ok" if status == 200 else f"http_{status}", received)
                if keep_alive:
                    conn.idle_since = received
                    idle.append(conn)
                else:
                    close(conn)
    finally:
        if gc_was_enabled:
            gc.enable()
        cpu_s = time.process_time() - cpu_started
        for conn in list(by_fd.values()):
            close(conn)
        poller.close()
        timer.close()
    return {"origin": start, "records": records, "send_lags": lags, "cpu_s": cpu_s}


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


def cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, steal, total) clock ticks of every core since boot, from /proc/stat's `cpu` line
    (None where there is none: not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(fields[:8])


def machine_load(before: tuple | None, after: tuple | None) -> dict:
    """What the whole machine did over a run, as shares of all cores' time: `busy` (every
    process, this client included) and `steal` (time the hypervisor ran other guests while ours
    wanted the core: a noisy host shows here, not in any process's CPU time)."""
    if before is None or after is None or after[2] <= before[2]:
        return {"busy_share": None, "steal_share": None}
    total = after[2] - before[2]
    return {"busy_share": (after[0] - before[0]) / total, "steal_share": (after[1] - before[1]) / total}


def run_load(
    url: str, spec: LoadSpec, pool: RequestPool | None, path: str = "/score", api_key: str | None = None
) -> tuple[dict, list[tuple]]:
    """One open-loop run; `pool=None` sends GETs (e.g. a no-op endpoint); `api_key` is sent
    with every request (never written into the report). Returns the report (percentiles,
    errors, the client's own cost) and one (offset_s, latency_s, kind) record per request."""
    check_loopback(url)
    rng = np.random.default_rng(spec.seed)
    offsets = schedule(spec, rng)
    bodies = request_bodies(spec, pool, len(offsets), rng) if pool is not None else [None]
    requests = [http_request(url, path, body, api_key) for body in bodies]
    before = cpu_ticks()
    fired = _fire(url, requests, offsets, spec)
    after = cpu_ticks()
    records, lags = fired["records"], fired["send_lags"]
    sent_lags = lags[~np.isnan(lags)] * 1000
    client = {  # what the generator itself cost: late sends add to every latency it reports
        "cpu_share": fired["cpu_s"] / max(spec.duration_s, 1e-9),  # of one core, over the schedule
        "send_lag_p50_ms": float(np.percentile(sent_lags, 50)) if sent_lags.size else None,
        "send_lag_p99_ms": float(np.percentile(sent_lags, 99)) if sent_lags.size else None,
        "cores": sorted(os.sched_getaffinity(0)),
    }
    # The schedule's origin on time.perf_counter's clock, to line records up with other events.
    report = {"spec": asdict(spec), "path": path, "schedule_origin_perf_counter": fired["origin"],
              **summarize(records, spec), "client": client, "machine": machine_load(before, after)}  # fmt: skip
    return report, records


def warm_up(url: str, pool: RequestPool | None, path: str = "/score", candidates: int = 100, rate: float = 50.0,
            seconds: float = 2.0, api_key: str | None = None) -> dict:
    """`seconds` at the rate about to be measured, then half as long (at most 1 s) for any
    backlog to drain; returns the warm-up's report."""
    report, _ = run_load(url, LoadSpec(rate=rate, duration_s=seconds, candidates=candidates, seed=99), pool, path, api_key)
    time.sleep(min(1.0, seconds / 2))
    return report


def require_success(report: dict, what: str) -> None:
    """RuntimeError naming the errors by kind unless a request of `report` got a 200: a load
    test in which none succeeded measured no scoring at all."""
    if report["ok"]:
        return
    hint = ": the server wants an API key; pass --api-key or set LOOPFM_API_KEY" if "http_401" in report["errors"] else ""
    raise RuntimeError(f"{what}: none of {report['sent']} requests succeeded (errors {report['errors']}){hint}")


def sweep(url: str, base: LoadSpec, pool: RequestPool, rates: list[float], p99_bound_ms: float, log=print,
          api_key: str | None = None) -> dict:  # fmt: skip
    """Raise the rate until p99 exceeds the bound (or errors appear); report the highest that held."""
    runs, best = [], None
    for rate in rates:
        report, _ = run_load(url, LoadSpec(**{**asdict(base), "rate": rate}), pool, api_key=api_key)
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
