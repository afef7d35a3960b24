"""Request guards: an optional API key for /score and /metrics, an admin key for /admin/*.
(The body's size and reading time are bounded in front of every route: serving/front.py.)"""

from __future__ import annotations

import hmac
from typing import Mapping

from fastapi import HTTPException


def _given_key(headers: Mapping[str, str]) -> bytes:
    auth = headers.get("authorization", "")
    return (auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")).encode()


def check_api_key(headers: Mapping[str, str], expected: str | None) -> None:
    """Accept `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time; raise
    401 otherwise. With no key configured it lets everything through. The key is never logged.
    `headers`: a request's (Starlette's Headers: names in any case, the first of repeated ones)."""
    if expected and not hmac.compare_digest(_given_key(headers), expected.encode()):
        raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


def check_admin_key(headers: Mapping[str, str], expected: str | None) -> None:
    """Like check_api_key, but closed by default: admin endpoints change what is served, so
    with no LOOPFM_ADMIN_KEY they answer 403 rather than being open to anyone."""
    if not expected:
        raise HTTPException(403, "admin endpoints are disabled: set LOOPFM_ADMIN_KEY to enable them")
    check_api_key(headers, expected)
