"""Data-parallel FM training under torchrun (two gloo processes on this machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from conftest import loopfm, refusal
from loopfm.core.config import RunConfig
from loopfm.fm.train import checkpoint_path, parameter_digest
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths


def test_two_ranks_train_identical_replicas_and_the_log_runs(copy_of_run: Path):
    paths, cfg = RunPaths(copy_of_run), RunConfig.load(copy_of_run)
    single = torch.load(checkpoint_path(paths, cfg.world.n_days), weights_only=False)
    shutil.rmtree(paths.fm)
    cfg.override("fm.warmup_epochs=2")  # two epochs hold what one step does: the replicas stay equal
    cfg.save(copy_of_run)

    loopfm("fm", "train", "--run-dir", str(copy_of_run), "--nproc", "2")

    for index in range(cfg.fm.warmup_days, cfg.world.n_days + 1):  # every checkpoint, in the single-process format
        state = torch.load(checkpoint_path(paths, index), weights_only=False)
        assert state["trained_until_us"] == pd.Timestamp(cfg.world.start_date, tz="UTC").value // 1000 + index * 86_400_000_000
    report = json.loads((paths.fm / "distributed.json").read_text())
    assert report["world_size"] == 2
    assert report["rank_parameter_sha256"][0] == report["rank_parameter_sha256"][1] == report["checkpoint_sha256"]
    last = torch.load(checkpoint_path(paths, cfg.world.n_days), weights_only=False)
    assert parameter_digest(last["fm"], last["compressor"]) == report["checkpoint_sha256"]
    # half-size shards per rank change the arithmetic: not the single-process model, but trained
    assert parameter_digest(single["fm"], single["compressor"]) != report["checkpoint_sha256"]
    history = json.loads((paths.fm / "train_history.json").read_text())
    assert history["world_size"] == 2 and history["warmup"]["best_val_logloss"] < history["warmup"]["val_logloss"][0] or history["warmup"]["best_epoch"] == 1

    loopfm("fm", "log", "--run-dir", str(copy_of_run))
    log = read_parquet(paths.fm_log)
    assert len(log) == len(read_parquet(paths.table("impressions")))
    assert log["fm_code"].map(len).eq(cfg.fm.code_dim // 2).all()


def test_nproc_below_two_is_refused_by_name(built_run: Path):
    result = refusal("fm", "train", "--run-dir", str(built_run), "--nproc", "1")
    assert result.returncode != 0 and "--nproc" in result.stderr and "Traceback" not in result.stderr
