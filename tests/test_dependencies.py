"""Serving dependencies run on the event loop: FastAPI sends a plain `def` dependency to its
thread pool, a thread hop per dependency per request (serving/dependencies.py says what it cost)."""

from __future__ import annotations

import inspect
import typing

from serving import dependencies


def test_every_dependency_the_routers_take_is_a_coroutine_function():
    annotated = [v for v in vars(dependencies).values() if typing.get_origin(v) is typing.Annotated]
    calls = [typing.get_args(a)[1].dependency for a in annotated] + [dependencies.api_key, dependencies.admin_key]
    assert len(annotated) == 5
    assert [f.__name__ for f in calls if not inspect.iscoroutinefunction(f)] == []
