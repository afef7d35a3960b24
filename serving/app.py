"""FastAPI app: /score, /models/{name}/score, /models, /admin/models/{name}/reload, /healthz,
/readyz, /metrics. Start with `loopfm serve` or `uvicorn serving.app:create_app --factory`
with LOOPFM_MODEL_DIR (or LOOPFM_MODELS) and REDIS_URL set.

The routes live in serving/routers/ (probes, admin, score) and take the settings, the model
registry, the Redis client and the metrics through `Depends` (serving/dependencies.py); this
module builds those once per app, on `app.state`, and adds the one middleware of its own
(serving/front.py: metrics, body limits, and plain score requests answered without FastAPI's
routing). /score scores inline on the event loop; one worker process per core gives
parallelism (LOOPFM_WORKERS; each worker has its own models, item caches and metrics, and a
model reload reaches every worker through serving/reloads.py).
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from serving.front import FrontLayer
from serving.item_cache import ItemCache
from serving.metrics import Metrics
from serving.models import ModelRegistry
from serving.redis_client import async_client
from serving.reloads import ReloadBroadcast
from serving.responses import invalid_request
from serving.routers import admin, probes, score
from serving.scorer import Scorer
from serving.settings import Settings

log = logging.getLogger("uvicorn.error")
# FastAPI's native OpenTelemetry off: the server's metrics are Prometheus (/metrics), and with
# it on FastAPI looks up three global OTel providers on every request.
NO_OTEL = {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment); models load and Redis connects
    at start-up, and a model that does not fit stops it."""
    settings = settings or Settings.from_env()

    def load(model_dir: Path) -> Scorer:  # every model (and every reload) gets a fresh item cache
        cache = ItemCache(settings.item_cache_size, settings.item_cache_ttl_s)
        return Scorer(model_dir, settings.ort_threads, cache, settings.large_batch, settings.ort_threads_large)

    def item_caches() -> list[ItemCache]:  # read at each scrape: reloads replace the caches
        models: ModelRegistry | None = app.state.models  # None before start-up
        return [] if models is None else [hosted.scorer.items for hosted in models.models.values()]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.models = ModelRegistry(settings.models, load)  # a refused model stops the start-up
        app.state.redis = async_client(settings.redis_url, settings.redis_timeout_s, settings.redis_max_connections)
        refused = app.state.metrics.errors.labels("model_refused")
        app.state.reloads = ReloadBroadcast(settings.redis_url, settings.redis_timeout_s, app.state.models,
                                            on_refused=lambda name, reason: refused.inc())  # fmt: skip
        await app.state.reloads.start()
        missing = (await probes.feature_data(app.state.models, app.state.redis, settings))[1]
        if missing:
            log.warning("not ready: %s", missing)
        # What start-up built (modules, models, Feast layout) lives as long as the process: moved
        # out of the collector's generations, a full collection no longer walks it (docs/serving.md).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()  # collectable again once this app stops (a test process starts many)
        await app.state.reloads.stop()
        await app.state.redis.aclose()

    app = FastAPI(title="loopfm", lifespan=lifespan, telemetry=NO_OTEL)
    app.state.settings, app.state.metrics = settings, Metrics(item_caches)
    app.state.models = app.state.redis = app.state.reloads = None  # until start-up
    app.add_middleware(FrontLayer, metrics=app.state.metrics, max_bytes=settings.max_body_bytes,
                       deadline_s=settings.request_timeout_s)  # fmt: skip
    app.add_exception_handler(RequestValidationError, invalid_request)
    for router in (score.router, probes.router, admin.router):  # score first: the router tries routes in order
        app.include_router(router)
    return app
