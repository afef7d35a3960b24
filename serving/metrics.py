"""Prometheus metrics of the scoring server, served at /metrics.

One registry per app. With several uvicorn workers (LOOPFM_WORKERS) each worker keeps its
own counters: a scrape sees the worker that accepted its connection, named by
`loopfm_worker_info{worker="host:pid"}`, so a scraper that opens new connections until it
has seen every worker can add them up (loopfm/bench/serving.py does).

What every request records (latency, status, the /score timings, candidates, feature ages) is
kept by `LoopHistogram` / `LoopCounter`: plain counts that take no lock, exposed at a scrape
as prometheus_client's Histogram / Counter expose them (text and OpenMetrics formats).
prometheus_client's take a lock per bucket and per sum (1.7 µs an observation here); a score
request records five values plus one per user feature view.
The rare ones (errors by kind, corrupt values) stay prometheus_client's.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from bisect import bisect_left
from typing import Callable, Iterator, Sequence

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from serving.item_cache import ItemCache
from serving.reloads import worker_id

_MS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)
_AGE = (60, 600, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 90 * 86400, 365 * 86400)


class _Series:
    """One histogram series: counts per bucket (the last is +Inf), their sum, and its creation
    time (unix s, the `_created` sample)."""

    __slots__ = ("counts", "sum", "created")

    def __init__(self, n_buckets: int):
        self.counts, self.sum, self.created = [0] * n_buckets, 0.0, time.time()


class _LoopMetric:
    """A metric kept without a lock: every observation and every scrape of the server's
    metrics runs on its one event-loop thread (/metrics is an async route), so nothing
    updates it concurrently. Registered in `registry` as a collector. A series per tuple of
    label values lives as long as the process: the values come from bounded sets (path_label,
    status codes, a model's feature views)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        registry.register(self)

    def _check(self, labels: tuple) -> None:
        """Raises ValueError unless `labels` holds one text value per label name (checked once per
        series: a wrong one would otherwise break every later scrape)."""
        if len(labels) != len(self.labelnames) or not all(isinstance(v, str) for v in labels):
            raise ValueError(f"{self.name} takes one text value for each of {self.labelnames}, got {labels!r}")

    @staticmethod
    def _created() -> bool:
        """Whether `_created` samples are exposed (prometheus_client's PROMETHEUS_DISABLE_CREATED_SERIES
        and disable_created_metrics(), read as its own metrics read them)."""
        return prometheus_client.metrics._use_created


class LoopHistogram(_LoopMetric):
    """A Prometheus histogram observed without a lock (_LoopMetric); its samples are
    prometheus_client's Histogram's: buckets `le` >= the value, `_count`, `_sum`, `_created`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry):  # fmt: skip
        if list(buckets) != sorted(buckets):
            raise ValueError(f"{name}: buckets not in ascending order: {buckets}")
        self.bounds = (*map(float, buckets), math.inf)
        self._series: dict[tuple[str, ...], _Series] = {}
        if not labelnames:  # an unlabelled histogram is exposed from the start, as prometheus_client's
            self._series[()] = _Series(len(self.bounds))
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, value: float, *labels: str) -> None:
        """Count `value` in the series of `labels` (one per label name; a NaN adds to the sum only, as
        in prometheus_client). Raises ValueError for labels that do not fit."""
        series = self._series.get(labels)
        if series is None:
            self._check(labels)
            series = self._series[labels] = _Series(len(self.bounds))
        if value == value:
            series.counts[bisect_left(self.bounds, value)] += 1
        series.sum += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les, created = [floatToGoString(b) for b in self.bounds], self._created()
        for labels, series in self._series.items():
            family.add_metric(labels, list(zip(les, itertools.accumulate(series.counts))), series.sum)
            if created:
                family.add_sample(f"{self.name}_created", dict(zip(self.labelnames, labels)), series.created)
        yield family


class LoopCounter(_LoopMetric):
    """A labelled Prometheus counter incremented without a lock (_LoopMetric); its samples are
    prometheus_client's Counter's (`_total`, `_created`)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry):
        self._counts: dict[tuple[str, ...], list] = {}  # labels -> [count, created]
        super().__init__(name, documentation, labelnames, registry)

    def inc(self, *labels: str) -> None:
        """Add one to the series of `labels`. Raises ValueError for labels that do not fit."""
        count = self._counts.get(labels)
        if count is None:
            self._check(labels)
            count = self._counts[labels] = [0, time.time()]
        count[0] += 1

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family, created = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames), self._created()
        for labels, (count, since) in self._counts.items():
            family.add_metric(labels, count, created=since if created else None)
        yield family


