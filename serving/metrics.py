"""Prometheus metrics of the scoring server, served at /metrics.

One registry per app. With several uvicorn workers (LOOPFM_WORKERS) each worker keeps its
own counters: a scrape sees the worker that accepted its connection, named by
`loopfm_worker_info{worker="host:pid"}`, so a scraper that opens new connections until it
has seen every worker can add them up (loopfm/bench/serving.py does).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from serving.item_cache import ItemCache
from serving.reloads import worker_id

_MS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)
_AGE = (60, 600, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 90 * 86400, 365 * 86400)


class Metrics:
    def __init__(self, item_caches: Callable[[], Sequence[ItemCache]]):
        self.registry = r = CollectorRegistry()
        self.request = Histogram("loopfm_request_seconds", "HTTP request latency", ["path"], buckets=_MS, registry=r)
        self.feature_read = Histogram(
            "loopfm_feature_read_seconds", "item cache + Redis round trip + decoding per /score", buckets=_MS, registry=r
        )
        self.model = Histogram("loopfm_model_seconds", "tensorization + ONNX Runtime per /score", buckets=_MS, registry=r)
        self.candidates = Histogram(
            "loopfm_candidates", "candidates per /score", buckets=(1, 10, 50, 100, 200, 500, 1000), registry=r
        )
        self.responses = Counter("loopfm_responses_total", "HTTP responses by path and status", ["path", "status"], registry=r)
        self.errors = Counter("loopfm_errors_total", "failed /score requests by kind", ["kind"], registry=r)
        self.corrupt_values = Counter(
            "loopfm_corrupt_values_total", "stored values that could not be decoded (read as missing)", registry=r
        )
        self.feature_age = Histogram(
            "loopfm_feature_age_seconds", "age of the user's features per view", ["view"], buckets=_AGE, registry=r
        )
        Gauge("loopfm_item_cache_hit_ratio", "item cache hits / lookups since the models were loaded",
              registry=r).set_function(lambda: _hit_ratio(item_caches()))  # fmt: skip
        Gauge("loopfm_item_cache_items", "items in the caches", registry=r).set_function(
            lambda: sum(len(c) for c in item_caches())
        )
        Info("loopfm_worker", "the worker process whose counters these are", registry=r).info({"worker": worker_id()})
        # Labelled series by (metric, label values), all bounded sets (path_label, statuses, a
        # model's views): prometheus_client's labels() checks and locks on every call.
        self._series: dict[tuple, Any] = {}

    def _labelled(self, metric: Histogram | Counter, *values: str):
        series = self._series.get((metric, values))
        if series is None:
            series = self._series[(metric, values)] = metric.labels(*values)
        return series

    def record_request(self, path: str, status: int, seconds: float) -> None:
        """One HTTP request's latency and status, under its path's label (path_label)."""
        label = path_label(path)
        self._labelled(self.request, label).observe(seconds)
        self._labelled(self.responses, label, str(status)).inc()

    def observe(self, result, candidates: int) -> None:
        """Record one scored request (a serving.scorer.Scored)."""
        self.feature_read.observe(result.read_s)
        self.model.observe(result.model_s)
        self.candidates.observe(candidates)
        if result.corrupt_values:
            self.corrupt_values.inc(result.corrupt_values)
        for view, age in result.feature_age_s.items():
            if age is not None:
                self._labelled(self.feature_age, view).observe(age)


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
