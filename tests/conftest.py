"""Shared fixtures: one small run built through the real CLI, a real Valkey server, a real
`feast apply` / `feast materialize`, trained and exported VMs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopfm.config import RunConfig
from loopfm.io import RunPaths

LOOPFM = str(Path(sys.executable).with_name("loopfm"))
# Small but complete: 3 verticals, enough days for warm-up, training and a held-out window.
# Logging delay 0 is the hardest case for point-in-time correctness (a code is available
# at the very second of its own event).
SMALL_WORLD = [
    "--users", "500", "--days", "14", "--seed", "7",
    "--set", "fm.warmup_days=5", "--set", "vm.eval_days=4", "--set", "vm.epochs=2",
    "--set", "fm.logging_delay_s=0", "--set", "vm.history_length=20", "--set", "fm.code_dim=16",
]  # fmt: skip


def loopfm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([LOOPFM, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"loopfm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def redis_url():
    from loopfm.redis_server import redis_url_or_local

    with redis_url_or_local() as url:
        yield url


@pytest.fixture(scope="session")
def built_run(tmp_path_factory) -> Path:
    """Synthetic world -> FM -> embedding log -> Feast sources, via the CLI."""
    run = tmp_path_factory.mktemp("run")
    loopfm("data", "synth", "--run-dir", str(run), *SMALL_WORLD)
    loopfm("fm", "train", "--run-dir", str(run))
    loopfm("fm", "log", "--run-dir", str(run))
    loopfm("features", "build", "--run-dir", str(run))
    return run


@pytest.fixture(scope="session")
def materialized_run(built_run: Path, redis_url: str) -> Path:
    loopfm("features", "apply", "--run-dir", str(built_run), "--redis-url", redis_url)
    return built_run


@pytest.fixture(scope="session")
def trained_run(materialized_run: Path) -> Path:
    loopfm("vm", "train", "--run-dir", str(materialized_run))
    for variant in ("base", "loopfm_kd"):
        loopfm("vm", "export", "--run-dir", str(materialized_run), "--variant", variant)
    return materialized_run


@pytest.fixture(scope="session")
def store(materialized_run: Path, redis_url: str):
    from loopfm.features.store import open_store

    return open_store(materialized_run, redis_url)


@pytest.fixture
def run_config(built_run: Path) -> RunConfig:
    return RunConfig.load(built_run)


@pytest.fixture
def paths(built_run: Path) -> RunPaths:
    return RunPaths(built_run)


@pytest.fixture
def copy_of_run(built_run: Path, tmp_path: Path) -> Path:
    """A private copy of the built run for tests that change artifacts."""
    dst = tmp_path / "run"
    shutil.copytree(built_run, dst)
    return dst
