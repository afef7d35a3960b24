"""A finished run mounted read-only (docker-compose.yml) for a user who does not own it: every
command that only reads a run works there, and a command that writes it is refused before any
work, naming the path and the fix.

As root the commands run as uid 65534 (nobody) through setpriv, keeping only
CAP_DAC_READ_SEARCH: the interpreter may sit under a folder nobody cannot search (/root), and
what is checked is writing, which that capability does not allow. The run itself sits where
any user may read it, as a run mounted into a container does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis

from loopfm.contract.names import PROJECT, ready_marker
from loopfm.pipeline.services import free_port
from tests.conftest import LOOPFM

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]  # fmt: skip


def as_user(*args: str) -> list[str]:
    """`loopfm ARGS` as a user who owns nothing here: nobody when we are root, else ourselves."""
    if os.getuid() != 0:
        return [LOOPFM, *args]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): no way to run a command as another user")
    return [*AS_NOBODY, LOOPFM, *args]


def user_env(**extra: str) -> dict[str, str]:
    # Feast's metrics module, once imported by this test process, points these at a folder of
    # ours (root's, mode 0700) that another user cannot write: a user's shell has none of them.
    dropped = ("REDIS_URL", "LOOPFM_REGISTRY", "PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**env, "HOME": "/nonexistent", **extra}  # as the image's system user: no home folder


def listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime for p in folder.rglob("*")}


@pytest.fixture
def shared_tmp():
    """A temporary folder every user may search (pytest's tmp_path is private to its owner,
    and DuckDB's access() checks ignore the capability)."""
    with tempfile.TemporaryDirectory(prefix="loopfm-readonly-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


@pytest.fixture
def readonly_run(trained_run: Path, shared_tmp: Path):
    """runs/demo: a copy of a finished run; it and its folder (where a lock would go) read-only."""
    runs = shared_tmp / "runs"
    shutil.copytree(trained_run, runs / "demo", symlinks=True)
    subprocess.run(["chmod", "-R", "a-w,a+rX", str(runs)], check=True)
    before = listing(runs)
    yield runs / "demo"
    assert listing(runs) == before, "the read-only run was changed"
    subprocess.run(["chmod", "-R", "u+w", str(runs)], check=True)


@pytest.fixture
def scratch(shared_tmp: Path) -> Path:
    """A folder the unprivileged user may write (the job's own /tmp)."""
    folder = shared_tmp / "scratch"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


def test_features_apply_with_an_outside_registry_materializes_a_readonly_run(readonly_run, scratch, stopped_private_redis):
    """The compose `materialize` job: LOOPFM_REGISTRY outside the run, so it only reads the run."""
    stopped_private_redis.start()
    args = ("features", "apply", "--run-dir", str(readonly_run), "--redis-url", stopped_private_redis.url)
    result = subprocess.run(as_user(*args), env=user_env(LOOPFM_REGISTRY=str(scratch / "registry.db")),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (scratch / "registry.db").stat().st_size > 0
    client = redis.Redis.from_url(stopped_private_redis.url)
    assert client.hget(ready_marker(PROJECT), "by") == b"feast materialize"
    assert client.dbsize() > 100  # the run's users and items, not just the marker


@pytest.mark.parametrize(
    "args, fix",
    [
        (("features", "apply", "--redis-url", "redis://127.0.0.1:1"), "set LOOPFM_REGISTRY"),
        (("features", "build"), "writable copy of the run"),
        (("vm", "export", "--variant", "base"), "writable copy of the run"),
    ],
)
def test_a_writing_command_on_a_readonly_run_is_refused_before_any_work(readonly_run, args, fix):
    """Refused at once (Redis at port 1 is never contacted), naming the folder and the fix."""
    result = subprocess.run(as_user(*args, "--run-dir", str(readonly_run)), env=user_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{readonly_run} is not writable by this user" in result.stderr
    assert fix in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_redis_serves_a_readonly_run(readonly_run):
    """`loopfm serve` with no Redis starts one and materializes into it with a throw-away
    registry, and sends the server's output to its own: nothing is written beside the run."""
    port = free_port()
    proc = subprocess.Popen(as_user("serve", "--run-dir", str(readonly_run), "--port", str(port)), env=user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        body = {"user_id": 1, "candidate_item_ids": [1, 2]}
        assert len(httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=5).json()["scores"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
