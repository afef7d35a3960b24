"""FM logging and structuring as Ray Data jobs (local Ray) write the same tables as the
local path on the same run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from loopfm.core.config import RunConfig
from loopfm.distributed.ray_jobs import RAY
from loopfm.features.build import build_feature_tables
from loopfm.fm.log import log_embeddings
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths

TABLES = ("user_profile", "item_features", "vm_click_history", "fm_history", "vm_train_entities", "vm_eval_entities")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")
    yield
    ray.shutdown()


def test_ray_jobs_write_the_local_paths_tables(local_ray, built_run: Path, copy_of_run: Path):
    local, on_ray = RunPaths(built_run), RunPaths(copy_of_run)
    cfg = RunConfig.load(copy_of_run)
    on_ray.fm_log.unlink()
    shutil.rmtree(on_ray.features)  # the copy holds real folders (copytree follows the link)

    log_embeddings(on_ray, cfg, progress=False, engine=RAY)
    pd.testing.assert_frame_equal(read_parquet(on_ray.fm_log), read_parquet(local.fm_log))

    build_feature_tables(on_ray, cfg, progress=lambda *_: None, engine=RAY)
    for name in TABLES:
        pd.testing.assert_frame_equal(read_parquet(on_ray.features / f"{name}.parquet"), read_parquet(local.features / f"{name}.parquet"))
    assert read_parquet(on_ray.features / "fm_history.parquet")["user_id"].nunique() > 100  # many users, many shards
