"""The load generator is open loop: a stalled server cannot hide its tail."""

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import orjson
import pytest

from loopfm.bench.loadtest import (LoadSpec, RequestPool, cpu_ticks, http_request, machine_load, request_body, run_load,
                                   schedule)

STALL_S = 0.3


class StallingHandler(BaseHTTPRequestHandler):
    """Answers instantly, except that the 20th request stalls the (single-threaded) server,
    as a GC pause or a blocked event loop would; /fail answers 503."""

    count = 0

    def do_GET(self):
        StallingHandler.count += 1
        if StallingHandler.count == 20:
            time.sleep(STALL_S)
        self.send_response(503 if self.path == "/fail" else 200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling_server():
    StallingHandler.count = 0
    server = HTTPServer(("127.0.0.1", 0), StallingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_constant_and_poisson_schedules_offer_the_requested_rate():
    rng = np.random.default_rng(0)
    constant = schedule(LoadSpec(rate=100, duration_s=3, arrival="constant"), rng)
    assert len(constant) == 300 and np.allclose(np.diff(constant), 0.01)
    counts = [len(schedule(LoadSpec(rate=200, duration_s=2), rng)) for _ in range(300)]
    assert abs(np.mean(counts) - 400) < 5  # unbiased: the count is Poisson(400), not capped at 400
    assert max(counts) > 400 and max(max(schedule(LoadSpec(rate=200, duration_s=2), rng)) for _ in range(5)) < 2


def test_latency_is_measured_from_the_scheduled_send_time(stalling_server):
    report, records = run_load(stalling_server, LoadSpec(rate=100, duration_s=1.5, arrival="constant"), None, "/x")
    assert report["errors"] == {} and report["sent"] == 150
    # Requests scheduled while the server stalled waited for it: their latency counts the
    # wait, so the tail shows the stall instead of hiding it (coordinated omission).
    stalled = [lat for _, lat, _ in records if lat > STALL_S / 2]
    assert len(stalled) >= 10
    assert report["p99_ms"] > STALL_S / 2 * 1000
    assert report["p50_ms"] < STALL_S / 2 * 1000


def test_requests_queued_in_the_client_count_their_wait_too():
    """One connection, a 20 ms server, 100 req/s offered: requests wait in the client for
    the connection. Timed from the actual send they would all look like 20 ms."""

    class Slow(StallingHandler):
        def do_GET(self):
            time.sleep(0.02)
            super().do_GET()

    server = HTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = LoadSpec(rate=100, duration_s=1.0, arrival="constant", max_connections=1)
        report, _ = run_load(f"http://127.0.0.1:{server.server_address[1]}", spec, None, "/x")
    finally:
        server.shutdown()
    assert report["p99_ms"] > 300  # the queue grows by ~10 ms per request over 100 requests


def test_timeouts_count_in_the_percentiles(stalling_server):
    spec = LoadSpec(rate=100, duration_s=0.5, arrival="constant", timeout_s=0.1)
    report, _ = run_load(stalling_server, spec, None, "/x")  # the 20th request stalls 300 ms
    assert report["errors"].get("timeout", 0) >= 1
    assert report["max_ms"] >= 100 and report["ok"] < report["sent"]


def test_errors_are_counted_by_kind_and_only_loopback_is_accepted(stalling_server):
    report, _ = run_load(stalling_server, LoadSpec(rate=50, duration_s=0.5, arrival="constant"), None, "/fail")
    assert report["errors"] == {"http_503": 25} and report["ok"] == 0
    pool = RequestPool(known_users=np.arange(3), cold_users=np.arange(4), items=np.arange(10))
    with pytest.raises(ValueError, match="loopback"):
        run_load("http://10.1.2.3:8000", LoadSpec(rate=1, duration_s=1), pool)


def test_requests_leave_on_schedule_while_none_is_answered():
    """Open loop: a server that reads requests and never answers still receives every one at
    its time; the client waits for no answer before sending the next."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[float] = []
    held = []

    def accept_and_read():
        listener.settimeout(3)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                held.append(conn)
                threading.Thread(target=read, args=(conn,), daemon=True).start()

    def read(conn):
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                received.extend(time.perf_counter() for _ in range(data.count(b"GET /x")))

    threading.Thread(target=accept_and_read, daemon=True).start()
    spec = LoadSpec(rate=100, duration_s=0.5, arrival="constant", timeout_s=0.3, connections=4)
    report, _ = run_load(f"http://127.0.0.1:{listener.getsockname()[1]}", spec, None, "/x")
    listener.close()
    for conn in held:
        conn.close()
    assert report["errors"] == {"timeout": 50} and report["sent"] == 50
    assert len(received) == 50  # 4 connections held by unanswered requests did not hold the rest back
    assert received[-1] - received[0] < 0.5 + 0.1  # sent over the schedule's 0.5 s, not after answers
    assert report["client"]["send_lag_p50_ms"] is not None and 0 <= report["client"]["cpu_share"]
    assert 0 <= report["machine"]["busy_share"] <= 1 and 0 <= report["machine"]["steal_share"] < 1  # an idle host reads 0


def test_machine_load_is_the_share_of_all_cores_time_busy_and_stolen_between_two_readings():
    assert machine_load((100, 10, 1000), (400, 60, 2000)) == {"busy_share": 0.3, "steal_share": 0.05}
    assert machine_load(None, (1, 1, 1)) == {"busy_share": None, "steal_share": None}
    busy, steal, total = cpu_ticks()
    assert 0 <= steal <= total and 0 < busy <= total


def test_request_bytes_are_whole_http_requests_encoded_before_the_clock_starts():
    body = request_body(7, [1, 2], 9)
    assert orjson.loads(body) == {"user_id": 7, "candidate_item_ids": [1, 2], "context": {"hour": 9}}
    post = http_request("http://127.0.0.1:8000", "/score", body)
    assert post.startswith(b"POST /score HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n")
    assert f"content-length: {len(body)}\r\n\r\n".encode() + body in post
    assert http_request("http://127.0.0.1:8000", "/healthz", None) == b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\r\n"
