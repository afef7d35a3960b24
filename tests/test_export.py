"""ONNX export: ONNX Runtime agrees with PyTorch, and a request's history is passed once."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from loopfm.core.config import ENCODERS
from loopfm.contract.names import FM_HISTORY_FEATURE, USER_FEATURES, VM_COUNT_FEATURES, VM_HISTORY_FEATURE
from loopfm.features.store import historical_features
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.vm.export import OPTIMIZED_GRAPH, PARITY_TOLERANCE, onnx_bytes, optimized_graph, parity_check
from loopfm.vm.train import frame_tensors, load_variant

NO_OPTIMISATION = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def _eval_inputs(paths: RunPaths, store, spec, rows: int | None = None) -> dict[str, np.ndarray]:
    entities = read_parquet(paths.features / "vm_eval_entities.parquet")
    frame = historical_features(store, entities if rows is None else entities.head(rows), "vm_loopfm_kd")
    return frame_tensors(frame, spec)


def _untrained_model(paths: RunPaths, encoder: str):
    """loopfm_kd's shapes with `encoder`, parameters drawn from N(0, 0.2²) and the attention
    scorers' from N(0, 1): scores spread out and attention far from uniform, so a graph that
    dropped a term would score differently. The recency log-weights and slopes keep their
    prior: a slope drawn from N(0, 0.2²) times 49 steps back weighs positions by up to e^±10,
    and the sum encoder's logits (several hundred) saturate every score to one value (the
    recency terms' own check: test_every_encoder_s_recency_weights_are_in_the_onnx_graph)."""
    import torch

    from loopfm.vm.model import VerticalModel

    trained, spec = load_variant(paths, "loopfm_kd")
    torch.manual_seed(0)
    model = VerticalModel(replace(trained.shapes, encoder=encoder)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "recency" not in name and "slope" not in name:
                parameter.normal_(0.0, 1.0 if "attention" in name else 0.2)
    return model, spec


def _scores(graph: bytes, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """ONNX Runtime's scores for `graph` as it is, no optimisation at load: one call when
    `inputs` are one request (one user row), else each row as its own one-candidate request."""
    options = ort.SessionOptions()
    options.graph_optimization_level = NO_OPTIMISATION
    session = ort.InferenceSession(graph, options)
    names = [i.name for i in session.get_inputs()]
    if len(inputs["user_context"]) == 1:
        return session.run(None, {n: inputs[n] for n in names})[0]
    return np.concatenate([session.run(None, {n: inputs[n][i : i + 1] for n in names})[0] for i in range(len(inputs["candidates"]))])


def test_onnx_matches_pytorch_on_at_least_1000_real_rows(trained_run, store):
    paths = RunPaths(trained_run)
    for variant in ("base", "loopfm_kd"):
        model, spec = load_variant(paths, variant)
        meta = json.loads((paths.vm / variant / "onnx" / "model.json").read_text())
        rows = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), f"vm_{variant}")
        tensors = frame_tensors(rows, spec)
        parity = parity_check(model, (paths.vm / variant / "onnx" / "model.onnx").read_bytes(),
                              {n: tensors[n] for n in meta["inputs"]})  # fmt: skip
        assert parity["requests"] >= 256 and parity["candidates"] >= 1000
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
    names = [i.name for i in session.get_inputs()]
    assert "candidate_user" not in names  # the graph scores one user per request
    expected = np.concatenate([session.run(None, {n: per_row[n][i : i + 1] for n in names})[0] for i in range(40)])
    shared = {k: v[:1] for k, v in per_row.items() if k in ("user_context", "vm_history", "fm_codes", "fm_mask")}
    got = session.run(None, shared | {"candidates": per_row["candidates"]})[0]
    assert shared["fm_codes"].shape[0] == 1
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_training_and_serving_build_identical_inputs_for_the_same_user_state(trained_run, store, redis_url):
    """A historical row stamped after the last event sees the state `feast materialize` wrote
    to Redis; the trainer's frame_tensors and the server's Scorer must turn it into the same
    model inputs and the same score."""
    import asyncio

    import pandas as pd
    import redis.asyncio

    from loopfm.core.config import RunConfig
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
        expected = session.run(None, {n: training[n][row : row + 1] for n in scorer.inputs})[0]
        assert served.scores == pytest.approx(expected.tolist(), abs=1e-7), (user, item)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("candidates", [1, 1000])
