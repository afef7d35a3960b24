"""The load generator is open loop: a stalled server cannot hide its tail."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from loopfm.loadtest import LoadSpec, RequestPool, run_load, schedule

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
    poisson = schedule(LoadSpec(rate=1000, duration_s=5), rng)
    assert abs(len(poisson) / 5 - 1000) < 60 and poisson.max() < 5


def test_latency_is_measured_from_the_scheduled_send_time(stalling_server):
    report, records = run_load(stalling_server, LoadSpec(rate=100, duration_s=1.5, arrival="constant"), None, "/x")
    assert report["errors"] == {} and report["sent"] == 150
    # Requests scheduled while the server stalled waited for it: their latency counts the
    # wait, so the tail shows the stall instead of hiding it (coordinated omission).
    stalled = [lat for _, lat, _ in records if lat > STALL_S / 2]
    assert len(stalled) >= 10
    assert report["p99_ms"] > STALL_S / 2 * 1000
    assert report["p50_ms"] < STALL_S / 2 * 1000


def test_errors_are_counted_by_kind_and_only_loopback_is_accepted(stalling_server):
    report, _ = run_load(stalling_server, LoadSpec(rate=50, duration_s=0.5, arrival="constant"), None, "/fail")
    assert report["errors"] == {"http_503": 25} and report["ok"] == 0
    pool = RequestPool(known_users=np.arange(3), all_users=3, items=np.arange(10))
    with pytest.raises(ValueError, match="loopback"):
        run_load("http://10.1.2.3:8000", LoadSpec(rate=1, duration_s=1), pool)
