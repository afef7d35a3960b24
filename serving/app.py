"""FastAPI app: /score, /models/{name}/score, /models, /admin/models/{name}/reload, /healthz,
/readyz, /metrics. Start with `loopfm serve` or `uvicorn serving.app:create_app --factory`
with LOOPFM_MODEL_DIR (or LOOPFM_MODELS) and REDIS_URL set.

/score is `async def` and scores inline on the event loop: the work is CPU-bound and
sub-millisecond to a few milliseconds, so a thread-pool hop would only add latency; one
worker process per core gives parallelism. The Redis read is async (the loop stays free
while Redis answers) and every request has a deadline: a slow Redis gives 504s, not a pile-up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import orjson
import redis
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi import Path as FastApiPath
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loopfm.contract.names import ready_marker
from serving.guards import BodyLimits, admin_key_guard, api_key_guard
from serving.item_cache import ItemCache
from serving.metrics import Metrics, MetricsMiddleware
from serving.models import ModelRefused, ModelRegistry
from serving.redis_client import async_client
from serving.schemas import ScoreRequest, ScoreResponse
from serving.scorer import Scorer
from serving.settings import Settings


log = logging.getLogger("uvicorn.error")


def json_response(body: dict, status_code: int = 200) -> Response:
    """orjson straight to bytes: no second validation pass over a 1,000-score list."""
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


NON_FINITE = "it holds a number that is not finite (NaN, Infinity, or beyond a double's range such as 1e400)"


def _json_safe(value) -> tuple[object, bool]:
    """(`value` with what JSON or orjson cannot hold written as text, whether it held a
    non-finite float): NaN and Infinity are no JSON, orjson refuses integers beyond 64 bits."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value), True
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value), False
    if isinstance(value, (list, tuple)):
        pairs = [_json_safe(v) for v in value]
        return [v for v, _ in pairs], any(r for _, r in pairs)
    if isinstance(value, dict):
        pairs = {str(k): _json_safe(v) for k, v in value.items()}
        return {k: v for k, (v, _) in pairs.items()}, any(r for _, r in pairs.values())
    if value is None or isinstance(value, (str, int, float, bool)):
        return value, False
    return str(value), False


