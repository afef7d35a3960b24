"""Server settings, all from the environment (12-factor), in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    model_dir: Path  # holds model.onnx and model.json (written by `loopfm vm export`)
    redis_url: str = "redis://127.0.0.1:6379"
    max_candidates: int = 1000
    ort_threads: int = 1  # one ONNX Runtime thread per worker was steadier than two on 2 cores
    redis_timeout_s: float = 0.5
    item_cache_size: int = 100_000  # items; 0 disables the cache
    item_cache_ttl_s: float = 300.0

    @classmethod
    def from_env(cls) -> "Settings":
        if not os.environ.get("LOOPFM_MODEL_DIR"):
            raise RuntimeError("LOOPFM_MODEL_DIR is not set: point it at a folder with model.onnx and model.json")
        return cls(
            model_dir=Path(os.environ["LOOPFM_MODEL_DIR"]),
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            max_candidates=int(os.environ.get("LOOPFM_MAX_CANDIDATES", cls.max_candidates)),
            ort_threads=int(os.environ.get("LOOPFM_ORT_THREADS", cls.ort_threads)),
            redis_timeout_s=float(os.environ.get("LOOPFM_REDIS_TIMEOUT_S", cls.redis_timeout_s)),
            item_cache_size=int(os.environ.get("LOOPFM_ITEM_CACHE_SIZE", cls.item_cache_size)),
            item_cache_ttl_s=float(os.environ.get("LOOPFM_ITEM_CACHE_TTL_S", cls.item_cache_ttl_s)),
        )
