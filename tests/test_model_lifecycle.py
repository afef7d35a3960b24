"""Model lifecycle: hot swap under load with no failed request, on one worker and on two
(real uvicorn processes); refusal of a model that does not fit, several models hosted by
name and admin access (the app in this process, FastAPI's TestClient, a real Valkey)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxruntime as ort

from conftest import app_client, loopfm
from loopfm.bench.serving import request_pool
from loopfm.core.config import RunConfig
from loopfm.contract.tensorize import TensorSpec, one_request_inputs
from loopfm.core.rundir import RunPaths
from loopfm.bench.loadtest import LoadSpec, run_load
from loopfm.pipeline.services import start_server, stop_server
from serving.feast_layout import feature_refs, user_side_refs

ADMIN = {"Authorization": "Bearer admin-s3cret"}
BODY = {"user_id": 3, "candidate_item_ids": [801, 802, 850], "context": {"hour": 9}}


def served_graph(model_dir: Path) -> Path:
    """The graph file the server loads: the export's optimised graph that model.json names."""
    return model_dir / json.loads((model_dir / "model.json").read_text())["optimized_graph"]["file"]


def halved_copy(src: Path, dst: Path) -> str:
    """A genuinely different model with the same inputs: the served graph with its score
    multiplied by 0.5, under a new version."""
    shutil.copytree(src, dst)
    model = onnx.load(served_graph(dst))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_full" if o == out else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    model.graph.node.append(helper.make_node("Mul", [f"{out}_full", "half"], [out]))
    onnx.save(model, served_graph(dst))
    meta = json.loads((dst / "model.json").read_text())
    meta["model_version"] += "-halved"
    (dst / "model.json").write_text(json.dumps(meta))
    return meta["model_version"]


def point(link: Path, target: Path) -> None:
    """Atomic symlink flip, as a deploy would do it."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


@pytest.fixture
def versions(trained_run: Path, tmp_path: Path) -> dict[str, Path]:
    exports = RunPaths(trained_run).vm
    v1 = tmp_path / "v1"
    shutil.copytree(exports / "loopfm_kd" / "onnx", v1)
    halved_copy(v1, tmp_path / "v2")
    mixed = tmp_path / "mixed"  # model.json of one export, the graph of another
    shutil.copytree(v1, mixed)
    shutil.copy(served_graph(exports / "base" / "onnx"), served_graph(mixed))
    garbage = tmp_path / "garbage"
    shutil.copytree(v1, garbage)
    served_graph(garbage).write_bytes(b"not an onnx graph")
    link = tmp_path / "current"
    link.symlink_to(v1)
    return {"v1": v1, "v2": tmp_path / "v2", "mixed": mixed, "garbage": garbage,
            "base": exports / "base" / "onnx", "current": link}  # fmt: skip


@pytest.fixture(scope="module")
def video_vm(trained_run: Path, tmp_path_factory) -> Path:
    """A VM for another vertical of the same world and FM: same FM history view, its own
    vertical's rows of the click-history view."""
    run = tmp_path_factory.mktemp("video") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("vm"))  # the shop VMs stay behind
    cfg = RunConfig.load(run)
    cfg.override("vm.target_vertical=video")
    cfg.save(run)
    loopfm("features", "build", "--run-dir", str(run))
    loopfm("vm", "train", "--run-dir", str(run), "--variant", "base")
    loopfm("vm", "export", "--run-dir", str(run), "--variant", "base")
    return RunPaths(run).vm / "base" / "onnx"


@pytest.fixture
def server(versions, video_vm, redis_url, tmp_path):
    env = {"LOOPFM_MODELS": f"shop={versions['current']},video={video_vm}", "LOOPFM_ADMIN_KEY": "admin-s3cret"}
    proc, url = start_server(versions["current"], redis_url, tmp_path / "server.log", env=env)
    yield url
    stop_server(proc)


@pytest.fixture
def app(versions, video_vm, redis_url):
    """The same models and admin key as `server`, the app in this process."""
    with app_client(models={"shop": versions["current"], "video": video_vm}, redis_url=redis_url, admin_key="admin-s3cret") as client:
        yield client


def swap_under_load(url: str, model: str, versions: dict[str, Path], run: Path) -> tuple[httpx.Response, dict]:
    """Point `model`'s link at v2 and reload it 1.5 s into 4 s of open-loop load at 80 req/s;
    return the reload's response and the load's report."""
    spec = LoadSpec(rate=80, duration_s=4.0, candidates=20, arrival="constant")
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(report=run_load(url, spec, request_pool(run))[0]))
    load.start()
    time.sleep(1.5)
    point(versions["current"], versions["v2"])
    swapped = httpx.post(f"{url}/admin/models/{model}/reload", headers=ADMIN, timeout=60)
    load.join()
    return swapped, result["report"]


