"""The app's one pure ASGI layer, in front of FastAPI's own (issue 39): every request's latency
and status (serving/metrics.py), its body limits (413 before a declared body over the limit
is read, 413 once a streamed one passes it, 408 past the deadline), and the short way of a
plain score request.

A plain request is a POST /score or /models/{name}/score with content-type application/json,
a body orjson parses and `ScoreRequest` accepts, no dependency overrides and no root path.
It is scored here, by the endpoints' own `score_with`, without FastAPI's exception and
exit-stack layers, its router (which tries every route in turn), its Request, its dependency
solving and its content-type parsing (what they cost: docs/serving.md, "One ASGI layer").
Its errors are answered by the app's own exception handlers, as FastAPI's exception layer
would answer them. Every other request goes FastAPI's way, the body read so far replayed, so
its answer and the order of its errors are FastAPI's; that includes a body orjson refuses
(NaN, Infinity, integers beyond 64 bits, lone surrogates, malformed JSON), which FastAPI
parses again with `json.loads`, and one that fails validation (FastAPI's 422 body).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable

import orjson
import pydantic
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.dependencies import hosting
from serving.guards import check_api_key
from serving.metrics import Metrics
from serving.routers.score import MAX_NAME, score_with
from serving.schemas import ScoreRequest

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def score_target(scope: dict) -> str | None:
    """The model a score request names ("" for POST /score, the default model); None for any
    other request, and for a name FastAPI's route refuses (over MAX_NAME characters)."""
    if scope["method"] != "POST" or scope.get("root_path"):
        return None
    path = scope["path"]
    if path == "/score":
        return ""
    name = path[len("/models/") : -len("/score")] if path.startswith("/models/") and path.endswith("/score") else ""
    return name if name and "/" not in name and len(name) <= MAX_NAME else None


def plain_body(app: FastAPI, headers: Headers, raw: bytes) -> ScoreRequest | None:
    """The body of a plain score request (module docstring), else None: the request goes
    FastAPI's way. Raises the API key's 401 (serving.guards.check_api_key) after the JSON
    parses and before the body is validated, as FastAPI orders a dependency and a body."""
    if app.dependency_overrides or headers.get("content-type") != "application/json" or not raw:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    check_api_key(headers, app.state.settings.api_key)
    try:
        return ScoreRequest.model_validate(data)
    except pydantic.ValidationError:
        return None


async def _read_body(receive: Receive, received: list[Message]) -> bytes | None:
    """The whole body, every message kept in `received`; None when the client leaves first."""
    chunks = []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(received: list[Message], receive: Receive) -> Receive:
    """`receive` that first gives back the messages already `received`."""
    pending = list(received)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _handled(app: FastAPI, scope: dict, receive: Receive, exc: Exception) -> Response | None:
    """The app's answer to `exc` from its exception handlers, found as Starlette's exception
    layer finds them (an HTTP error's status code first, then the exception's classes; the
    500 / Exception handler belongs to the outer error layer); `exc` re-raised when none does."""
    handlers = app.exception_handlers
    outer = (500, Exception)
    handler = handlers.get(exc.status_code) if isinstance(exc, StarletteHTTPException) and exc.status_code != 500 else None
    handler = handler or next((handlers[c] for c in type(exc).__mro__ if c in handlers and c not in outer), None)
    if handler is None:
        raise exc
    response = handler(Request(scope, receive), exc)
    return await response if inspect.isawaitable(response) else response


class FrontLayer:
    """Pure ASGI middleware (module docstring): metrics, body limits, plain score requests."""

    def __init__(self, app, metrics: Metrics, max_bytes: int, deadline_s: float):
        self.app, self.metrics, self.max_bytes, self.deadline_s = app, metrics, max_bytes, deadline_s

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                return await _too_large(recording_send, self.max_bytes)
            bounded = self._bounded(receive)
            name = score_target(scope)
            if name is None:
                return await self.app(scope, bounded, recording_send)
            await self._score(scope, bounded, recording_send, name)
        finally:
            self.metrics.record_request(scope["path"], status, time.perf_counter() - started)

    def _bounded(self, receive: Receive) -> Receive:
        """`receive` that raises 408 for a body not in within `deadline_s` of the request's
        start (so a client sending slowly cannot hold a connection past the deadline) and 413
        once the body passes `max_bytes`."""
        received, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.deadline_s  # the loop's clock, as asyncio.timeout_at reads it

        async def bounded() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: later receives wait for a disconnect, unbounded by design
                return await receive()
            try:  # asyncio.timeout_at, not wait_for: no task per receive (Python 3.11's wait_for makes one)
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"request body not received within the {self.deadline_s} s request deadline",
                                    headers={"Connection": "close"}) from None  # fmt: skip
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        return bounded

    async def _score(self, scope, receive: Receive, send: Send, name: str) -> None:
        """A score request: answered here if plain, else FastAPI's way (module docstring)."""
        app: FastAPI = scope["app"]
        received: list[Message] = []
        try:
            response = await _plain_response(app, Headers(scope=scope), receive, received, name)
        except Exception as exc:  # HTTPException, RequestValidationError: answered as FastAPI's layer would
            response = await _handled(app, scope, receive, exc)
            if response is not None:  # a handler may answer nothing, as in Starlette
                await response(scope, receive, send)
            return
        if response is None:
            return await self.app(scope, _replaying(received, receive), send)
        await response(scope, receive, send)


async def _plain_response(app: FastAPI, headers: Headers, receive: Receive, received: list[Message],
                          name: str) -> Response | None:  # fmt: skip
    """The answer to a plain score request for model `name` ("" = the default), None when the
    request is not plain (its messages left in `received`)."""
    raw = await _read_body(receive, received)
    body = None if raw is None else plain_body(app, headers, raw)
    if body is None:
        return None
    state = app.state
    return await score_with(hosting(state.models, name).scorer(name) if name else state.models.scorer(), body, state)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = f'{{"detail":"request body over {max_bytes} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
