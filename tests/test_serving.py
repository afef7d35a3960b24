"""/score end to end: a real uvicorn process, a real Redis filled by `feast materialize`,
ONNX Runtime; the FM's artifacts deleted first."""

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from loopfm.contract.tensorize import one_request_inputs
from serving.feast_layout import feature_refs, user_side_refs
from loopfm.core.rundir import RunPaths
from loopfm.pipeline.services import start_server, stop_server

def test_serving_imports_no_torch_no_fm_and_no_feast_sdk():
    code = "import sys, serving.app, serving.scorer; print([m for m in sys.modules if m.split('.')[0] in ('torch', 'feast') or m.startswith(('loopfm.fm', 'loopfm.vm'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def server(trained_run, redis_url, tmp_path_factory):
    """The server runs from a copy of the model folder with the run's FM artifacts removed."""
    paths = RunPaths(trained_run)
    model_dir = tmp_path_factory.mktemp("model")
    shutil.copytree(paths.vm / "loopfm_kd" / "onnx", model_dir, dirs_exist_ok=True)
    hidden_fm = paths.root / "fm.hidden"
    paths.fm.rename(hidden_fm)  # every FM checkpoint and the embedding log are gone while serving
    try:
        proc, url = start_server(model_dir, redis_url, model_dir / "server.log")
        yield url, model_dir
        stop_server(proc)
    finally:
        hidden_fm.rename(paths.fm)


def _score(url, **body):
    return httpx.post(f"{url}/score", json=body, timeout=10)


def test_health_and_readiness(server):
    url, model_dir = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["ready"] and ready["model_version"] == json.loads((model_dir / "model.json").read_text())["model_version"]


def test_scores_come_back_in_candidate_order_and_equal_an_offline_recomputation(server, store):
    url, model_dir = server
    candidates = [801, 802, 850, 900, 1000]
    r = _score(url, user_id=3, candidate_item_ids=candidates, context={"hour": 9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_known"] and body["unknown_candidates"] == []
    assert body["model_version"].startswith("loopfm_kd-")
    assert body["feature_age_s"]["user_profile"] > 0
    reversed_body = _score(url, user_id=3, candidate_item_ids=candidates[::-1], context={"hour": 9}).json()
    assert reversed_body["scores"] == body["scores"][::-1]

    # Offline: Feast's own online read -> the shared tensorization -> ONNX Runtime.
    meta = json.loads((model_dir / "model.json").read_text())
    from loopfm.contract.tensorize import TensorSpec

    spec = TensorSpec(**meta["spec"])
    user_refs, user_row = user_side_refs(meta, 3)
    assert user_row == {"user_id": 3, "vertical": "shop"}
    user = store.get_online_features(features=user_refs, entity_rows=[user_row]).to_dict()
    item_refs = feature_refs(meta["features"]["item_id"])
    items = store.get_online_features(features=item_refs, entity_rows=[{"item_id": i} for i in candidates]).to_dict()
    tensors = one_request_inputs(user, 9, items, spec)
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    expected = session.run(None, {i.name: tensors[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-6)


def test_unknown_user_and_unknown_candidates_are_scored_and_reported(server):
    url, _ = server
    r = _score(url, user_id=-(2**63), candidate_item_ids=[801, 10**9, 5, -1], context={"hour": 1})  # any int64 is an id
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_known"] is False
    assert body["unknown_candidates"] == [10**9, -1]
    assert all(v is None for v in body["feature_age_s"].values())
    assert len(body["scores"]) == 4 and all(0 < s < 1 for s in body["scores"])


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": 1},
        {"user_id": 1, "candidate_item_ids": []},
        {"user_id": "x", "candidate_item_ids": [1]},
        {"user_id": -(2**63) - 1, "candidate_item_ids": [1]},
        {"user_id": "", "candidate_item_ids": [1]},
        {"user_id": 1, "candidate_item_ids": [1, "801"]},  # this model's items are int64 ids
        {"user_id": 1, "candidate_item_ids": [2**70]},
        {"user_id": 1, "candidate_item_ids": [1], "context": {"hour": 24}},
        {"user_id": 1, "candidate_item_ids": [1], "context": {"weather": "rain"}},
        {"user_id": 1, "candidate_item_ids": list(range(1001))},
        {"user_id": True, "candidate_item_ids": [1]},
        {"user_id": "7", "candidate_item_ids": [1]},
        {"user_id": 7.0, "candidate_item_ids": [1]},
        {"user_id": 7, "candidate_item_ids": [1], "context": {"hour": "3"}},
    ],
)
def test_malformed_requests_get_a_4xx_with_a_reason(server, body):
    url, _ = server
    r = _score(url, **body)
    assert r.status_code == 422
    assert r.json()["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": NaN, "candidate_item_ids": [1]}',
        b"[Infinity]",
        b'{"user_id": 1, "candidate_item_ids": [1], "context": {"hour": -Infinity}}',
        b'{"user_id": 1e400, "candidate_item_ids": [1]}',
        b'{"user_id": 1, "candidate_item_ids": [1, 123456789012345678901234567890]}',
        b'{"user_id": "\\ud800", "candidate_item_ids": [1]}',  # a lone surrogate: no UTF-8 text, no Redis key
        b'{"user_id": 1, "candidate_item_ids": [1], "\\udfff": 1}',
    ],
)
def test_non_finite_and_huge_numbers_get_a_422_with_a_reason_never_a_500(server, raw):
    """Python's JSON reader takes NaN, Infinity and 1e400 (as inf); the 422 body that echoes
    them must still be JSON."""
    url, _ = server
    r = httpx.post(f"{url}/score", content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    if b"Infinity" in raw or b"NaN" in raw or b"1e400" in raw:
        assert "not finite" in json.dumps(detail)


def test_a_corrupt_stored_value_is_read_as_missing_flagged_and_never_a_500(server, redis_url):
    import redis

    from serving.feast_layout import entity_key, feature_field

    url, _ = server
    client = redis.Redis.from_url(redis_url)
    key, field = entity_key(("user_id",), (11,), "loopfm"), feature_field("fm_history", "fm_codes")
    original = client.hget(key, field)
    client.hset(key, field, b"\x0a\x05ab")  # says 5 bytes follow, holds 2
    try:
        r = _score(url, user_id=11, candidate_item_ids=[801, 802], context={"hour": 2})
        assert r.status_code == 200, r.text
        assert r.json()["corrupt_values"] == 1 and r.json()["user_known"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "loopfm_corrupt_values_total 1.0" in metrics
    finally:
        client.hset(key, field, original)


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or
                      line.startswith(name + "{")))  # fmt: skip


