"""The bare app of `loopfm bench serving`'s decomposition: an ASGI app that reads a request's body
and answers 200 with a fixed two-byte JSON body, served by the same uvicorn command as loopfm's
server (loopfm/pipeline/services.py: uvicorn_command). What a request costs uvicorn, uvloop and
httptools alone, which no app they serve can go below."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

Message = dict[str, Any]
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2")]


def create_app() -> Callable[[dict, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]:
    """The ASGI app (uvicorn --factory): lifespan accepted, every HTTP request answered `{}`."""

    async def app(scope: dict, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:  # the whole body, as a real handler reads it
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"{}"})

    return app
