"""Stages are atomic and idempotent: killed midway they leave the previous result whole; run
again on the same inputs they give the same offline and online state."""

from __future__ import annotations

import hashlib
import signal
import subprocess
from pathlib import Path

import redis

from conftest import LOOPFM, loopfm
from loopfm.config import RunConfig
from loopfm.io import RunPaths, staged_dir


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_staged_folder_has_the_mode_of_any_new_folder(tmp_path: Path):
    """Not mkdtemp's 0700: the compose materialize job reads the run as another uid."""
    plain = tmp_path / "plain"
    plain.mkdir()
    with staged_dir(tmp_path / "features") as new:
        (new / "table.parquet").write_bytes(b"")
    assert (tmp_path / "features").resolve().stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_features_build_killed_midway_leaves_the_previous_tables_whole(copy_of_run: Path):
    features = RunPaths(copy_of_run).features
    previous = folder_digest(features)
    cfg = RunConfig.load(copy_of_run)
    cfg.override("vm.history_length=7")  # every history table changes
    cfg.save(copy_of_run)

    build = subprocess.Popen([LOOPFM, "features", "build", "--run-dir", str(copy_of_run)], stdout=subprocess.PIPE, text=True)
    for line in build.stdout:
        if line.strip().startswith("wrote "):  # the first new table is on disk
            build.send_signal(signal.SIGKILL)
            break
    build.wait()
    assert build.returncode == -signal.SIGKILL
    assert folder_digest(features) == previous

    loopfm("features", "build", "--run-dir", str(copy_of_run))
    rebuilt = folder_digest(features)
    assert rebuilt.keys() == previous.keys() and rebuilt["fm_history.parquet"] != previous["fm_history.parquet"]
    loopfm("features", "build", "--run-dir", str(copy_of_run))
    assert folder_digest(features) == rebuilt  # same inputs, same bytes
    assert [p.name for p in copy_of_run.iterdir() if p.name.startswith(".features.v")] == [features.resolve().name]


def test_fm_logging_twice_gives_the_same_embedding_log(copy_of_run: Path):
    log = RunPaths(copy_of_run).fm_log
    first = hashlib.sha256(log.read_bytes()).hexdigest()
    loopfm("fm", "log", "--run-dir", str(copy_of_run))
    assert hashlib.sha256(log.read_bytes()).hexdigest() == first


def online_state(url: str) -> dict:
    client = redis.Redis.from_url(url)
    return {key: client.hgetall(key) for key in sorted(client.scan_iter(count=1000))}


def test_materializing_the_same_window_again_gives_the_same_online_state(trained_run: Path, private_redis):
    before = online_state(private_redis.url)
    assert len(before) > 1000
    loopfm("features", "apply", "--run-dir", str(trained_run), "--redis-url", private_redis.url)
    assert online_state(private_redis.url) == before
