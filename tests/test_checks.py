"""Every command checks what it needs before it starts anything (loopfm/pipeline/checks.py;
docs/getting-started.md, "What each command checks first"): a refused command exits 2 with
one line naming the flag, file or stage, starts no server and leaves the run as it was."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from conftest import SMALL_WORLD, loopfm, refusal
from loopfm.core.rundir import RunPaths
from loopfm.pipeline.services import free_port, start_server, stop_server


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path below `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def refused(*args: str) -> str:
    """Run a command that must be refused (in this process: conftest.refusal); its stderr."""
    r = refusal(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "error: " in r.stderr, r.stderr
    assert "started a local" not in r.stdout  # no Valkey, no server
    return r.stderr


@pytest.fixture
def finished_run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of a finished run (data, FM, features, registry, VMs, exports)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    return run


def remove(path: Path) -> None:
    """A file, a folder, or a staged folder's link (loopfm.core.files.staged_dir)."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@pytest.mark.parametrize(
    "args, missing, named",
    [
        (("fm", "train"), "data/impressions.parquet", "loopfm data synth|import"),
        (("fm", "log"), "fm/checkpoints", "loopfm fm train"),
        (("features", "build"), "fm/fm_event_embeddings.parquet", "loopfm fm log"),
        (("features", "apply", "--redis-url", "redis://127.0.0.1:1"), "features", "loopfm features build"),
        (("vm", "train", "--variant", "loopfm_kd"), "registry.db", "loopfm features apply"),
        (("vm", "export", "--variant", "base"), "vm/base/model.pt", "loopfm vm train --variant base"),
        (("serve", "--port", "PORT"), "vm/loopfm_kd/onnx/model.onnx", "loopfm vm export --variant loopfm_kd"),
        (("loadtest",), "vm/loopfm_kd/onnx/model.onnx", "loopfm vm export --variant loopfm_kd"),
        (("bench", "serving", "--out", "OUT"), "vm/loopfm_kd/onnx/model.onnx", "loopfm vm export --variant loopfm_kd"),
    ],
)
def test_a_command_whose_earlier_stage_is_missing_is_refused_first_naming_the_stage(finished_run, tmp_path, args, missing, named):
    remove(finished_run / missing)
    before = snapshot(finished_run)
    args = tuple({"OUT": str(tmp_path / "out"), "PORT": str(free_port())}.get(a, a) for a in args)
    message = refused(*args, "--run-dir", str(finished_run))
    assert missing.split("/")[-1] in message and f"run `{named}" in message
    assert snapshot(finished_run) == before and not (tmp_path / "out").exists()


def test_vm_train_of_a_variant_without_the_base_vm_is_refused_before_training(finished_run):
    """Every row of the quality table is compared with the base VM: without its predictions a
    training would end in a refusal, so it is refused at the start."""
    remove(finished_run / "vm" / "base")
    before = snapshot(finished_run)
    message = refused("vm", "train", "--variant", "loopfm_kd", "--run-dir", str(finished_run))
    assert "add --variant base" in message
    assert snapshot(finished_run) == before


def test_a_variant_trained_beside_the_base_vm_passes_the_check(finished_run):
    from argparse import Namespace

    from loopfm.pipeline.checks import vm_train

    remove(finished_run / "vm" / "base")
    vm_train(Namespace(run_dir=finished_run, variant=["loopfm_kd", "base"]))
    vm_train(Namespace(run_dir=finished_run, variant=None))  # all four


def test_serve_on_a_port_in_use_is_refused_on_the_console_before_valkey_starts(trained_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = refused("serve", "--run-dir", str(trained_run), "--port", str(port))
    assert f"--port {port}: 127.0.0.1:{port} is in use" in message


def test_features_apply_to_a_redis_that_does_not_answer_is_refused_before_feast_runs(finished_run):
    remove(finished_run / "registry.db")
    before = snapshot(finished_run)
    message = refused("features", "apply", "--run-dir", str(finished_run), "--redis-url", f"redis://127.0.0.1:{free_port()}")
    assert message.startswith("loopfm: error: cannot reach Redis at redis://127.0.0.1:") and "(given by --redis-url)" in message
    assert snapshot(finished_run) == before  # no registry written


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--rate", "0"), ("--rate", "-5"), ("--rate", "fast"), ("--duration", "0"), ("--duration", "-1"),
        ("--duration", "nan"), ("--candidates", "0"), ("--candidates", "-3"), ("--candidates", "1.5"),
        ("--hot-fraction", "1.5"), ("--timeout", "0"), ("--sweep", "100,0"), ("--sweep", "100,x"),
        ("--p99-bound-ms", "-1"),
    ],
)  # fmt: skip
def test_a_load_test_with_a_value_out_of_range_is_refused_naming_the_flag(trained_run, tmp_path, flag, value):
    message = refused("loadtest", "--run-dir", str(trained_run), "--out", str(tmp_path / "out"), flag, value)
    assert flag in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [("bench", "serving", "--duration", "-2"), ("serve", "--port", "70000"), ("demo", "--requests", "0")])
