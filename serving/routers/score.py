"""POST /score (the default model) and POST /models/{name}/score.

Scores inline on the event loop: the work is CPU-bound and sub-millisecond to a few
milliseconds, so a thread-pool hop would only add latency. The Redis read is async and every
request has a deadline: a slow Redis gives 504s, not a pile-up.

A plain request (well-formed JSON the schema accepts) is answered by the app's front layer
with the same `score_with` (serving/front.py), without FastAPI's routing and request handling;
these routes answer every other request, and give the OpenAPI schema."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import redis
from fastapi import APIRouter, HTTPException, Response
from fastapi.exceptions import RequestValidationError
from fastapi import Path as FastApiPath
from starlette.datastructures import State

from serving.dependencies import ScoringDep, hosting
from serving.responses import json_response
from serving.schemas import ScoreRequest, ScoreResponse, id_type_error
from serving.scorer import Scored, Scorer

MAX_NAME = 64  # the model name's max_length on /models/{name}/score

router = APIRouter()


async def score_with(scorer: Scorer, body: ScoreRequest, state: State) -> Response:
    """Score `body` with `scorer` within the request deadline: 422 over max_candidates or for
    ids of the other type than the model's entity types, 503 when Redis fails or its pool is
    exhausted (with Retry-After), 504 past the deadline. `state`: the app's (serving.dependencies.scoring)."""
    settings, metrics = state.settings, state.metrics
    if len(body.candidate_item_ids) > settings.max_candidates:
        raise HTTPException(422, f"at most {settings.max_candidates} candidates per request")
    wrong_type = id_type_error(body, scorer.entity_types)
    if wrong_type:  # answered like any other invalid request (serving.responses.invalid_request)
        raise RequestValidationError([wrong_type])
    hour = body.context.hour if body.context.hour is not None else time.gmtime().tm_hour
    try:  # asyncio.timeout, not wait_for: no extra task per request
        async with asyncio.timeout(settings.request_timeout_s):
            result = await scorer.score(state.redis, body.user_id, body.candidate_item_ids, hour)
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
    return scored_response(result, scorer.version)


def scored_response(result: Scored, version: str) -> Response:
    """The 200 body: built by hand, not validated again by FastAPI (ScoreResponse documents the shape)."""
    return json_response(
        {
            "scores": result.scores,
            "model_version": version,
            "user_known": result.user_known,
            "unknown_candidates": result.unknown_items,
            "feature_age_s": result.feature_age_s,
            "corrupt_values": result.corrupt_values,
        }
    )


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, state: ScoringDep) -> Response:
    """Score with the default model (the first one configured)."""
    return await score_with(state.models.scorer(), body, state)


@router.post("/models/{name}/score", response_model=ScoreResponse)
async def score_named(name: Annotated[str, FastApiPath(max_length=MAX_NAME)], body: ScoreRequest, state: ScoringDep) -> Response:
    """Score with the model hosted under `name` (GET /models lists them)."""
    return await score_with(hosting(state.models, name).scorer(name), body, state)
