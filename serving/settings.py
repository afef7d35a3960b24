"""Server settings, all from the environment (12-factor), in one place."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from serving.redis_client import MAX_CONNECTIONS
from serving.schemas import MAX_CANDIDATES

MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_models(spec: str) -> dict[str, Path]:
    """`LOOPFM_MODELS="shop=/models/shop,video=/models/video"` -> {name: folder}, in order."""
    models: dict[str, Path] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, folder = entry.partition("=")
        if not sep or not MODEL_NAME.fullmatch(name) or not folder or name in models:
            raise ValueError(f"LOOPFM_MODELS entry {entry!r}: expected NAME=FOLDER with a new NAME of letters, digits, _ or -")
        models[name] = Path(folder)
    return models


@dataclass(frozen=True)
class Settings:
    models: dict[str, Path]  # name -> folder with model.onnx + model.json (`loopfm vm export`); first = default
    redis_url: str = "redis://127.0.0.1:6379"  # or redis+cluster://host:port (serving/redis_client.py)
    max_candidates: int = 1000
    ort_threads: int = 1  # ONNX Runtime threads for requests below large_batch candidates
    ort_threads_large: int = 2  # ... and at or above it; at most the cores each worker has (docs/serving.md)
    workers: int = 1  # worker processes sharing the port, one per core (uvicorn --workers; loopfm serve)
    large_batch: int = 256
    redis_timeout_s: float = 0.5  # per Redis call, and the longest wait for a free pooled connection
    redis_max_connections: int = MAX_CONNECTIONS  # a request finding all busy for redis_timeout_s gets 503
    request_timeout_s: float = 1.0  # deadline for one request: body read (408), feature read + scoring (504)
    api_key: str | None = None  # when set, /score and /metrics need it (Bearer or X-API-Key)
    admin_key: str | None = None  # /admin/* is disabled unless set; never the same as api_key
    max_body_bytes: int = 64 * 1024  # 1,000 ids of 19 digits fit in about 20 KB
    item_cache_size: int = 100_000  # items; 0 disables the cache
    item_cache_ttl_s: float = 300.0

    @classmethod
    def from_env(cls) -> "Settings":
        if os.environ.get("LOOPFM_MODELS"):
            models = parse_models(os.environ["LOOPFM_MODELS"])
        elif os.environ.get("LOOPFM_MODEL_DIR"):
            models = {"default": Path(os.environ["LOOPFM_MODEL_DIR"])}
        else:
            raise RuntimeError("set LOOPFM_MODEL_DIR (one model) or LOOPFM_MODELS=name=folder,... (several)")
        workers = _number("LOOPFM_WORKERS", int, cls.workers, 1)
        return cls(
            models=models,
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            max_candidates=_number("LOOPFM_MAX_CANDIDATES", int, cls.max_candidates, 1, MAX_CANDIDATES),
            ort_threads=_number("LOOPFM_ORT_THREADS", int, cls.ort_threads, 1),
            ort_threads_large=_number("LOOPFM_ORT_THREADS_LARGE", int, min(cls.ort_threads_large, cores_per_worker(workers)), 1),
            workers=workers,
            large_batch=_number("LOOPFM_LARGE_BATCH", int, cls.large_batch, 1),
            redis_timeout_s=_number("LOOPFM_REDIS_TIMEOUT_S", float, cls.redis_timeout_s, 0.001),
            redis_max_connections=_number("LOOPFM_REDIS_MAX_CONNECTIONS", int, cls.redis_max_connections, 1),
            request_timeout_s=_number("LOOPFM_REQUEST_TIMEOUT_S", float, cls.request_timeout_s, 0.001),
            api_key=os.environ.get("LOOPFM_API_KEY") or None,
            admin_key=os.environ.get("LOOPFM_ADMIN_KEY") or None,
            max_body_bytes=_number("LOOPFM_MAX_BODY_BYTES", int, cls.max_body_bytes, 256),
            item_cache_size=_number("LOOPFM_ITEM_CACHE_SIZE", int, cls.item_cache_size, 0),
            item_cache_ttl_s=_number("LOOPFM_ITEM_CACHE_TTL_S", float, cls.item_cache_ttl_s, 0.0),
        )


def cores_per_worker(workers: int) -> int:
    """Cores this process may run on (`taskset`, cgroup cpusets) shared by `workers`, at least 1.

    A second ONNX Runtime thread on a worker pinned to one core, or on a core another
    worker owns, only adds context switches (docs/serving.md, ONNX Runtime row).
    """
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _number(name: str, kind: type, default, low, high=None):
    """An environment number, refused at start-up with the variable's name if malformed."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise RuntimeError(f"{name}={raw!r}: not a finite number")
    if value < low or (high is not None and value > high):
        raise RuntimeError(f"{name}={raw!r}: must be in [{low}, {high if high is not None else 'inf'}]")
    return value