def validation_errors(exc: RequestValidationError) -> list[dict]:
    """Pydantic's errors as plain JSON: Python's json module reads NaN, Infinity and 1e400 (as
    inf) into the request, and FastAPI's own 422 body, echoing them, cannot be serialised (a
    500). Each error keeps where and what; a non-finite input is named as such."""
    out = []
    for error in exc.errors():
        given, non_finite = _json_safe(error.get("input"))
        message = f"{error.get('msg', 'invalid')}; {NON_FINITE}" if non_finite else error.get("msg", "invalid")
        out.append({"loc": list(error.get("loc", ())), "msg": message, "type": error.get("type"), "input": given})
    return out


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    def load(model_dir: Path) -> Scorer:  # every model (and every reload) gets a fresh item cache
        cache = ItemCache(settings.item_cache_size, settings.item_cache_ttl_s)
        return Scorer(model_dir, settings.ort_threads, cache, settings.large_batch, settings.ort_threads_large)

    def item_caches() -> list[ItemCache]:  # read at each scrape: reloads replace the caches
        models: ModelRegistry | None = getattr(app.state, "models", None)  # None before start-up
        return [] if models is None else [hosted.scorer.items for hosted in models.models.values()]

    metrics = Metrics(item_caches)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.models = ModelRegistry(settings.models, load)  # a refused model stops the start-up
        app.state.redis = async_client(settings.redis_url, settings.redis_timeout_s, settings.redis_max_connections)
        missing = (await feature_data(app.state.models, app.state.redis))[1]
        if missing:
            log.warning("not ready: %s", missing)
        yield
        await app.state.redis.aclose()

    app = FastAPI(title="loopfm", lifespan=lifespan)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, deadline_s=settings.request_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    authorized = [Depends(api_key_guard(settings.api_key))]
    admin = [Depends(admin_key_guard(settings.admin_key))]

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"detail": validation_errors(exc)}, status_code=422)

    def hosting(request: Request, name: str) -> ModelRegistry:
        """The registry, once it is known to host `name` (404 with the hosted names if not)."""
        models: ModelRegistry = request.app.state.models
        if name not in models.models:
            raise HTTPException(404, f"no model named {name!r}; hosted: {sorted(models.models)}")
        return models

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    async def feature_data(models: ModelRegistry | None, client) -> tuple[dict[str, bool], str | None]:
        """Whether the store holds each hosted model's Feast project (the marker `loopfm
        features apply` sets), and what is missing, if anything, in words (None: nothing)."""
        if models is None:
            return {}, "no model loaded"
        projects = sorted({hosted.scorer.meta["project"] for hosted in models.models.values()})
        try:
            found = {p: bool(await asyncio.wait_for(client.exists(ready_marker(p)), settings.redis_timeout_s)) for p in projects}
        except (redis.RedisError, TimeoutError) as exc:
            return {}, f"online store at {settings.redis_url} unreachable: {type(exc).__name__}"
        empty = [p for p, ok in found.items() if not ok]
        if empty:
            return found, (f"the online store holds no features of Feast project(s) {empty}: "
                           "run `loopfm features apply` (feast apply + materialize) against it")  # fmt: skip
        return found, None

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        models: ModelRegistry | None = getattr(request.app.state, "models", None)
        client = getattr(request.app.state, "redis", None)
        found, missing = await feature_data(models, client) if client is not None else ({}, "starting")
        ready = missing is None
        body = {"ready": ready, "model_loaded": models is not None, "redis": bool(found), "feature_data": found}
        if missing:
            body["missing"] = missing
        if models is not None:
            body["model_version"] = models.scorer().version
            body["models"] = {name: h.scorer.version for name, h in models.models.items()}
        return json_response(body, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=authorized)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models", dependencies=authorized)
    async def list_models(request: Request) -> Response:
        return json_response(request.app.state.models.describe())

    @app.post("/admin/models/{name}/reload", dependencies=admin)
    async def reload_model(name: str, request: Request) -> Response:
        models = hosting(request, name)
        try:
            old, new = await models.reload(name)
        except ModelRefused as exc:
            metrics.errors.labels("model_refused").inc()
            raise HTTPException(409, f"model refused, {models.scorer(name).version} keeps serving: {exc}") from None
        return json_response({"model": name, "previous_version": old, "model_version": new})

    async def score_with(scorer: Scorer, body: ScoreRequest, request: Request) -> Response:
        if len(body.candidate_item_ids) > settings.max_candidates:
            raise HTTPException(422, f"at most {settings.max_candidates} candidates per request")
        hour = body.context.hour if body.context.hour is not None else time.gmtime().tm_hour
        try:
            result = await asyncio.wait_for(
                scorer.score(request.app.state.redis, body.user_id, body.candidate_item_ids, hour),
                settings.request_timeout_s,
            )
        except redis.exceptions.MaxConnectionsError as exc:
            metrics.errors.labels("redis_pool_exhausted").inc()
            raise HTTPException(503, f"server busy: {exc} (LOOPFM_REDIS_MAX_CONNECTIONS); retry", headers={"Retry-After": "1"}) from None
        except redis.RedisError as exc:
            metrics.errors.labels(f"redis_{type(exc).__name__}").inc()
            raise HTTPException(503, f"online store unavailable: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            metrics.errors.labels("deadline").inc()
            raise HTTPException(504, f"no answer within the {settings.request_timeout_s} s request deadline") from exc
        metrics.observe(result, len(body.candidate_item_ids))
        # Built by hand (not validated again by FastAPI): ScoreResponse documents the shape.
        return json_response(
            {
                "scores": result.scores,
                "model_version": scorer.version,
                "user_known": result.user_known,
                "unknown_candidates": result.unknown_items,
                "feature_age_s": result.feature_age_s,
                "corrupt_values": result.corrupt_values,
            }
        )

    @app.post("/score", response_model=ScoreResponse, dependencies=authorized)
    async def score(body: ScoreRequest, request: Request) -> Response:
        """Score with the default model (the first one configured)."""
        return await score_with(request.app.state.models.scorer(), body, request)

    @app.post("/models/{name}/score", response_model=ScoreResponse, dependencies=authorized)
    async def score_named(name: Annotated[str, FastApiPath(max_length=64)], body: ScoreRequest, request: Request) -> Response:
        """Score with the model hosted under `name` (GET /models lists them)."""
        return await score_with(hosting(request, name).scorer(name), body, request)

    return app
