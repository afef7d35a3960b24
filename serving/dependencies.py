"""What the routers take through `Depends`: the settings, the model registry, the metrics,
the reload broadcast, all set on `app.state` by serving/app.py, the key guards, and what the
score routes take in one (`scoring`: the key, then the state with the Redis client).

Every dependency is `async def`: FastAPI runs a plain `def` dependency in its thread pool,
one thread hop per dependency per request, and waking and waiting for those threads is a
large share of a short request's time (docs/serving.md, "Where the time goes")."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.datastructures import State

from serving.guards import check_admin_key, check_api_key
from serving.metrics import Metrics
from serving.models import ModelRegistry
from serving.reloads import ReloadBroadcast
from serving.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_models(request: Request) -> ModelRegistry:
    """The registry (set at start-up, before the server accepts requests)."""
    return request.app.state.models


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_reloads(request: Request) -> ReloadBroadcast:
    """This worker's reload broadcast (set at start-up)."""
    return request.app.state.reloads


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ReloadsDep = Annotated[ReloadBroadcast, Depends(get_reloads)]


async def api_key(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries LOOPFM_API_KEY (when one is set)."""
    check_api_key(request.headers, settings.api_key)


async def scoring(request: Request) -> State:
    """What the score routes take, as one dependency: 401 unless the request carries
    LOOPFM_API_KEY (when one is set), then `app.state` (settings, models, redis, metrics).
    FastAPI solves every dependency of every request on its own: one instead of six (the key,
    its settings, four getters) took 42 µs off each /score (in-process A/B of the whole ASGI
    app with the Scorer stubbed, one core: 191 -> 147 µs at 100 candidates)."""
    state = request.app.state
    check_api_key(request.headers, state.settings.api_key)
    return state


ScoringDep = Annotated[State, Depends(scoring)]


async def admin_key(request: Request, settings: SettingsDep) -> None:
    """403 with no LOOPFM_ADMIN_KEY set, else 401 unless the request carries it."""
    check_admin_key(request.headers, settings.admin_key)


def hosting(models: ModelRegistry, name: str) -> ModelRegistry:
    """`models`, once it is known to host `name` (404 with the hosted names if not)."""
    if name not in models.models:
        raise HTTPException(404, f"no model named {name!r}; hosted: {sorted(models.models)}")
    return models
