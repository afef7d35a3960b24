"""Score one request: Redis read -> shared tensorization -> ONNX Runtime. No torch, no FM."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
import redis

from loopfm.features.tensorize import TensorSpec, candidate_tensors, request_tensors
from serving.online_reader import read_online_features

USER_KEY, ITEM_KEY = "user_id", "item_id"


@dataclass
class Scored:
    scores: list[float]
    user_known: bool
    unknown_items: list[int]
    feature_age_s: dict[str, float | None]  # per user feature view: now - Feast event time


class Scorer:
    """An ONNX VM plus the feature refs and tensor spec it was exported with."""

    def __init__(self, model_dir: Path, threads: int = 1):
        meta_path, onnx_path = model_dir / "model.json", model_dir / "model.onnx"
        for path in (meta_path, onnx_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: export a model with `loopfm vm export`")
        self.meta = json.loads(meta_path.read_text())
        self.spec = TensorSpec(**self.meta["spec"])
        self.user_views: dict[str, list[str]] = self.meta["features"][USER_KEY]
        self.item_views: dict[str, list[str]] = self.meta["features"][ITEM_KEY]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    @property
    def version(self) -> str:
        return self.meta["model_version"]

    def score(self, client: redis.Redis, user_id: int, item_ids: Sequence[int], hour: int) -> Scored:
        user, items = read_online_features(
            client,
            self.meta["project"],
            [(USER_KEY, [user_id], self.user_views), (ITEM_KEY, item_ids, self.item_views)],
        )
        tensors = request_tensors(user.values, [hour], self.spec)
        tensors["candidates"] = candidate_tensors(item_ids, items.values, self.spec)
        tensors["candidate_user"] = np.zeros(len(item_ids), dtype=np.int64)
        scores = self.session.run(None, {name: tensors[name] for name in self.inputs})[0]
        now = time.time()
        ages = {view: None if ts[0] is None else now - ts[0] for view, ts in user.timestamps.items()}
        return Scored(
            scores=scores.astype(float).tolist(),
            user_known=any(age is not None for age in ages.values()),
            unknown_items=[i for i, known in zip(item_ids, tensors["candidates"][:, 1] > 0) if not known],
            feature_age_s=ages,
        )