def test_metrics_count_latency_feature_reads_model_time_candidates_and_cache_hits(server):
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    for _ in range(3):
        _score(url, user_id=3, candidate_item_ids=[1801, 1802, 1803], context={"hour": 9})  # unseen ids: first misses
    _score(url, user_id=3, candidate_item_ids=[1], context={"hour": 99})  # a 422
    after = httpx.get(f"{url}/metrics").text
    for name in ("loopfm_feature_read_seconds_count", "loopfm_model_seconds_count", "loopfm_candidates_count"):
        assert _metric(after, name) - _metric(before, name) == 3, name
    assert _metric(after, 'loopfm_candidates_sum') - _metric(before, 'loopfm_candidates_sum') == 9
    assert 'loopfm_responses_total{path="/score",status="422"}' in after
    assert "loopfm_feature_age_seconds_bucket" in after
    assert 0 < _metric(after, "loopfm_item_cache_hit_ratio") < 1


def test_the_feast_sdk_baseline_of_the_benchmark_scores_exactly_like_loopfm(server, trained_run, redis_url, monkeypatch):
    """The baseline app (what the benchmark serves with uvicorn) in this process: its scores are the subject."""
    from fastapi.testclient import TestClient

    from loopfm.bench.feast_sdk_app import create_app

    url, model_dir = server
    for name, value in (("LOOPFM_MODEL_DIR", model_dir), ("LOOPFM_RUN_DIR", trained_run), ("REDIS_URL", redis_url)):
        monkeypatch.setenv(name, str(value))
    body = {"user_id": 4, "candidate_item_ids": [801, 5, 10**9, 1100], "context": {"hour": 7}}
    with TestClient(create_app()) as sdk:
        ours, theirs = _score(url, **body).json(), sdk.post("/score", json=body).json()
    np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-6)


def test_an_api_key_guards_score_and_metrics_and_oversized_bodies_get_413(trained_run, redis_url, tmp_path):
    key = "s3cret-key-value"
    log = tmp_path / "guarded.log"
    proc, url = start_server(RunPaths(trained_run).vm / "base" / "onnx", redis_url, log,
                             env={"LOOPFM_API_KEY": key, "LOOPFM_MAX_BODY_BYTES": "4096"})  # fmt: skip
    body = {"user_id": 3, "candidate_item_ids": [801, 802]}
    try:
        assert httpx.post(f"{url}/score", json=body).status_code == 401
        assert httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{url}/score", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.post(f"{url}/score", json=body, headers={"X-API-Key": key}).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
        big = {"user_id": 3, "candidate_item_ids": [801] * 1100}  # ~4.4 KB of compact JSON
        r = httpx.post(f"{url}/score", json=big, headers={"X-API-Key": key})
        assert r.status_code == 413 and "4096" in r.json()["detail"]
        chunks = (b'{"user_id": 3, "candidate_item_ids": [' + b"801," * 2000 + b"801]}",)
        r = httpx.post(f"{url}/score", content=iter(chunks), headers={"X-API-Key": key})  # chunked: no length
        assert r.status_code == 413
    finally:
        stop_server(proc)
    assert key not in log.read_text()
