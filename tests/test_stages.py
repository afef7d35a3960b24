"""Stages are atomic and idempotent: killed midway they leave the previous result whole; run
again on the same inputs they give the same offline and online state."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import redis

from conftest import LOOPFM, loopfm, refusal
from loopfm.core.config import RunConfig
from loopfm.core.files import remove_staged, staged_dir
from loopfm.core.rundir import RunPaths


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_staged_folder_has_the_mode_of_any_new_folder(tmp_path: Path):
    """Not mkdtemp's 0700: the compose materialize job reads the run as another uid."""
    plain = tmp_path / "plain"
    plain.mkdir()
    with staged_dir(tmp_path / "features") as new:
        (new / "table.parquet").write_bytes(b"")
    assert (tmp_path / "features").resolve().stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_removing_a_staged_folder_removes_its_versions_and_its_link(tmp_path: Path):
    """The experiment runner drops each world's FM checkpoints this way once they are logged:
    a removal that left the version folder behind kept about 0.9 GB per Ciao world."""
    for n in range(2):
        with staged_dir(tmp_path / "checkpoints") as new:
            (new / f"day{n}.pt").write_bytes(b"x" * 1000)
    (tmp_path / ".checkpoints.v1.1").mkdir()  # as a killed run leaves one
    (tmp_path / "other").mkdir()
    remove_staged(tmp_path / "checkpoints")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    remove_staged(tmp_path / "checkpoints")  # nothing there: nothing to do


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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_during_features_build_is_one_line_naming_the_file_and_keeps_the_tables(copy_of_run, monkeypatch, capsys, code):
    from loopfm.pipeline.cli import main

    features = RunPaths(copy_of_run).features
    previous, folders = folder_digest(features), sorted(copy_of_run.iterdir())
    to_parquet = pd.DataFrame.to_parquet
    written: list = []

    def fills_up(df, path, **kwargs):  # the first table fits, then the disk is full (pyarrow's error names no file)
        if written:
            raise OSError(code, "Error writing bytes to file")
        written.append(path)
        return to_parquet(df, path, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fills_up)
    assert main(["features", "build", "--run-dir", str(copy_of_run)]) == 2
    err = capsys.readouterr().err
    staged = re.escape(str(copy_of_run)) + r"/\.features\.v[\d.]+/\w+\.parquet"
    assert re.fullmatch(rf"loopfm: error: cannot write {staged} \({re.escape(os.strerror(code))}; it keeps its previous "
                        r"content\): make room there, or write elsewhere, and run this again\n", err), err  # fmt: skip
    assert folder_digest(features) == previous
    assert sorted(copy_of_run.iterdir()) == folders and not list(copy_of_run.rglob("*.tmp"))  # no half-written folder


def test_a_killed_fm_train_leaves_the_previous_checkpoints_whole_and_fm_log_refuses_a_stale_or_mixed_set(copy_of_run):
    paths = RunPaths(copy_of_run)
    checkpoints = paths.fm / "checkpoints"
    previous = folder_digest(checkpoints)
    copied = set(paths.fm.glob(".checkpoints.v*"))  # the copy of the built run's own version folder
    train = subprocess.Popen([LOOPFM, "fm", "train", "--run-dir", str(copy_of_run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (staged := [d for d in set(paths.fm.glob(".checkpoints.v*")) - copied if len(list(d.glob("ckpt_*.pt"))) >= 2]):
        assert train.poll() is None and time.monotonic() < deadline, "fm train ended before it could be killed"
        time.sleep(0.05)  # until two new checkpoints are written
    train.send_signal(signal.SIGKILL)
    train.wait()
    assert folder_digest(checkpoints) == previous  # the previous training, whole: never a mix
    loopfm("fm", "log", "--run-dir", str(copy_of_run))

    other = staged[0] / "ckpt_005.pt"  # a checkpoint of the killed training
    own = (checkpoints / "ckpt_005.pt").read_bytes()
    shutil.copy(other, checkpoints / "ckpt_005.pt")
    r = refusal("fm", "log", "--run-dir", str(copy_of_run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{checkpoints / 'ckpt_005.pt'} is not of the training {checkpoints / 'training.json'} records" in r.stderr
    (checkpoints / "ckpt_005.pt").write_bytes(own)

    # Data changed under the checkpoints (`data synth|import` would remove them with the other
    # stages built on the old data; a hand-edited table does not).
    table = paths.table("impressions")
    pd.read_parquet(table).iloc[1:].to_parquet(table)
    r = refusal("fm", "log", "--run-dir", str(copy_of_run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"the FM checkpoints in {checkpoints} were trained on other data than {paths.data} holds now: re-run "
            "`loopfm fm train`, then `loopfm fm log`") in r.stderr  # fmt: skip
