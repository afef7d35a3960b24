"""POST /score (the default model) and POST /models/{name}/score.

Scores inline on the event loop: the work is CPU-bound and sub-millisecond to a few
milliseconds, so a thread-pool hop would only add latency. The Redis read is async and every
request has a deadline: a slow Redis gives 504s, not a pile-up.

A well-formed request takes a short way to the endpoint (`ScoreRoute`): FastAPI's general
request handling (content-type parsing through `email.message`, dependency solving, per-route
telemetry hooks) is a large share of the server's CPU per /score (docs/serving.md, "Where the
server's CPU per /score goes over HTTP"). Every other request, and any error the short way
cannot reproduce exactly, goes FastAPI's way, so error bodies and their order are FastAPI's."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Awaitable, Callable

import orjson
import pydantic
import redis
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi import Path as FastApiPath
from fastapi.routing import APIRoute
from starlette.datastructures import State

from serving.dependencies import ScoringDep, hosting, scoring
from serving.responses import json_response
from serving.schemas import ScoreRequest, ScoreResponse, id_type_error
from serving.scorer import Scored, Scorer

MAX_NAME = 64  # the model name's max_length on /models/{name}/score


async def plain_call(request: Request, named: bool) -> dict[str, Any] | None:
    """The score endpoint's arguments for a plain request (JSON body of content-type
    application/json that `ScoreRequest` accepts, no dependency overrides), else None: the
    request goes FastAPI's way, which answers it as it always did.

    Same order as FastAPI's: the body is read (the guards' 413 and 408 raise here), then the
    API key is checked (401), then the body validated. orjson parses the body: where it
    succeeds it gives what `json.loads` gives; where it fails (NaN, Infinity, integers beyond
    64 bits, lone surrogates, malformed JSON) FastAPI parses it again with `json.loads`."""
    if request.app.dependency_overrides or request.headers.get("content-type") != "application/json":
        return None
    try:
        raw = await request.body()  # cached on the request: FastAPI's way reads it again for free
    except HTTPException:  # the guards' 413 and 408, which FastAPI's way raises as they are
        raise
    except Exception:  # a client gone mid-body: FastAPI's way answers it (400)
        return None
    if not raw:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    state = await scoring(request)
    try:
        body = ScoreRequest.model_validate(data)
    except pydantic.ValidationError:
        return None
    call: dict[str, Any] = {"body": body, "state": state}
    if named:
        name = request.path_params["name"]
        if len(name) > MAX_NAME:
            return None
        call["name"] = name
    return call


class ScoreRoute(APIRoute):
    """A score route whose plain requests (`plain_call`) call the endpoint directly; the route
    itself (path, OpenAPI schema, methods) is FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        general = super().get_route_handler()
        endpoint, named = self.endpoint, any(p.name == "name" for p in self.dependant.path_params)

        async def handler(request: Request) -> Response:
            call = await plain_call(request, named)
            return await general(request) if call is None else await endpoint(**call)

        return handler


router = APIRouter(route_class=ScoreRoute)


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
