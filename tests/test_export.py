"""ONNX export: ONNX Runtime agrees with PyTorch, and a request's history is passed once."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from loopfm.contract.names import FM_HISTORY_FEATURE, USER_FEATURES, VM_COUNT_FEATURES, VM_HISTORY_FEATURE
from loopfm.features.store import historical_features
from loopfm.io import RunPaths, read_parquet
from loopfm.vm.export import PARITY_TOLERANCE, parity_check
from loopfm.vm.train import frame_tensors, load_variant


def test_onnx_matches_pytorch_on_at_least_1000_real_rows(trained_run, store):
    paths = RunPaths(trained_run)
    for variant in ("base", "loopfm_kd"):
        model, spec = load_variant(paths, variant)
        meta = json.loads((paths.vm / variant / "onnx" / "model.json").read_text())
        rows = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), f"vm_{variant}")
        tensors = frame_tensors(rows, spec)
        parity = parity_check(model, (paths.vm / variant / "onnx" / "model.onnx").read_bytes(),
                              {n: tensors[n] for n in meta["inputs"]})  # fmt: skip
        assert parity["rows"] >= 1000
        assert parity["max_abs_diff"] <= PARITY_TOLERANCE


def test_one_user_many_candidates_scores_like_one_row_per_candidate(trained_run, store):
    paths = RunPaths(trained_run)
    onnx_dir = paths.vm / "loopfm_kd" / "onnx"
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"))
    _, spec = load_variant(paths, "loopfm_kd")
    rows = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), "vm_loopfm_kd")
    user_rows = rows[rows.user_id == rows.loc[rows.fm_codes.notna(), "user_id"].iloc[0]].head(1)
    per_row = frame_tensors(rows.head(40).assign(**{c: [user_rows[c].iloc[0]] * 40 for c in
                            (*USER_FEATURES, VM_HISTORY_FEATURE, *VM_COUNT_FEATURES, FM_HISTORY_FEATURE, "hour")}), spec)  # fmt: skip
    expected = session.run(None, {i.name: per_row[i.name] for i in session.get_inputs()})[0]
    shared = {k: v[:1] for k, v in per_row.items() if k in ("user_context", "vm_history", "fm_codes", "fm_mask")}
    shared |= {"candidates": per_row["candidates"], "candidate_user": np.zeros(40, dtype=np.int64)}
    got = session.run(None, shared)[0]
    assert shared["fm_codes"].shape[0] == 1
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_training_and_serving_build_identical_inputs_for_the_same_user_state(trained_run, store, redis_url):
    """A historical row stamped after the last event sees the state `feast materialize` wrote
    to Redis; the trainer's frame_tensors and the server's Scorer must turn it into the same
    model inputs and the same score."""
    import asyncio

    import pandas as pd
    import redis.asyncio

    from loopfm.config import RunConfig
    from serving.scorer import Scorer

    paths, cfg = RunPaths(trained_run), RunConfig.load(trained_run)
    after_everything = pd.Timestamp(cfg.world.start_date, tz="UTC") + pd.Timedelta(days=cfg.world.n_days + 1)
    users, items = [3, 4, 5, 10**9], [801, 950, 10**9, 1100]
    entity = pd.DataFrame({"user_id": users, "item_id": items, "vertical": "shop", "hour": [1, 2, 3, 4],
                           "event_timestamp": after_everything})  # fmt: skip
    training = frame_tensors(historical_features(store, entity, "vm_loopfm_kd"), load_variant(paths, "loopfm_kd")[1])
    scorer = Scorer(paths.vm / "loopfm_kd" / "onnx")
    session = ort.InferenceSession(str(paths.vm / "loopfm_kd" / "onnx" / "model.onnx"))

    async def serve(user: int, item: int, hour: int):
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            return await scorer.score(client, user, [item], hour)

    for row, (user, item, hour) in enumerate(zip(users, items, [1, 2, 3, 4])):
        served = asyncio.run(serve(user, item, hour))
        expected = session.run(None, {n: training[n][row : row + 1] if n != "candidate_user" else np.zeros(1, np.int64)
                                      for n in scorer.inputs})[0]  # fmt: skip
        assert served.scores == pytest.approx(expected.tolist(), abs=1e-7), (user, item)


def test_recency_weights_reach_the_onnx_graph_and_the_server_s_scores(trained_run, store):
    """A VM that learned to ignore all but the newest history positions scores, through ONNX
    Runtime (what the server runs), exactly as in PyTorch, and differently from the same VM
    with flat recency weights."""
    import torch

    from loopfm.vm.export import onnx_bytes

    paths = RunPaths(trained_run)
    model, spec = load_variant(paths, "loopfm_kd")
    rows = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet").head(300), "vm_loopfm_kd")
    tensors = frame_tensors(rows, spec)
    names = json.loads((paths.vm / "loopfm_kd" / "onnx" / "model.json").read_text())["inputs"]
    inputs = {n: tensors[n] for n in names}

    def onnx_scores(recency: float) -> np.ndarray:
        with torch.no_grad():
            model.own_recency[:-2] = recency
            model.fm_recency[:-2] = recency
        session = ort.InferenceSession(onnx_bytes(model, inputs))
        return session.run(None, inputs)[0]

    newest_only = onnx_scores(-60.0)
    assert parity_check(model, onnx_bytes(model, inputs), inputs)["max_abs_diff"] <= PARITY_TOLERANCE
    assert np.abs(newest_only - onnx_scores(0.0)).max() > 1e-4