class Metrics:
    """The app's metrics in one registry (`registry`, served by /metrics): what every request
    and every /score records, errors by kind, the item caches' gauges, the worker's id."""

    def __init__(self, item_caches: Callable[[], Sequence[ItemCache]]):
        self.registry = r = CollectorRegistry()
        self.request = LoopHistogram("loopfm_request_seconds", "HTTP request latency", ["path"], buckets=_MS, registry=r)
        self.feature_read = LoopHistogram(
            "loopfm_feature_read_seconds", "item cache + Redis round trip + decoding per /score", buckets=_MS, registry=r
        )
        self.model = LoopHistogram("loopfm_model_seconds", "tensorization + ONNX Runtime per /score", buckets=_MS, registry=r)
        self.candidates = LoopHistogram(
            "loopfm_candidates", "candidates per /score", buckets=(1, 10, 50, 100, 200, 500, 1000), registry=r
        )
        self.responses = LoopCounter("loopfm_responses_total", "HTTP responses by path and status", ["path", "status"], registry=r)
        self.errors = Counter("loopfm_errors_total", "failed /score requests by kind", ["kind"], registry=r)
        self.corrupt_values = Counter(
            "loopfm_corrupt_values_total", "stored values that could not be decoded (read as missing)", registry=r
        )
        self.feature_age = LoopHistogram(
            "loopfm_feature_age_seconds", "age of the user's features per view", ["view"], buckets=_AGE, registry=r
        )
        Gauge("loopfm_item_cache_hit_ratio", "item cache hits / lookups since the models were loaded",
              registry=r).set_function(lambda: _hit_ratio(item_caches()))  # fmt: skip
        Gauge("loopfm_item_cache_items", "items in the caches", registry=r).set_function(
            lambda: sum(len(c) for c in item_caches())
        )
        Info("loopfm_worker", "the worker process whose counters these are", registry=r).info({"worker": worker_id()})

    def record_request(self, path: str, status: int, seconds: float) -> None:
        """One HTTP request's latency and status, under its path's label (path_label)."""
        label = path_label(path)
        self.request.observe(seconds, label)
        self.responses.inc(label, str(status))

    def observe(self, result, candidates: int) -> None:
        """Record one scored request (a serving.scorer.Scored)."""
        self.feature_read.observe(result.read_s)
        self.model.observe(result.model_s)
        self.candidates.observe(candidates)
        if result.corrupt_values:
            self.corrupt_values.inc(result.corrupt_values)
        for view, age in result.feature_age_s.items():
            if age is not None:
                self.feature_age.observe(age, view)


def _hit_ratio(caches: Sequence[ItemCache]) -> float:
    hits, misses = sum(c.hits for c in caches), sum(c.misses for c in caches)
    return hits / (hits + misses) if hits + misses else 0.0


_KNOWN_PATHS = ("/score", "/healthz", "/readyz", "/metrics", "/models")
_TEMPLATES = ((re.compile(r"/models/[^/]+/score"), "/models/{name}/score"),
              (re.compile(r"/admin/models/[^/]+/reload"), "/admin/models/{name}/reload"))  # fmt: skip


def path_label(path: str) -> str:
    """A bounded label set: known paths, route templates, else `other`."""
    if path in _KNOWN_PATHS:
        return path
    return next((label for pattern, label in _TEMPLATES if pattern.fullmatch(path)), "other")
