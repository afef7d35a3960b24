"""The short way of a plain /score request (serving/routers/score.py, `plain_call`): which
requests take it, and that every other one is left to FastAPI. No Redis, no model: the
request is built by hand; the end-to-end answers are in tests/test_serving.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException
from starlette.requests import Request

from serving.routers.score import ScoreRoute, plain_call, router
from serving.schemas import ScoreRequest
from serving.settings import Settings

PLAIN = b'{"user_id": 7, "candidate_item_ids": [1, 2, "x"], "context": {"hour": 3}}'


def _app(api_key: str | None = None) -> FastAPI:
    app = FastAPI()
    app.state.settings = Settings(models={"default": Path("unused")}, api_key=api_key)
    return app


def _call(body: bytes, content_type: str | None = "application/json", app: FastAPI | None = None,
          headers: dict[str, str] | None = None, name: str | None = None):  # fmt: skip
    raw_headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        raw_headers.append((b"content-type", content_type.encode()))
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": "/score", "headers": raw_headers, "app": app or _app(),
             "path_params": {} if name is None else {"name": name}, "query_string": b""}  # fmt: skip

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return asyncio.run(plain_call(Request(scope, receive), named=name is not None))


def test_a_plain_request_gets_the_endpoint_arguments_fastapi_would_give():
    call = _call(PLAIN)
    assert call["body"] == ScoreRequest.model_validate({"user_id": 7, "candidate_item_ids": [1, 2, "x"], "context": {"hour": 3}})
    assert call["state"].settings.api_key is None and "name" not in call
    assert _call(PLAIN, name="shop")["name"] == "shop"


@pytest.mark.parametrize(
    "body, content_type",
    [
        (PLAIN, "application/json; charset=utf-8"),  # FastAPI parses the parameters
        (PLAIN, None),
        (PLAIN, "text/plain"),
        (b"", "application/json"),
        (b'{"user_id": 7, "candidate_item_ids": [1,', "application/json"),  # malformed: json_invalid
        (b'{"user_id": NaN, "candidate_item_ids": [1]}', "application/json"),  # json.loads reads NaN, orjson not
        (b'{"user_id": 18446744073709551616, "candidate_item_ids": [1]}', "application/json"),  # beyond 64 bits
        (b'{"user_id": "\\ud800", "candidate_item_ids": [1]}', "application/json"),  # a lone surrogate
        (b'{"user_id": 7, "candidate_item_ids": []}', "application/json"),  # fails validation
        (b'{"user_id": 7, "candidate_item_ids": [1], "extra": 1}', "application/json"),
        (b'[1, 2]', "application/json"),
    ],
)
def test_every_other_request_is_left_to_fastapi(body: bytes, content_type: str | None):
    assert _call(body, content_type) is None


def test_a_model_name_over_the_routes_limit_is_left_to_fastapi():
    assert _call(PLAIN, name="m" * 65) is None


def test_dependency_overrides_send_requests_fastapis_way():
    app = _app()
    app.dependency_overrides[len] = len
    assert _call(PLAIN, app=app) is None


def test_the_key_is_checked_before_the_body_is_validated_as_fastapi_orders_it():
    app = _app(api_key="secret")
    with pytest.raises(HTTPException) as refused:
        _call(b'{"user_id": 7, "candidate_item_ids": []}', app=app)
    assert refused.value.status_code == 401
    assert _call(PLAIN, app=app, headers={"authorization": "Bearer secret"}) is not None


def test_both_score_routes_are_score_routes():
    assert {route.path for route in router.routes if isinstance(route, ScoreRoute)} == {"/score", "/models/{name}/score"}
