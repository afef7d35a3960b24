"""Server settings, all from the environment (12-factor), in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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
    redis_url: str = "redis://127.0.0.1:6379"
    max_candidates: int = 1000
    ort_threads: int = 1  # ONNX Runtime threads for requests below large_batch candidates
    ort_threads_large: int = 2  # ... and at or above it (docs/serving.md has the measurements)
    large_batch: int = 256
    redis_timeout_s: float = 0.5
    request_timeout_s: float = 1.0  # deadline for the feature read + scoring of one request
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
        return cls(
            models=models,
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            max_candidates=int(os.environ.get("LOOPFM_MAX_CANDIDATES", cls.max_candidates)),
            ort_threads=int(os.environ.get("LOOPFM_ORT_THREADS", cls.ort_threads)),
            ort_threads_large=int(os.environ.get("LOOPFM_ORT_THREADS_LARGE", cls.ort_threads_large)),
            large_batch=int(os.environ.get("LOOPFM_LARGE_BATCH", cls.large_batch)),
            redis_timeout_s=float(os.environ.get("LOOPFM_REDIS_TIMEOUT_S", cls.redis_timeout_s)),
            request_timeout_s=float(os.environ.get("LOOPFM_REQUEST_TIMEOUT_S", cls.request_timeout_s)),
            api_key=os.environ.get("LOOPFM_API_KEY") or None,
            admin_key=os.environ.get("LOOPFM_ADMIN_KEY") or None,
            max_body_bytes=int(os.environ.get("LOOPFM_MAX_BODY_BYTES", cls.max_body_bytes)),
            item_cache_size=int(os.environ.get("LOOPFM_ITEM_CACHE_SIZE", cls.item_cache_size)),
            item_cache_ttl_s=float(os.environ.get("LOOPFM_ITEM_CACHE_TTL_S", cls.item_cache_ttl_s)),
        )
