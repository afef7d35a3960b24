"""The app's front layer (serving/front.py): which requests it answers itself as plain score
requests, and that every other one reaches FastAPI's way whole. No Redis, no model: the app
here has a route that echoes what it received; the end-to-end answers of the real app are in
tests/test_serving.py, tests/test_faults.py and tests/test_fuzz.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import Headers

from serving.front import FrontLayer, plain_body, score_target
from serving.metrics import Metrics
from serving.schemas import ScoreRequest
from serving.settings import Settings

PLAIN = b'{"user_id": 7, "candidate_item_ids": [1, 2, "x"], "context": {"hour": 3}}'


def _app(api_key: str | None = None, max_bytes: int = 4096) -> FastAPI:
    """An app behind the front layer whose score route echoes the body FastAPI's way got."""
    app = FastAPI()
    app.state.settings = Settings(models={"default": Path("unused")}, api_key=api_key)
    app.state.metrics = Metrics(lambda: [])
    app.add_middleware(FrontLayer, metrics=app.state.metrics, max_bytes=max_bytes, deadline_s=1.0)

    @app.post("/score")
    async def echo(request: Request) -> dict:
        return {"fastapi_got": (await request.body()).decode()}

    return app


def _body(raw: bytes, content_type: str | None = "application/json", app: FastAPI | None = None,
          headers: dict[str, str] | None = None) -> ScoreRequest | None:  # fmt: skip
    given = {**({"content-type": content_type} if content_type else {}), **(headers or {})}
    return plain_body(app or _app(), Headers(headers=given), raw)


def _asgi(app: FastAPI, path: str, chunks: list[bytes], content_type: str = "text/plain",
          declared: int | None = None) -> tuple[int, bytes]:  # fmt: skip
    """POST `chunks` to `path` as a server hands them to the app, one message each: (status, body)."""
    length = sum(map(len, chunks)) if declared is None else declared
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(length).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _scope(method: str, path: str, root_path: str = "") -> dict:
    return {"method": method, "path": path, "root_path": root_path}


def test_the_score_paths_name_their_model_and_nothing_else_is_a_score_request():
    assert score_target(_scope("POST", "/score")) == ""
    assert score_target(_scope("POST", "/models/shop/score")) == "shop"
    for scope in (_scope("GET", "/score"), _scope("POST", "/score/"), _scope("POST", "/healthz"),
                  _scope("POST", "/models//score"), _scope("POST", "/models/a/b/score"), _scope("POST", "/models/score"),
                  _scope("POST", "/models/" + "m" * 65 + "/score"),  # over the route's max_length: FastAPI's 422
                  _scope("POST", "/api/score", root_path="/api")):  # fmt: skip
        assert score_target(scope) is None, scope


def test_a_plain_request_gets_the_body_fastapi_would_validate():
    assert _body(PLAIN) == ScoreRequest.model_validate({"user_id": 7, "candidate_item_ids": [1, 2, "x"], "context": {"hour": 3}})


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
    assert _body(body, content_type) is None


def test_dependency_overrides_send_requests_fastapis_way():
    app = _app()
    app.dependency_overrides[len] = len
    assert _body(PLAIN, app=app) is None


def test_the_key_is_checked_before_the_body_is_validated_as_fastapi_orders_it():
    app = _app(api_key="secret")
    with pytest.raises(HTTPException) as refused:
        _body(b'{"user_id": 7, "candidate_item_ids": []}', app=app)
    assert refused.value.status_code == 401
    assert _body(PLAIN, app=app, headers={"authorization": "Bearer secret"}) is not None


def test_a_score_request_left_to_fastapi_arrives_whole_after_the_layer_read_it():
    app = _app()
    for content_type in ("text/plain", "application/json"):  # not plain; plain JSON that fails validation
        status, body = _asgi(app, "/score", [b'{"user_id": 7, ', b'"candidate_item_ids": []}'], content_type)
        assert (status, body) == (200, b'{"fastapi_got":"{\\"user_id\\": 7, \\"candidate_item_ids\\": []}"}')


def test_bodies_over_the_limit_get_413_whether_declared_or_streamed():
    app = _app(max_bytes=300)
    status, body = _asgi(app, "/score", [b"x" * 10], declared=301)  # refused before a byte is read
    assert status == 413 and b"over 300 bytes" in body
    status, body = _asgi(app, "/score", [b"x" * 200, b"x" * 200], declared=10)  # the declared length lies
    assert status == 413 and b"over 300 bytes" in body
    counted = app.state.metrics.registry.get_sample_value("loopfm_responses_total", {"path": "/score", "status": "413"})
    assert counted == 2
