"""Source ids end to end: a log whose users are 64-bit integers beyond 2**53 and whose items are
strings goes through import, FM, structuring, Feast (apply, materialize, historical and online
reads), VM training, export and a real uvicorn `/score`, keeping every id exactly as it came."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import redis.asyncio

from conftest import loopfm
from loopfm.core.config import RunConfig, DataConfig
from loopfm.contract.names import ENTITY_TYPES_FILE, ITEM_INDEX
from loopfm.contract.tensorize import TensorSpec, one_request_inputs
from loopfm.data.synth import simulate
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.data.event_files import IngestError, read_event_file
from loopfm.pipeline.services import start_server, stop_server
from serving.feast_layout import feature_refs, user_side_refs
from test_online_reader import reader_agrees_with_feast

BIG = 2**60  # float64 holds only every 256th integer here: 7-apart ids would merge through it
VARIANT = "loopfm_kd"


def user_source_id(dense: int) -> int:
    return BIG + 7 * dense


def item_source_id(dense: int) -> str:
    return f"sku-{dense:05d}"


def write_log(path: Path) -> Path:
    """A small synthetic world written as one CSV of the user's own ids: users BIG + 7k, items 'sku-k'."""
    t = simulate(DataConfig(n_users=300, n_days=12, seed=3, n_items_per_vertical=150))
    imp = t["impressions"].merge(t["users"], on="user_id").merge(t["items"].drop(columns="vertical"), on="item_id")
    pd.DataFrame({
        "uid": [user_source_id(u) for u in imp["user_id"]], "sku": [item_source_id(i) for i in imp["item_id"]],
        "clicked": imp["label"], "ts_us": imp["event_timestamp"].astype("int64"), "surface": imp["vertical"],
        "cat": imp["category"], "brand": imp["brand"], "price": imp["price"], "age_level": imp["age_bucket"],
        "gender": np.where(imp["gender"] == 1, "f", "m"),
    }).to_csv(path, index=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Imported, FM-logged, structured, applied and materialized into a private Valkey, one VM
    trained and exported: every stage by its CLI command."""
    from loopfm.pipeline.services import local_redis

    root = tmp_path_factory.mktemp("source_ids")
    run = root / "run"
    log = write_log(root / "log.csv")
    maps = ["user_id=uid", "item_id=sku", "label=clicked", "timestamp=ts_us", "category=cat", "brand=brand",
            "price=price", "age_level=age_level", "gender=gender"]  # fmt: skip
    with local_redis() as url:
        loopfm("data", "import", "--data", str(log), "--format", "csv", *[a for m in maps for a in ("--map", m)],
               "--time-unit", "us", "--vertical", "surface=shop", "--run-dir", str(run),
               "--set", "vm.epochs=2", "--set", "vm.history_length=10", "--set", "fm.code_dim=8",
               "--set", "fm.warmup_epochs=4", "--set", "fm.passes_per_day=1")  # fmt: skip
        for stage in (("fm", "train"), ("fm", "log"), ("features", "build")):
            loopfm(*stage, "--run-dir", str(run))
        loopfm("features", "apply", "--run-dir", str(run), "--redis-url", url)
        loopfm("vm", "train", "--run-dir", str(run), "--variant", "base", "--variant", VARIANT)  # every variant is compared with base
        loopfm("vm", "export", "--run-dir", str(run), "--variant", VARIANT)
        yield run, url


@pytest.fixture(scope="module")
def store(run):
    from loopfm.features.store import open_store

    run_dir, url = run
    return open_store(run_dir, url)


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    run_dir, url = run
    model_dir = tmp_path_factory.mktemp("model")
    shutil.copytree(RunPaths(run_dir).vm / VARIANT / "onnx", model_dir, dirs_exist_ok=True)
    proc, base = start_server(model_dir, url, model_dir / "server.log")
    yield base, model_dir
    stop_server(proc)


def known_ids(run_dir: Path) -> tuple[list[int], list[str]]:
    """Three users with clicks in the VM's vertical, and three of its items, as source ids."""
    entities = read_parquet(RunPaths(run_dir).features / "vm_eval_entities.parquet")
    users = entities.loc[entities["label"] == 1, "user_id"].drop_duplicates().head(3).tolist()
    return users, entities["item_id"].drop_duplicates().head(3).tolist()


def test_import_decides_each_entitys_type_and_keeps_the_ids_exactly(run):
    run_dir, _ = run
    paths = RunPaths(run_dir)
    users, items = read_parquet(paths.table("user_ids")), read_parquet(paths.table("item_ids"))
    assert users["source_id"].dtype == np.int64 and items["source_id"].dtype == object
    assert set(users["source_id"]) <= {user_source_id(u) for u in range(300)}  # exact: no id moved to a neighbour
    assert users["source_id"].is_unique and len(users) == len(read_parquet(paths.table("users")))
    assert set(items["source_id"]) <= {item_source_id(i) for i in range(450)} and items["source_id"].is_unique
    assert json.loads((paths.features / ENTITY_TYPES_FILE).read_text()) == {"user_id": "int64", "item_id": "string"}


def test_feast_sources_and_entity_rows_are_keyed_by_source_ids_with_the_dense_index_as_a_feature(run):
    run_dir, _ = run
    paths = RunPaths(run_dir)
    item_map = read_parquet(paths.table("item_ids")).set_index("item_id")["source_id"]
    item_features = read_parquet(paths.features / "item_features.parquet")
    assert (item_features["item_id"] == item_map.loc[item_features[ITEM_INDEX]].to_numpy()).all()
    for name in ("user_profile", "fm_history", "vm_click_history", "vm_train_entities"):
        assert (read_parquet(paths.features / f"{name}.parquet")["user_id"] > 2**53).all(), name
    assert read_parquet(paths.features / "vm_train_entities.parquet")["item_id"].str.startswith("sku-").all()


def test_the_registry_and_the_exported_model_carry_the_entity_types(run, store):
    run_dir, _ = run
    from feast import ValueType

    types = {e.join_key: e.value_type for e in store.list_entities()}
    assert types["user_id"] == ValueType.INT64 and types["item_id"] == ValueType.STRING
    meta = json.loads((RunPaths(run_dir).vm / VARIANT / "onnx" / "model.json").read_text())
    assert meta["entity_types"] == {"user_id": "int64", "item_id": "string"}
    assert ITEM_INDEX in meta["features"]["item_id"]["item_features"]
    assert meta["parity"]["requests"] > 0  # training and export read Feast's point-in-time join on these keys


def test_reader_equals_get_online_features_for_large_int_and_string_keys(run, store):
    run_dir, url = run
    users, items = known_ids(run_dir)
    reader_agrees_with_feast(lambda: redis.asyncio.Redis.from_url(url), store, [*users, BIG + 1],
                             items=[*items, "sku-none"], verticals=("target", "other"))  # fmt: skip


def _score(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/score", json=body, timeout=10)


def test_score_takes_the_source_ids_and_equals_an_offline_recomputation(run, store, server):
    run_dir, _ = run
    base, model_dir = server
    users, items = known_ids(run_dir)
    candidates = [*items, "sku-unknown"]
    r = _score(base, user_id=users[0], candidate_item_ids=candidates, context={"hour": 9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_known"] and body["unknown_candidates"] == ["sku-unknown"]  # as sent

    meta = json.loads((model_dir / "model.json").read_text())
    user_refs, user_row = user_side_refs(meta, users[0])
    user = store.get_online_features(features=user_refs, entity_rows=[user_row]).to_dict()
    item_rows = store.get_online_features(features=feature_refs(meta["features"]["item_id"]),
                                          entity_rows=[{"item_id": i} for i in candidates]).to_dict()  # fmt: skip
    assert item_rows[ITEM_INDEX][-1] is None and all(i is not None for i in item_rows[ITEM_INDEX][:-1])
    tensors = one_request_inputs(user, 9, item_rows, TensorSpec(**meta["spec"]))
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    expected = session.run(None, {i.name: tensors[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-6)

    neighbour = _score(base, user_id=users[0] + 1, candidate_item_ids=candidates, context={"hour": 9}).json()
    assert neighbour["user_known"] is False  # one apart beyond 2**53: another user, not the same one rounded


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"user_id": str(BIG), "candidate_item_ids": ["sku-00001"]}, "user_id: this model's user_id values are 64-bit integers"),
        ({"user_id": BIG, "candidate_item_ids": ["sku-00001", 7]}, "candidate_item_ids.1: this model's item_id values are strings"),
        ({"user_id": 2**63, "candidate_item_ids": ["sku-00001"]}, "less than or equal to 9223372036854775807"),
        ({"user_id": -(2**63) - 1, "candidate_item_ids": ["sku-00001"]}, "greater than or equal to -9223372036854775808"),
        ({"user_id": BIG, "candidate_item_ids": [""]}, "at least 1 character"),
        ({"user_id": BIG, "candidate_item_ids": [True]}, "valid string"),
    ],
)
def test_ids_of_the_wrong_type_or_range_get_a_422_with_the_reason(server, body, reason):
    base, _ = server
    r = _score(base, **body)
    assert r.status_code == 422, r.text
    assert reason in json.dumps(r.json()["detail"])


def test_the_load_generator_sends_the_runs_source_ids_and_the_server_answers_them(run, server):
    from loopfm.bench.loadtest import LoadSpec, request_bodies
    from loopfm.bench.serving import request_pool

    run_dir, _ = run
    base, _ = server
    bodies = [json.loads(b) for b in request_bodies(LoadSpec(rate=1, duration_s=1, candidates=5), request_pool(run_dir), 40, np.random.default_rng(0))]
    assert all(isinstance(b["user_id"], int) and b["user_id"] >= BIG for b in bodies)
    assert all(isinstance(i, str) and i.startswith("sku-") for b in bodies for i in b["candidate_item_ids"])
    assert all(httpx.post(f"{base}/score", json=b).status_code == 200 for b in bodies[:10])


def test_models_list_and_openapi_name_the_id_types(server):
    base, _ = server
    listed = httpx.get(f"{base}/models").json()
    assert next(iter(listed.values()))["entity_types"] == {"user_id": "int64", "item_id": "string"}
    schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]["ScoreRequest"]["properties"]
    kinds = {branch["type"] for branch in schema["user_id"]["anyOf"]}
    assert kinds == {"integer", "string"} and "entity_types" in schema["user_id"]["description"]


def test_an_events_file_keeps_source_ids_exactly_and_names_one_of_the_wrong_type(run, tmp_path):
    """`loopfm ingest` and `loopfm events publish` read ids as the run's source ids (a new one is
    a new user or item of the live loop, given its dense index by the worker)."""
    run_dir, _ = run
    users, items = known_ids(run_dir)
    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    batch = pd.DataFrame({"impression_id": [10**9, 10**9 + 1], "user_id": [str(users[0]), str(users[1] + 1)],
                          "item_id": [items[0], "sku-new"], "vertical": "target",
                          "event_timestamp": ["2026-12-01T00:00:00"] * 2, "label": [1, 0]})  # fmt: skip
    batch.to_csv(tmp_path / "batch.csv", index=False)
    events = read_event_file(tmp_path / "batch.csv", cfg, paths)
    assert events["user_id"].tolist() == [users[0], users[1] + 1]  # parsed exactly, beyond 2**53
    assert events["item_id"].tolist() == [items[0], "sku-new"]
    batch.assign(user_id=["u-1", str(users[1])]).to_csv(tmp_path / "typed.csv", index=False)
    with pytest.raises(IngestError, match=r"column 'user_id', row 1: not an integer"):
        read_event_file(tmp_path / "typed.csv", cfg, paths)
