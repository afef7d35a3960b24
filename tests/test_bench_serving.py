"""`loopfm bench serving`: the report's schema from a short real run (real Valkey, real
uvicorn with 1 and 2 workers, pinned cores), and the parsers it reads other tools with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loopfm.bench.serving import _histogram_summary, configurations, run_serving_bench, sum_histograms
from loopfm.bench.serving_report import markdown, plot_summary
from loopfm.bench.wrk import parse_wrk

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8000
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  502.35us  19.13ms   95.12%
  Latency Distribution
     50%  990.00us
     75%    1.15ms
     90%    1.34ms
     99%    3.91ms
  9245 requests in 10.00s, 7.12MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:    924.42
Transfer/sec:    729.19KB
"""


def test_wrk_reports_are_read_in_milliseconds_with_every_error_counted():
    assert parse_wrk(WRK_OUTPUT) == {"p50_ms": pytest.approx(0.99), "p90_ms": 1.34, "p99_ms": 3.91, "rate": 924.42, "errors": 6}


def test_the_server_histogram_of_one_run_is_the_difference_of_two_scrapes():
    before = {0.001: 10.0, 0.002: 10.0, 0.005: 10.0, float("inf"): 10.0}
    after = {0.001: 60.0, 0.002: 108.0, 0.005: 110.0, float("inf"): 110.0}  # this run: 50, 48, 2 requests
    summary = _histogram_summary(after, before)
    assert summary["requests"] == 100 and summary["share_le_ms"] == {"1": 0.5, "2": 0.98, "5": 1.0}
    assert summary["p50_le_ms"] == 1.0 and summary["p99_le_ms"] == 5.0


def test_server_and_client_get_separate_cores_or_the_bench_refuses():
    setups = configurations([0, 1, 2, 3])
    one, two = setups["1_worker"], setups["2_workers"]
    assert one["workers"] == 1 and one["cores"] == {"server": [0], "store": [0], "client": [1]}
    assert two["workers"] == 2 and two["cores"]["server"] == [0, 1] and two["cores"]["client"] == [1]
    with pytest.raises(ValueError, match="separate cores"):
        configurations([3])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the bench pins server and client to two cores")
def test_a_short_bench_writes_the_issue_schema_with_its_floor_and_plots(trained_run: Path, tmp_path: Path):
    summary = run_serving_bench(trained_run, "loopfm_kd", tmp_path, duration_s=0.6, log=lambda *_: None)
    plot_summary(summary, tmp_path / "benchmarks" / "serving.png")  # as `loopfm bench serving` does
    written = json.loads((tmp_path / "benchmarks.json").read_text())
    assert written == json.loads(json.dumps(summary))
    point_keys = {"p50_ms", "p99_ms", "p999_ms", "achieved_rate", "errors"}
    cores = sorted(os.sched_getaffinity(0))[:2]
    for name, workers in (("1_worker", 1), ("2_workers", 2)):
        config = written["configurations"][name]
        assert config["workers"] == workers and set(config["cores"]) == {"server", "store", "client"}
        assert {c: set(rates) for c, rates in config["open_loop"].items()} == {"100": {"200", "500"}, "1000": {"50"}}
        for rates in config["open_loop"].values():
            for point in rates.values():
                assert point_keys <= set(point)
                assert point["client"]["cores"] == [cores[1]]  # the generator ran where the report says
                assert point["server"]["requests"] >= point["sent"] * 0.9  # the server's own histogram, every worker
        assert set(config["noop"]) == {"50", "200", "500"} and all({"p50_ms", "p99_ms"} <= set(v) for v in config["noop"].values())
        assert set(config["capacity_p99_5ms"]) == {"100"}
        assert set(config["wrk_closed_loop"]) == {"100", "1000"}
    four_paths = written["configurations"]["1_worker"]["feast_sdk"]
    assert set(four_paths["loopfm"]) == set(four_paths["feast_sdk"]) == {"10", "100", "1000"}
    assert (tmp_path / "benchmarks" / "serving.png").stat().st_size > 0
    assert (tmp_path / "benchmarks" / "1_worker" / "score_100_200" / "loadtest.png").stat().st_size > 0
    assert "## 2 workers" in markdown(written) and "/healthz (floor)" in markdown(written)
    decomposition = written["configurations"]["1_worker"]["decomposition"]
    for c in ("10", "100", "1000"):  # the bare app under the same uvicorn, answered (CPU in clock ticks: may read 0 this short)
        assert decomposition[c]["bare"]["p50_us"] > 0 and decomposition[c]["bare"]["n"] == decomposition[c]["score"]["n"]
        assert decomposition[c]["cpu"]["bare_cpu_us"] >= 0
    assert "bare ASGI app under the same uvicorn" in markdown(written)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the bench pins server and client to two cores")
def test_with_an_api_key_the_bench_servers_require_it_and_every_request_and_scrape_carries_it(
    trained_run: Path, redis_url: str, tmp_path: Path, monkeypatch
):
    """The environment's LOOPFM_API_KEY (which the servers would inherit) is not the bench's:
    a server started with it, or a request without the bench's key, gets 401s and stops the bench."""
    import loopfm.pipeline.services
    from loopfm.bench.serving import _configuration, request_pool

    monkeypatch.setenv("LOOPFM_API_KEY", "the-environments-key")
    started_with = []
    start = loopfm.pipeline.services.start_server
    monkeypatch.setattr(loopfm.pipeline.services, "start_server", lambda *a, **kw: started_with.append(kw["env"]) or start(*a, **kw))
    setup = configurations(sorted(os.sched_getaffinity(0)))["2_workers"]
    model_dir = trained_run / "vm" / "loopfm_kd" / "onnx"
    result = _configuration("2_workers", setup, model_dir, redis_url, trained_run, request_pool(trained_run), tmp_path, 0.3,
                            lambda *_: None, api_key="the-benchs-key")  # fmt: skip
    assert started_with == [{"LOOPFM_API_KEY": "the-benchs-key"}]
    points = [p for rates in result["open_loop"].values() for p in rates.values()] + result["capacity_runs"]
    assert points and all(p["sent"] > 0 and "http_401" not in p["errors"] for p in points), points
    # the server counted what it answered (a request the client gave up on under load may be unanswered)
    answered = [(p["sent"] - sum(p["errors"].values()), p["server"]["requests"]) for rates in result["open_loop"].values() for p in rates.values()]
    assert all(ok > 0 and counted >= ok * 0.9 for ok, counted in answered), answered
    assert result["item_cache_hit_ratio"] is not None  # /metrics scraped with the key
    assert all(r.get("skipped") or r["errors"] == 0 for r in result["wrk_closed_loop"].values())


def test_workers_histograms_sum_over_every_bound_even_when_the_first_worker_has_served_none():
    """Two workers behind one port: the one a scrape reaches first may not have served /score
    yet (it then has no buckets); the sum still counts the other's requests."""
    idle, busy = {}, {0.001: 3.0, 0.005: 9.0, float("inf"): 10.0}
    assert sum_histograms([idle, busy]) == busy
    assert sum_histograms([busy, {0.001: 1.0, 0.005: 1.0, float("inf"): 2.0}]) == {0.001: 4.0, 0.005: 10.0, float("inf"): 12.0}
    assert _histogram_summary(sum_histograms([idle, busy]), sum_histograms([idle, idle]))["requests"] == 10.0
