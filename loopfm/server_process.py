"""Run the scoring server as a real uvicorn process (demo, `loopfm serve`, end-to-end tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loopfm.children import dies_with_this_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVING_APP = "serving.app:create_app"
# uvicorn answers 503 above this many concurrent connections and requests; the environment
# variable of the same name (read by uvicorn itself) overrides it.
LIMIT_CONCURRENCY = {"UVICORN_LIMIT_CONCURRENCY": "1000"}


def uvicorn_command(app: str, host: str, port: int, workers: int = 1, python: str = sys.executable) -> list[str]:
    """The tuned defaults: uvloop, httptools, no access log, `workers` processes sharing the
    port (one per core; uvicorn's own supervisor restarts one that dies); `python` is the
    interpreter of the install to serve from (default: this one)."""
    return [
        python, "-m", "uvicorn", app, "--factory",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log",
    ]  # fmt: skip


def start_server(
    model_dir: Path,
    redis_url: str,
    log_path: Path | None,
    port: int | None = None,
    wait_for: str = "/readyz",
    app: str = SERVING_APP,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    workers: int = 1,
    ready_within_s: float = 60.0,
) -> tuple[subprocess.Popen, str]:
    """Start uvicorn (of `python`'s install) with `workers` processes sharing a free loopback
    port (the app reads the same count as LOOPFM_WORKERS) and wait until `wait_for` answers
    200 (from one worker: the others may still be starting) within `ready_within_s`. The
    server's output is appended to `log_path`, or shares this process's stdout and stderr
    when None (`loopfm serve`, which only reads its run). The server gets SIGTERM when this
    process dies, even by SIGKILL (loopfm.children), and stops its workers."""
    port = port or free_port()
    env = {**LIMIT_CONCURRENCY, **os.environ, "LOOPFM_MODEL_DIR": str(model_dir), "REDIS_URL": redis_url,
           **(env or {}), "LOOPFM_WORKERS": str(workers)}  # fmt: skip
    command = uvicorn_command(app, "127.0.0.1", port, workers=workers, python=python)
    if log_path is None:
        proc, see = subprocess.Popen(command, env=env, preexec_fn=dies_with_this_process()), "its output above"
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=dies_with_this_process())
            see = str(log_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_within_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}; see {see}")
            try:
                if httpx.get(f"{url}{wait_for}", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server's {wait_for} not 200 within {ready_within_s:g} s; see {see}")
    except BaseException:  # not ready, or a stop signal while waiting: leave no server behind
        stop_server(proc)
        raise


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, theirs, ...), read from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (a process that has children of its own stops them), then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
