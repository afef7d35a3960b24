"""The hosted models: GET /models lists them (API key), POST /admin/models/{name}/reload
swaps one for the model now at its path (admin key; 409 if refused, the old one serving on),
in the worker that answers and then, announced through serving/reloads.py, in every other.
The status says whether every worker serves the new model: 200 only then."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Response

from serving.dependencies import MetricsDep, ModelsDep, ReloadsDep, admin_key, api_key, hosting
from serving.models import ModelRefused
from serving.reloads import REPLY_WAIT_S
from serving.responses import json_response

router = APIRouter()


@router.get("/models", dependencies=[Depends(api_key)])
async def list_models(models: ModelsDep) -> Response:
    return json_response(models.describe())


@router.post("/admin/models/{name}/reload", dependencies=[Depends(admin_key)])
async def reload_model(name: str, models: ModelsDep, metrics: MetricsDep, reloads: ReloadsDep) -> Response:
    """This worker's swap and `other_workers`: each other worker's new version or refusal
    (serving/reloads.py), how many did not answer in time (`unconfirmed`), why nobody else
    was told (`error`). 200 when every worker that heard it answered with the new model; 409
    when another worker refused it; 503 when the store could not carry the announcement or a
    worker did not answer (`detail` says which): the workers may serve two versions, and a
    repeated reload, once the store answers, reaches them."""
    hosting(models, name)
    try:
        old, new = await models.reload(name)
    except ModelRefused as exc:
        metrics.errors.labels("model_refused").inc()
        raise HTTPException(409, f"model refused, {models.scorer(name).version} keeps serving: {exc}") from None
    others = await reloads.announce(name)
    body = {"model": name, "previous_version": old, "model_version": new, "worker": reloads.worker, "other_workers": others}
    refused = sorted(worker for worker, answer in others["workers"].items() if "refused" in answer)
    if refused:
        return json_response({**body, "detail": f"reloaded here; refused by {', '.join(refused)}, which keep(s) their "
                              "model: the workers serve two versions"}, 409)  # fmt: skip
    if others.get("error") or others["unconfirmed"]:
        reason = others.get("error") or f"{others['unconfirmed']} worker(s) did not confirm within {REPLY_WAIT_S:.0f} s"
        return json_response({**body, "detail": f"reloaded here, not known to have reached every worker ({reason}): "
                              "they may serve two versions; reload again once the online store answers"}, 503)  # fmt: skip
    return json_response(body)
