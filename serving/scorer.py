"""Score one request: Redis read -> shared tensorization -> ONNX Runtime. No torch, no FM."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import redis.asyncio

from loopfm.contract.names import ITEM_KEY, items_written_key
from loopfm.contract.tensorize import TensorSpec, candidate_tensors, model_inputs
from loopfm.contract.version import check_format
from serving.item_cache import ItemCache
from serving.feast_layout import request_side, user_entity
from serving.online_reader import EntityRows, read_online_features


def _session(onnx_path: Path, threads: int) -> ort.InferenceSession:
    """The graph ONNX Runtime optimised at export (`optimized_graph` in model.json), loaded
    with graph optimisation disabled: it is not optimised again at every start."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


@dataclass
class Scored:
    scores: np.ndarray  # [C] float64: JSON from the array (serving.responses.json_response), no list of floats
    user_known: bool
    unknown_items: list[int | str]  # as sent: no stored features, or outside the model's vocabulary
    feature_age_s: dict[str, float | None]  # per user feature view: now - Feast event time, 0 when that is ahead
    corrupt_values: int  # stored values that could not be decoded (read as missing)
    read_s: float  # item cache + Redis round trip + decoding
    model_s: float  # tensorization + ONNX Runtime


class Scorer:
    """An ONNX VM plus the feature refs and tensor spec it was exported with."""

    def __init__(
        self,
        model_dir: Path,
        threads: int = 1,
        item_cache: ItemCache | None = None,
        large_batch: int = 256,
        large_batch_threads: int = 2,
    ):
        meta_path, onnx_path = model_dir / "model.json", model_dir / "model.onnx"
        for path in (meta_path, onnx_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: export a model with `loopfm vm export`")
        self.meta = json.loads(meta_path.read_text())
        check_format(self.meta, meta_path, "re-export the model with `loopfm vm export` (after `loopfm vm train` for a model.pt of another version)")
        onnx_path = model_dir / self.meta["optimized_graph"]["file"]
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path} not found: model.json names it as the optimised graph; re-export the model")
        self.spec = TensorSpec(**self.meta["spec"])
        self.entity_types: dict[str, str] = self.meta["entity_types"]  # checked by serving.models.check_model
        self.user_groups, self.item_views = request_side(self.meta)
        self.items = item_cache if item_cache is not None else ItemCache(max_items=0, ttl_s=0)
        # Two sessions of one model: small requests run on one thread (a second only adds
        # synchronisation), large ones on `large_batch_threads` without spin-waiting, so an
        # idle core speeds them up without being burnt while waiting.
        self.session = _session(onnx_path, threads)
        self.large_session = _session(onnx_path, large_batch_threads) if large_batch_threads != threads else self.session
        self.large_batch = large_batch
        self.inputs = [i.name for i in self.session.get_inputs()]

    @property
    def version(self) -> str:
        return self.meta["model_version"]

    async def read(self, client: redis.asyncio.Redis, user_id: int | str,
                   missing: Sequence[int | str]) -> tuple[EntityRows, EntityRows, Any]:  # fmt: skip
        """One pipelined Redis round trip: the user's rows (every user view, merged), the rows
        of the `missing` items, and the reply of the items-written feed's query."""
        requests = [(keys, [user_entity(keys, user_id, self.meta)], views) for keys, views in self.user_groups]
        (*user_side, fetched), written = await read_online_features(
            client, self.meta["project"], [*requests, ((ITEM_KEY,), [(i,) for i in missing], self.item_views)],
            self.items.written_query(items_written_key(self.meta["project"])),
        )
        user = EntityRows({}, {}, 0)
        for group in user_side:  # the user's own views and the (user, this model's vertical) ones
            user.values.update(group.values)
            user.timestamps.update(group.timestamps)
            user.corrupt += group.corrupt
        return user, fetched, written

    def tensorize(self, user: EntityRows, fetched: EntityRows, item_ids: Sequence[int | str], looked_up: tuple,
               hour: int) -> dict[str, np.ndarray]:  # fmt: skip
        """The model's inputs: the item rows `looked_up` (ItemCache.lookup) completed with the
        `fetched` ones (then cached), and the user's tensors."""
        cached, hit, missing = looked_up
        fresh = candidate_tensors(fetched.values, self.spec) if missing else None
        return model_inputs(user.values, [hour], self.items.complete(item_ids, cached, hit, missing, fresh), self.spec)

    def run(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """ONNX Runtime: [C] scores, on the large-batch session from `large_batch` candidates."""
        session = self.large_session if len(tensors["candidates"]) >= self.large_batch else self.session
        return session.run(None, {name: tensors[name] for name in self.inputs})[0]

    async def score(
        self, client: redis.asyncio.Redis, user_id: int | str, item_ids: Sequence[int | str], hour: int
    ) -> Scored:
        """One pipelined Redis round trip (the user + items not in the cache), then ONNX. Ids are
        source ids of the model's entity types (serving.schemas.id_type_error checks them);
        each item's dense index comes with its features (ITEM_INDEX)."""
        started = time.perf_counter()
        looked_up = self.items.lookup(item_ids)  # gathered before the await: see ItemCache.lookup
        user, fetched, written = await self.read(client, user_id, looked_up[2])
        read_done = time.perf_counter()
        tensors = self.tensorize(user, fetched, item_ids, looked_up, hour)
        self.items.forget_written(written)
        scores = self.run(tensors)
        now = time.time()
        ages = {view: None if ts[0] is None else max(0.0, now - ts[0]) for view, ts in user.timestamps.items()}
        return Scored(
            scores=scores.astype(np.float64),
            user_known=any(age is not None for age in ages.values()),
            unknown_items=[item_ids[i] for i in np.flatnonzero(tensors["candidates"][:, 0] == 0)],  # dense index 0: unknown
            feature_age_s=ages,
            corrupt_values=user.corrupt + fetched.corrupt,
            read_s=read_done - started,
            model_s=time.perf_counter() - read_done,
        )
