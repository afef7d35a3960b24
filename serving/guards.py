"""Request guards: an optional API key, and limits on the body's size and on the time its
reading may take, all checked before any work."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import HTTPException, Request


def _given_key(request: Request) -> bytes:
    auth = request.headers.get("authorization", "")
    return (auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")).encode()


def check_api_key(request: Request, expected: str | None) -> None:
    """Accept `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time; raise
    401 otherwise. With no key configured it lets everything through. The key is never logged."""
    if expected and not hmac.compare_digest(_given_key(request), expected.encode()):
        raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


def check_admin_key(request: Request, expected: str | None) -> None:
    """Like check_api_key, but closed by default: admin endpoints change what is served, so
    with no LOOPFM_ADMIN_KEY they answer 403 rather than being open to anyone."""
    if not expected:
        raise HTTPException(403, "admin endpoints are disabled: set LOOPFM_ADMIN_KEY to enable them")
    check_api_key(request, expected)


class BodyLimits:
    """Pure ASGI middleware: 413 for a body over `max_bytes`, before it is read whole or parsed;
    408 (and the connection closed) for a body not received within `deadline_s` of the
    request's start, so a client sending slowly cannot hold a connection past the deadline."""

    def __init__(self, app, max_bytes: int, deadline_s: float):
        self.app, self.max_bytes, self.deadline_s = app, max_bytes, deadline_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        received, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.deadline_s  # the loop's clock, as asyncio.timeout_at reads it

        async def counting_receive():
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

        await self.app(scope, counting_receive, send)


async def _too_large(send, max_bytes: int) -> None:
    body = f'{{"detail":"request body over {max_bytes} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