def test_every_encoder_exports_with_parity_for_one_user_and_1_or_1000_candidates(trained_run, store, encoder, candidates):
    """The serving layout: one user (a full FM history) scored against many candidates in one
    call; ONNX Runtime, on the traced and on the export-optimised graph, agrees with PyTorch."""
    import torch

    paths = RunPaths(trained_run)
    model, spec = _untrained_model(paths, encoder)
    rows = _eval_inputs(paths, store, spec, rows=300)
    user = int(rows["fm_mask"].sum(1).argmax())
    assert rows["fm_mask"][user].all()
    request = {k: rows[k][user : user + 1] for k in ("user_context", "vm_history", "fm_codes", "fm_mask")}
    request |= {"candidates": np.resize(rows["candidates"], (candidates, rows["candidates"].shape[1])),
                "candidate_user": np.zeros(candidates, dtype=np.int64)}  # fmt: skip
    graph = onnx_bytes(model, rows)
    with torch.no_grad():
        expected = torch.sigmoid(model(**{k: torch.from_numpy(v) for k, v in request.items()})[0]).numpy()
    for scores in (_scores(graph, request), _scores(optimized_graph(graph), request)):
        assert scores.shape == (candidates,)
        np.testing.assert_allclose(scores, expected, atol=PARITY_TOLERANCE)
    if candidates > 1:
        assert np.ptp(expected) > 1e-3  # candidates score differently: the comparison has something to compare


@pytest.mark.parametrize("by", ["position", "slope"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_s_recency_weights_are_in_the_onnx_graph(trained_run, store, encoder, by):
    """Dropping old positions by recency (per-position weights, or the learned slope) changes
    ONNX Runtime's scores, and they still equal PyTorch's: the learned weights travel inside
    the graph."""
    import torch

    paths = RunPaths(trained_run)
    model, spec = _untrained_model(paths, encoder)
    inputs = _eval_inputs(paths, store, spec, rows=300)
    flat = _scores(onnx_bytes(model, inputs), inputs)
    with torch.no_grad():
        for history in ("own", "fm"):
            if by == "position":
                getattr(model, f"{history}_recency")[:-2] = -60.0
            else:
                getattr(model, f"{history}_slope").fill_(60.0)
    newest_only = onnx_bytes(model, inputs)
    assert parity_check(model, newest_only, inputs)["max_abs_diff"] <= PARITY_TOLERANCE
    assert np.abs(_scores(newest_only, inputs) - flat).max() > 1e-4


def test_the_export_ships_an_optimised_graph_that_scores_like_the_traced_one(trained_run, store):
    """`loopfm vm export` saves ONNX Runtime's optimised graph beside model.onnx; on every eval
    row, both loaded without further optimisation, the two give the same scores."""
    import onnx

    paths = RunPaths(trained_run)
    onnx_dir = paths.vm / "loopfm_kd" / "onnx"
    meta = json.loads((onnx_dir / "model.json").read_text())
    assert meta["optimized_graph"]["file"] == OPTIMIZED_GRAPH and meta["optimized_graph"]["level"] == "extended"
    assert meta["optimized_graph"]["parity"]["max_abs_diff"] <= PARITY_TOLERANCE
    traced, optimized = (onnx_dir / "model.onnx").read_bytes(), (onnx_dir / OPTIMIZED_GRAPH).read_bytes()
    assert len(onnx.load_from_string(optimized).graph.node) < len(onnx.load_from_string(traced).graph.node)
    inputs = {n: v for n, v in _eval_inputs(paths, store, load_variant(paths, "loopfm_kd")[1]).items() if n in meta["inputs"]}
    assert len(inputs["candidates"]) >= 1000
    np.testing.assert_allclose(_scores(optimized, inputs), _scores(traced, inputs), atol=PARITY_TOLERANCE)


def test_the_server_loads_the_optimised_graph_without_optimising_it_again(trained_run, tmp_path):
    import shutil

    from serving.models import ModelRefused, ModelRegistry
    from serving.scorer import Scorer

    onnx_dir = tmp_path / "model"
    shutil.copytree(RunPaths(trained_run).vm / "loopfm_kd" / "onnx", onnx_dir)
    scorer = Scorer(onnx_dir)
    assert scorer.session.get_session_options().graph_optimization_level == NO_OPTIMISATION
    assert scorer.large_session.get_session_options().graph_optimization_level == NO_OPTIMISATION
    (onnx_dir / OPTIMIZED_GRAPH).unlink()
    with pytest.raises(ModelRefused, match=OPTIMIZED_GRAPH):
        ModelRegistry({"default": onnx_dir}, Scorer)


def test_a_model_of_another_format_version_is_refused_naming_what_to_re_run(trained_run, tmp_path):
    """model.pt and model.json carry FORMAT_VERSION; an older file is never read with guessed defaults."""
    import shutil

    import torch

    from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION, FormatError
    from serving.scorer import Scorer

    paths = RunPaths(trained_run)
    onnx_dir = Path(shutil.copytree(paths.vm / "loopfm_kd" / "onnx", tmp_path / "onnx"))
    meta = json.loads((onnx_dir / "model.json").read_text())
    assert meta[FORMAT_KEY] == FORMAT_VERSION
    (onnx_dir / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != FORMAT_KEY}))
    with pytest.raises(FormatError, match="loopfm vm export"):
        Scorer(onnx_dir)
    old = RunPaths(tmp_path / "run")
    (old.vm / "base").mkdir(parents=True)
    state = torch.load(paths.vm / "base" / "model.pt", weights_only=False)
    torch.save({**state, FORMAT_KEY: FORMAT_VERSION + 1}, old.vm / "base" / "model.pt")
    with pytest.raises(FormatError, match="loopfm vm train --variant base"):
        load_variant(old, "base")