def test_a_new_model_swaps_in_under_load_with_no_failed_request(server, versions, trained_run):
    before = httpx.post(f"{server}/score", json=BODY).json()
    swapped, report = swap_under_load(server, "shop", versions, trained_run)

    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["previous_version"] == before["model_version"]
    assert swapped.json()["model_version"] == before["model_version"] + "-halved"
    assert swapped.json()["other_workers"] == {"workers": {}, "unconfirmed": 0}  # one worker: nobody else to wait for
    assert report["errors"] == {} and report["ok"] == report["sent"] >= 300
    after = httpx.post(f"{server}/score", json=BODY).json()
    assert after["model_version"].endswith("-halved")
    np.testing.assert_allclose(after["scores"], np.array(before["scores"]) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    "target, reason",
    [
        ("base", "a model that changes its features"),
        ("mixed", "come from different exports"),
        ("garbage", "cannot load"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_and_the_old_one_keeps_serving(app, versions, target, reason):
    serving = app.post("/score", json=BODY).json()
    point(versions["current"], versions[target])
    refused = app.post("/admin/models/shop/reload", headers=ADMIN)
    assert refused.status_code == 409 and reason in refused.json()["detail"], refused.text
    assert serving["model_version"] in refused.json()["detail"]
    still = app.post("/score", json=BODY).json()
    assert still["model_version"] == serving["model_version"] and still["scores"] == serving["scores"]


def test_one_server_hosts_a_vm_per_vertical_each_reading_its_own_rows_and_the_shared_fm_view(app, video_vm, store):
    listed = app.get("/models").json()
    assert list(listed) == ["shop", "video"] and listed["shop"]["default"]
    assert listed["shop"]["feature_service"] == "vm_loopfm_kd" and listed["video"]["feature_service"] == "vm_base"
    default = app.post("/score", json=BODY).json()
    shop = app.post("/models/shop/score", json=BODY).json()
    video_items = [401, 402, 450]
    video = app.post("/models/video/score", json={**BODY, "candidate_item_ids": video_items}).json()
    assert default["scores"] == shop["scores"] and default["model_version"] == shop["model_version"]
    assert shop["model_version"].startswith("loopfm_kd-") and video["model_version"].startswith("base-")

    # The video VM read the user's *video* clicks: Feast's own read with its entity row agrees.
    meta = json.loads((video_vm / "model.json").read_text())
    refs, row = user_side_refs(meta, BODY["user_id"])
    assert row == {"user_id": BODY["user_id"], "vertical": "video"}
    user = store.get_online_features(features=refs, entity_rows=[row]).to_dict()
    items = store.get_online_features(features=feature_refs(meta["features"]["item_id"]),
                                      entity_rows=[{"item_id": i} for i in video_items]).to_dict()  # fmt: skip
    tensors = one_request_inputs(user, BODY["context"]["hour"], items, TensorSpec(**meta["spec"]))
    session = ort.InferenceSession(str(video_vm / "model.onnx"))
    expected = session.run(None, {i.name: tensors[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(video["scores"], expected, rtol=1e-6)

    missing = app.post("/models/cars/score", json=BODY)
    assert missing.status_code == 404 and "video" in missing.json()["detail"]
    assert app.get("/readyz").json()["models"] == {n: m["model_version"] for n, m in listed.items()}


def test_admin_endpoints_need_the_admin_key_and_are_closed_without_one(server, trained_run, redis_url, tmp_path):
    assert httpx.post(f"{server}/admin/models/shop/reload").status_code == 401
    wrong = httpx.post(f"{server}/admin/models/shop/reload", headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401
    assert httpx.post(f"{server}/admin/models/nope/reload", headers=ADMIN).status_code == 404
    with app_client(models={"default": RunPaths(trained_run).vm / "base" / "onnx"}, redis_url=redis_url) as no_admin:
        closed = no_admin.post("/admin/models/default/reload")
        assert closed.status_code == 403 and "LOOPFM_ADMIN_KEY" in closed.json()["detail"]
    assert "admin-s3cret" not in (tmp_path / "server.log").read_text()


def test_a_server_configured_with_a_refused_model_does_not_start(versions, redis_url, tmp_path):
    with pytest.raises(RuntimeError, match="server exited"):
        start_server(versions["mixed"], redis_url, tmp_path / "refused.log")
    assert "come from different exports" in (tmp_path / "refused.log").read_text()


def worker_versions(url: str, workers: int, model: str, within_s: float = 60.0) -> dict[str, str]:
    """{worker: version of `model`} from /readyz, each call on a new connection (the kernel
    hands it to one of the workers sharing the port), until `workers` workers have answered."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + within_s
    while len(seen) < workers and time.monotonic() < deadline:
        body = httpx.get(f"{url}/readyz").json()
        seen[body["worker"]] = body["models"][model]
        time.sleep(0.01)
    return seen


@pytest.fixture
def two_workers(versions, redis_url, tmp_path):
    env = {"LOOPFM_MODELS": f"twin={versions['current']}", "LOOPFM_ADMIN_KEY": "admin-s3cret"}
    proc, url = start_server(versions["current"], redis_url, tmp_path / "server.log", env=env, workers=2)
    yield url
    stop_server(proc)


def test_with_two_workers_a_reload_reaches_both_under_load_with_no_failed_request(two_workers, versions, trained_run):
    before = worker_versions(two_workers, 2, "twin")
    assert len(before) == 2 and len(set(before.values())) == 1, before
    new_version = json.loads((versions["v2"] / "model.json").read_text())["model_version"]
    swapped, report = swap_under_load(two_workers, "twin", versions, trained_run)

    assert swapped.status_code == 200, swapped.text
    body = swapped.json()
    other = next(w for w in before if w != body["worker"])
    assert body["model_version"] == new_version
    assert body["other_workers"] == {"workers": {other: {"previous_version": before[other], "model_version": new_version}},
                                     "unconfirmed": 0}  # fmt: skip
    assert report["errors"] == {} and report["ok"] == report["sent"] >= 300
    assert worker_versions(two_workers, 2, "twin") == {w: new_version for w in before}
