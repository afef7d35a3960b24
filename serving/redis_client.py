"""The server's Redis client from one URL: a single node or a Redis Cluster.

`redis://` / `rediss://` is one node; `redis+cluster://host:port` / `rediss+cluster://...`
is a Redis Cluster reached through that startup node (the client learns the others and the
slot map from it). The same URL selects Feast's `redis_cluster` online store
(loopfm/features/store.py), so one setting places both the writer and the reader.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.asyncio.cluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_node_url(url: str) -> str | None:
    """redis+cluster://... -> the startup node's redis://... URL; None for a single-node URL."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return None
    if parts.path.strip("/"):
        raise ValueError(f"REDIS_URL {url!r}: a Redis Cluster has one database, drop the /{parts.path.strip('/')}")
    return urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme]))


def async_client(url: str, timeout_s: float) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """A client whose pipeline(transaction=False) / hmget / ping / aclose serve both kinds;
    a cluster pipeline sends each node its keys' commands and returns replies in order."""
    node = cluster_node_url(url)
    if node is None:
        return redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return redis.asyncio.cluster.RedisCluster.from_url(node, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
