"""The hosted models: GET /models lists them (API key), POST /admin/models/{name}/reload
swaps one for the model now at its path (admin key; 409 if refused, the old one serving on),
in the worker that answers and then, announced through serving/reloads.py, in every other."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Response

from serving.dependencies import MetricsDep, ModelsDep, ReloadsDep, admin_key, api_key, hosting
from serving.models import ModelRefused
from serving.responses import json_response

router = APIRouter()


@router.get("/models", dependencies=[Depends(api_key)])
async def list_models(models: ModelsDep) -> Response:
    return json_response(models.describe())


@router.post("/admin/models/{name}/reload", dependencies=[Depends(admin_key)])
async def reload_model(name: str, models: ModelsDep, metrics: MetricsDep, reloads: ReloadsDep) -> Response:
    """200 with this worker's swap and `other_workers`: each other worker's new version or
    refusal (serving/reloads.py), and how many did not answer in time (`unconfirmed`)."""
    hosting(models, name)
    try:
        old, new = await models.reload(name)
    except ModelRefused as exc:
        metrics.errors.labels("model_refused").inc()
        raise HTTPException(409, f"model refused, {models.scorer(name).version} keeps serving: {exc}") from None
    others = await reloads.announce(name)
    return json_response({"model": name, "previous_version": old, "model_version": new, "worker": reloads.worker,
                          "other_workers": others})  # fmt: skip
