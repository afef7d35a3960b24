"""What the routers take through `Depends`: the settings, the model registry, the Redis
client, the metrics and the reload broadcast, all set on `app.state` by serving/app.py,
and the key guards.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in its thread pool,
one thread hop per dependency per request, and waking and waiting for those threads is a
large share of a short request's time (docs/serving.md, "Where the time goes")."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from serving.guards import check_admin_key, check_api_key
from serving.metrics import Metrics
from serving.models import ModelRegistry
from serving.redis_client import AsyncClient
from serving.reloads import ReloadBroadcast
from serving.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_models(request: Request) -> ModelRegistry:
    """The registry (set at start-up, before the server accepts requests)."""
    return request.app.state.models


async def get_redis(request: Request) -> AsyncClient:
    """The server's one Redis client (set at start-up)."""
    return request.app.state.redis


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_reloads(request: Request) -> ReloadBroadcast:
    """This worker's reload broadcast (set at start-up)."""
    return request.app.state.reloads


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
RedisDep = Annotated[AsyncClient, Depends(get_redis)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ReloadsDep = Annotated[ReloadBroadcast, Depends(get_reloads)]


async def api_key(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries LOOPFM_API_KEY (when one is set)."""
    check_api_key(request, settings.api_key)


async def admin_key(request: Request, settings: SettingsDep) -> None:
    """403 with no LOOPFM_ADMIN_KEY set, else 401 unless the request carries it."""
    check_admin_key(request, settings.admin_key)


def hosting(models: ModelRegistry, name: str) -> ModelRegistry:
    """`models`, once it is known to host `name` (404 with the hosted names if not)."""
    if name not in models.models:
        raise HTTPException(404, f"no model named {name!r}; hosted: {sorted(models.models)}")
    return models
