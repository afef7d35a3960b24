"""The server's Prometheus metrics (serving/metrics.py): the lock-free histogram and counter
every request records into expose what prometheus_client's own would for the same
observations, byte for byte in both exposition formats, so a dashboard cannot tell them apart. End to end
through /metrics: tests/test_serving.py."""

import math
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, enable_created_metrics
from prometheus_client import exposition
from prometheus_client.openmetrics import exposition as om_exposition

from serving.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 1)
# On a bound (counted in its bucket, le), beyond the last (+Inf), zero, negative, NaN (the sum only).
OBSERVED = [(0.0005, "/score"), (0.001, "/score"), (0.0011, "/score"), (0.01, "/healthz"), (3.5, "/score"),
            (0.0, "/healthz"), (-1.0, "/score"), (math.nan, "/healthz")]  # fmt: skip


def _registries() -> tuple[CollectorRegistry, CollectorRegistry, list]:
    """(ours, prometheus_client's, a function per observation that records it in both)."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    latency = LoopHistogram("t_seconds", "latency", ["path"], buckets=BUCKETS, registry=ours)
    unlabelled = LoopHistogram("t_candidates", "candidates", buckets=BUCKETS, registry=ours)
    responses = LoopCounter("t_responses_total", "responses", ["path", "status"], registry=ours)
    their_latency = Histogram("t_seconds", "latency", ["path"], buckets=BUCKETS, registry=theirs)
    their_unlabelled = Histogram("t_candidates", "candidates", buckets=BUCKETS, registry=theirs)
    their_responses = Counter("t_responses_total", "responses", ["path", "status"], registry=theirs)

    def record(value: float, path: str, status: str = "200") -> None:
        latency.observe(value, path)
        their_latency.labels(path).observe(value)
        unlabelled.observe(value * 1000)
        their_unlabelled.observe(value * 1000)
        responses.inc(path, status)
        their_responses.labels(path, status).inc()

    return ours, theirs, record


def _exposed(registry: CollectorRegistry, openmetrics: bool) -> list[str]:
    """The registry's exposition in the text or the OpenMetrics format, line by line, each
    `_created` sample's value (a clock reading) cut off."""
    text = (om_exposition if openmetrics else exposition).generate_latest(registry).decode()
    return [line.rsplit(" ", 1)[0] if re.match(r"\w+_created[{ ]", line) else line for line in text.splitlines()]


@pytest.mark.parametrize("openmetrics_format", [False, True], ids=["text", "openmetrics"])
def test_lock_free_histograms_and_counters_expose_what_prometheus_client_would(openmetrics_format):
    ours, theirs, record = _registries()
    assert _exposed(ours, openmetrics_format) == _exposed(theirs, openmetrics_format)  # unlabelled: exposed at once
    for value, path in OBSERVED:
        record(value, path)
    record(0.002, "/score", "422")
    assert _exposed(ours, openmetrics_format) == _exposed(theirs, openmetrics_format)
    assert ours.get_sample_value("t_seconds_bucket", {"path": "/score", "le": "0.001"}) == 3
    assert ours.get_sample_value("t_responses_total", {"path": "/score", "status": "200"}) == 5


def test_created_samples_follow_prometheus_clients_switch():
    disable_created_metrics()
    try:
        ours, theirs, record = _registries()
        record(0.002, "/score")
        assert _exposed(ours, False) == _exposed(theirs, False)
        assert "_created" not in "".join(_exposed(ours, False))
    finally:
        enable_created_metrics()


def test_labels_that_do_not_fit_and_unsorted_buckets_are_refused_when_recorded():
    registry = CollectorRegistry()
    latency = LoopHistogram("t_seconds", "latency", ["path"], buckets=BUCKETS, registry=registry)
    responses = LoopCounter("t_responses_total", "responses", ["path", "status"], registry=registry)
    for wrong in [(), ("/score", "extra")]:
        with pytest.raises(ValueError, match="one text value for each of"):
            latency.observe(0.1, *wrong)
    with pytest.raises(ValueError, match="one text value for each of"):
        responses.inc("/score", 200)
    with pytest.raises(ValueError, match="not in ascending order"):
        LoopHistogram("t_other", "other", buckets=(5, 1), registry=registry)
    assert "t_seconds_bucket" not in exposition.generate_latest(registry).decode()  # the scrape still works


def test_a_name_taken_twice_in_one_registry_is_refused():
    registry = CollectorRegistry()
    LoopHistogram("t_seconds", "latency", buckets=BUCKETS, registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("t_seconds", "latency again", buckets=BUCKETS, registry=registry)
