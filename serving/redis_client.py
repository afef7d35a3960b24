"""The server's Redis client from one URL: a single node or a Redis Cluster.

`redis://` / `rediss://` is one node; `redis+cluster://host:port` / `rediss+cluster://...`
is a Redis Cluster reached through that startup node (the client learns the others and the
slot map from it). The same URL selects Feast's `redis_cluster` online store
(loopfm/features/store.py), so one setting places both the writer and the reader
(loopfm/contract/redis_url.py).
"""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio
import redis.asyncio.cluster

from loopfm.contract.redis_url import cluster_node_url

MAX_CONNECTIONS = 64  # per server process (LOOPFM_REDIS_MAX_CONNECTIONS); one request holds one at a time
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


class CappedPool(redis.asyncio.BlockingConnectionPool):
    """At most `max_connections` connections; a request waits up to `timeout` seconds for a
    free one, then gets MaxConnectionsError (the server answers 503 with the reason)."""

    async def get_connection(self, *args, **kwargs):
        try:
            return await super().get_connection(*args, **kwargs)
        except redis.ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise redis.exceptions.MaxConnectionsError(
                    f"all {self.max_connections} online-store connections busy for {self.timeout} s") from None  # fmt: skip
            raise


def async_client(url: str, timeout_s: float, max_connections: int = MAX_CONNECTIONS) -> AsyncClient:
    """A client whose pipeline(transaction=False) / hmget / ping / exists / aclose serve both
    kinds; a cluster pipeline sends each node its keys' commands and returns replies in order.
    At most `max_connections` connections (per node of a cluster, where one more request
    fails at once with MaxConnectionsError instead of waiting)."""
    node = cluster_node_url(url)
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if node is None:
        pool = CappedPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **timeouts)
        return redis.asyncio.Redis.from_pool(pool)
    return redis.asyncio.cluster.RedisCluster.from_url(node, max_connections=max_connections, **timeouts)
