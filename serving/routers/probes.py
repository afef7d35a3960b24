"""Probes: liveness (/healthz), readiness (/readyz) and Prometheus metrics (/metrics)."""

from __future__ import annotations

import asyncio

import redis
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loopfm.contract.names import ready_marker
from serving.dependencies import MetricsDep, api_key
from serving.models import ModelRegistry
from serving.redis_client import AsyncClient
from serving.reloads import worker_id
from serving.responses import json_response
from serving.settings import Settings

router = APIRouter()


async def feature_data(models: ModelRegistry | None, client: AsyncClient, settings: Settings) -> tuple[dict[str, bool], str | None]:
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


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    # Reads app.state itself, not through Depends: it answers (503) before start-up has set them.
    state = request.app.state
    models, client = state.models, state.redis
    found, missing = await feature_data(models, client, state.settings) if client is not None else ({}, "starting")
    ready = missing is None
    body = {"ready": ready, "model_loaded": models is not None, "redis": bool(found), "feature_data": found,
            "worker": worker_id()}  # fmt: skip
    if missing:
        body["missing"] = missing
    if models is not None:
        body["model_version"] = models.scorer().version
        body["models"] = {name: h.scorer.version for name, h in models.models.items()}
    return json_response(body, status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[Depends(api_key)])
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
