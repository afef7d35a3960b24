"""The server's Prometheus metrics (serving/metrics.py): the lock-free histogram and counter
every request records into expose what prometheus_client's own would for the same
observations, so a dashboard cannot tell them apart. End to end through /metrics:
tests/test_serving.py."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 1)
OBSERVED = [(0.0005, "/score"), (0.001, "/score"), (0.0011, "/score"), (0.01, "/healthz"), (3.5, "/score"), (0.0, "/healthz")]


def _samples(registry: CollectorRegistry) -> list[tuple]:
    """Every exposed sample as (name, labels, value); a `_created` sample's value (a clock
    reading) as None."""
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return sorted((s.name, tuple(sorted(s.labels.items())), None if s.name.endswith("_created") else s.value)
                  for family in families for s in family.samples)  # fmt: skip


def test_lock_free_histograms_and_counters_expose_what_prometheus_client_would():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    latency = LoopHistogram("t_seconds", "latency", ["path"], buckets=BUCKETS, registry=ours)
    unlabelled = LoopHistogram("t_candidates", "candidates", buckets=BUCKETS, registry=ours)
    responses = LoopCounter("t_responses_total", "responses", ["path", "status"], registry=ours)
    their_latency = Histogram("t_seconds", "latency", ["path"], buckets=BUCKETS, registry=theirs)
    their_unlabelled = Histogram("t_candidates", "candidates", buckets=BUCKETS, registry=theirs)
    their_responses = Counter("t_responses_total", "responses", ["path", "status"], registry=theirs)
    assert _samples(ours) == _samples(theirs)  # an unlabelled histogram is exposed before its first value
    for value, path in OBSERVED:  # values on a bound count in its bucket (le), beyond the last in +Inf
        latency.observe(value, path)
        their_latency.labels(path).observe(value)
        unlabelled.observe(value * 1000)
        their_unlabelled.observe(value * 1000)
        responses.inc(path, "200")
        their_responses.labels(path, "200").inc()
    responses.inc("/score", "422")
    their_responses.labels("/score", "422").inc()
    assert _samples(ours) == _samples(theirs)
    assert ours.get_sample_value("t_seconds_bucket", {"path": "/score", "le": "0.001"}) == 2
    assert ours.get_sample_value("t_responses_total", {"path": "/score", "status": "200"}) == 4


def test_a_name_taken_twice_in_one_registry_is_refused():
    registry = CollectorRegistry()
    LoopHistogram("t_seconds", "latency", buckets=BUCKETS, registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("t_seconds", "latency again", buckets=BUCKETS, registry=registry)
