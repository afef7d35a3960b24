"""One URL places both the online-store writer (Feast, loopfm/features/store.py) and the
server's reader (serving/redis_client.py): `redis://` / `rediss://` is one node,
`redis+cluster://host:port` / `rediss+cluster://...` a Redis Cluster reached through that
startup node."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_node_url(url: str) -> str | None:
    """redis+cluster://... -> the startup node's redis://... URL; None for a single-node URL.
    Raises ValueError for a cluster URL with a database number."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return None
    if parts.path.strip("/"):
        raise ValueError(f"REDIS_URL {url!r}: a Redis Cluster has one database, drop the /{parts.path.strip('/')}")
    return urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme]))
