"""Request guards: an optional API key and a body-size limit, both checked before any work."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def _given_key(request: Request) -> bytes:
    auth = request.headers.get("authorization", "")
    return (auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")).encode()


def api_key_guard(expected: str | None):
    """A dependency that accepts `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in
    constant time. With no key configured it lets everything through. The key is never logged."""
    expected_bytes = expected.encode() if expected else None

    async def check(request: Request) -> None:
        if expected_bytes is not None and not hmac.compare_digest(_given_key(request), expected_bytes):
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return check


def admin_key_guard(expected: str | None):
    """Like api_key_guard, but closed by default: admin endpoints change what is served, so
    with no LOOPFM_ADMIN_KEY they answer 403 rather than being open to anyone."""
    key_check = api_key_guard(expected)

    async def check(request: Request) -> None:
        if not expected:
            raise HTTPException(403, "admin endpoints are disabled: set LOOPFM_ADMIN_KEY to enable them")
        await key_check(request)

    return check


class BodySizeLimit:
    """Pure ASGI middleware: 413 for a body over `max_bytes`, before it is read whole or parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
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