def test_other_counts_durations_and_ports_out_of_range_are_refused_naming_the_flag(tmp_path, args):
    assert args[-2] in refused(*args, "--run-dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_load_test_against_a_server_wanting_an_api_key_sends_it_and_fails_without_it(trained_run, redis_url, tmp_path):
    key = "load-test-key"
    proc, url = start_server(RunPaths(trained_run).vm / "base" / "onnx", redis_url, tmp_path / "server.log", env={"LOOPFM_API_KEY": key})
    try:
        args = ("loadtest", "--run-dir", str(trained_run), "--url", url, "--rate", "20", "--duration", "0.5")
        message = refused(*args, "--out", str(tmp_path / "without"))
        assert "warm-up: none of" in message and "http_401" in message and "--api-key" in message
        assert not (tmp_path / "without").exists()  # refused after the warm-up, before the measured run
        r = loopfm(*args, "--out", str(tmp_path / "with"), "--api-key", key)
        assert '"ok": ' in r.stdout and '"errors": {}' in r.stdout
        assert key not in (tmp_path / "with" / "loadtest.json").read_text()
    finally:
        stop_server(proc)


def test_synth_refuses_a_world_whose_vm_window_has_one_class_naming_the_settings(tmp_path):
    run = tmp_path / "run"
    tiny = [a if a != "500" else "2" for a in SMALL_WORLD]  # two users: the shop vertical gets no click
    message = refused("data", "synth", "--run-dir", str(run), *tiny, "--impressions-per-user-day", "1")
    assert "needs clicks and non-clicks there" in message and "fm.warmup_days" in message and "--users" in message
    assert not run.exists()


@pytest.mark.parametrize("days", ["-10", "0"])
def test_an_import_spread_over_no_days_or_negative_ones_is_refused(tmp_path, days):
    message = refused("data", "import", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path), "--format", "taobao",
                      "--vertical", "pid=430548_1007", "--days", days)  # fmt: skip
    assert "--days" in message and not (tmp_path / "run").exists()


def test_an_import_into_a_finished_run_removes_the_stages_built_on_the_old_data_and_says_so(finished_run, tmp_path):
    """Also the live loop's rows (stream/): events of the old data set, under its ids, which the
    next `features build` would otherwise join to the new data."""
    import pyarrow as pa

    from loopfm.data import streamed
    from loopfm.core.files import read_parquet
    from test_importers import taobao_world

    paths = RunPaths(finished_run)
    old_rows = pa.Table.from_pandas(read_parquet(paths.table("impressions")).head(5), preserve_index=False)
    assert streamed.append(paths, streamed.IMPRESSIONS, old_rows, 1, "worker").exists()  # as a worker writes them
    args = ("--run-dir", str(finished_run))
    r = loopfm("data", "import", *args, "--data", str(taobao_world(tmp_path / "taobao")), "--format", "taobao",
               "--vertical", "pid=430548_1007")  # fmt: skip
    assert "removed fm, features, vm, results, stream, registry.db" in r.stdout
    assert not [name for name in ("fm", "features", "vm", "results", "stream", "registry.db") if (finished_run / name).exists()]
    assert "run `loopfm fm log" in refused("features", "build", *args)  # not a build on the old FM's codes
    assert "run `loopfm features build" in refused("vm", "train", *args)


def test_a_second_demo_in_the_same_run_starts_from_a_new_world_without_the_first_ones_streamed_events(copy_of_run, run_config):
    """The first demo's live burst leaves streamed impressions in the run (stream/); read with
    the second demo's world they were impressions without truth, and evaluation stopped."""
    import pyarrow as pa

    from loopfm.data import streamed
    from loopfm.core.files import read_parquet
    from loopfm.pipeline.demo import new_world

    paths = RunPaths(copy_of_run)
    rows = pa.Table.from_pandas(read_parquet(paths.table("impressions")).head(5), preserve_index=False)
    assert streamed.append(paths, streamed.IMPRESSIONS, rows, 1, "worker").exists()
    counts = new_world(copy_of_run, run_config)
    assert not streamed.root(paths).exists() and not paths.features.exists() and not paths.fm.exists()
    assert len(read_parquet(paths.table("impressions"))) == counts["impressions"] == counts["truth"]


def test_serve_refuses_a_model_of_another_format_version_before_starting_anything(finished_run):
    import json

    from loopfm.contract.version import FORMAT_KEY

    meta_path = finished_run / "vm" / "loopfm_kd" / "onnx" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != FORMAT_KEY}))
    message = refused("serve", "--run-dir", str(finished_run), "--port", str(free_port()))
    assert f"{meta_path} has format version none" in message and "loopfm vm export --variant loopfm_kd" in message
