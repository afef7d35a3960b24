"""Benchmark baseline (b): the /score a Feast user would write first, with
`FeatureStore.get_online_features` for the user and the candidates, then the same shared
tensorization and the same ONNX model as loopfm's server. Not for production: it imports
the Feast SDK (and with it torch) into the server process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import onnxruntime as ort
from fastapi import FastAPI

from loopfm.features.store import open_store
from loopfm.contract.tensorize import TensorSpec, one_request_inputs
from serving.feast_layout import feature_refs, user_side_refs
from serving.schemas import ScoreRequest


def create_app() -> FastAPI:
    model_dir = Path(os.environ["LOOPFM_MODEL_DIR"])
    store = open_store(Path(os.environ["LOOPFM_RUN_DIR"]), os.environ["REDIS_URL"])
    meta = json.loads((model_dir / "model.json").read_text())
    spec = TensorSpec(**meta["spec"])
    item_refs = feature_refs(meta["features"]["item_id"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    app = FastAPI(title="feast-sdk baseline")

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    @app.post("/score")
    def score(body: ScoreRequest) -> dict:
        items = body.candidate_item_ids
        user_refs, user_row = user_side_refs(meta, body.user_id)
        user = store.get_online_features(features=user_refs, entity_rows=[user_row]).to_dict()
        item_rows = store.get_online_features(features=item_refs, entity_rows=[{"item_id": i} for i in items]).to_dict()
        hour = body.context.hour if body.context.hour is not None else time.gmtime().tm_hour
        tensors = one_request_inputs(user, hour, item_rows, spec)
        scores = session.run(None, {name: tensors[name] for name in inputs})[0]
        return {"scores": scores.astype(float).tolist(), "model_version": meta["model_version"]}

    return app
