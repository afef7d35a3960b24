"""FastAPI app: /score, /healthz, /readyz. Start with `loopfm serve` or
`uvicorn serving.app:create_app --factory` with LOOPFM_MODEL_DIR and REDIS_URL set."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import ORJSONResponse

from serving.schemas import ScoreRequest, ScoreResponse
from serving.scorer import Scorer
from serving.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.scorer = Scorer(settings.model_dir, settings.ort_threads)
        app.state.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s
        )
        yield
        app.state.redis.close()

    app = FastAPI(title="loopfm", default_response_class=ORJSONResponse, lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> ORJSONResponse:
        scorer = getattr(request.app.state, "scorer", None)
        try:
            redis_ok = bool(request.app.state.redis.ping())
        except (redis.RedisError, AttributeError):
            redis_ok = False
        ready = scorer is not None and redis_ok
        body = {"ready": ready, "model_loaded": scorer is not None, "redis": redis_ok}
        if scorer is not None:
            body["model_version"] = scorer.version
        return ORJSONResponse(body, status_code=200 if ready else 503)

    @app.post("/score", response_model=ScoreResponse)
    def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        if len(body.candidate_item_ids) > settings.max_candidates:
            raise HTTPException(422, f"at most {settings.max_candidates} candidates per request")
        hour = body.context.hour if body.context.hour is not None else time.gmtime().tm_hour
        scorer: Scorer = request.app.state.scorer
        try:
            result = scorer.score(request.app.state.redis, body.user_id, body.candidate_item_ids, hour)
        except redis.RedisError as exc:
            raise HTTPException(503, f"online store unavailable: {type(exc).__name__}") from exc
        return ScoreResponse(
            scores=result.scores,
            model_version=scorer.version,
            user_known=result.user_known,
            unknown_candidates=result.unknown_items,
            feature_age_s=result.feature_age_s,
        )

    return app
