"""Read a model's features for one user and its candidates from Redis in one round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import hiredis
import redis.asyncio
import redis.asyncio.cluster

from serving.feast_layout import CorruptValue, decode_timestamp, decode_value, entity_key, feature_field, timestamp_field


@dataclass
class EntityRows:
    """Features of several entities of one kind: {feature: [value per entity]}, plus the
    Feast event time (unix s) of each feature view per entity (None = not in the store).
    A stored value that cannot be decoded reads as None and is counted in `corrupt`."""

    values: dict[str, list[Any]]
    timestamps: dict[str, list[float | None]]
    corrupt: int = 0


def _decode_all(blobs: list, decode, rows: EntityRows) -> list:
    out = []
    for blob in blobs:
        try:
            out.append(decode(blob))
        except CorruptValue:
            out.append(None)
            rows.corrupt += 1
    return out


# (join keys, one tuple of join-key values per entity, {view: [features]})
Request = tuple[tuple[str, ...], Sequence[tuple], dict[str, list[str]]]


def _commands(project: str, requests: Sequence[Request]) -> list[tuple[bytes, list[bytes]]]:
    commands = []
    for join_keys, entities, views in requests:
        fields: list[bytes] = []
        for view, features in views.items():
            fields += [feature_field(view, f) for f in features] + [timestamp_field(view)]
        commands += [(entity_key(join_keys, entity, project), fields) for entity in entities]
    return commands


def _decode(replies: list, requests: Sequence[Request]) -> list[EntityRows]:
    out, cursor = [], 0
    for _, ids, views in requests:
        rows = replies[cursor : cursor + len(ids)]
        cursor += len(ids)
        result = EntityRows({}, {})
        col = 0
        for view, features in views.items():
            for f in features:
                result.values[f] = _decode_all([r[col] for r in rows], decode_value, result)
                col += 1
            result.timestamps[view] = _decode_all([r[col] for r in rows], decode_timestamp, result)
            col += 1
        out.append(result)
    return out


async def read_online_features(
    client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster, project: str, requests: Sequence[Request],
    after: tuple | None = None,
) -> tuple[list[EntityRows], Any]:
    """All HMGETs of all requests in one round trip, then the command `after` (its reply
    second; None without one); the event loop stays free while Redis answers.

    Returns one EntityRows per request, values in entity order. Equals what
    FeatureStore.get_online_features returns for the same keys (tests/test_online_reader.py)."""
    commands = [("HMGET", key, *fields) for key, fields in _commands(project, requests)]
    if after is not None:
        commands.append(after)
    replies = await (_pipelined(client, commands) if isinstance(client, redis.asyncio.Redis)
                     else _cluster_pipelined(client, commands))  # fmt: skip
    if after is None:
        return _decode(replies, requests), None
    return _decode(replies[:-1], requests), replies[-1]


async def _pipelined(client: redis.asyncio.Redis, commands: list[tuple]) -> list:
    """`commands` written at once on one pooled connection of a single node, their replies read
    in order and parsed as redis-py's pipeline parses them (its response callbacks). The same
    round trip as `client.pipeline(transaction=False)` without its machinery per request (a
    command stack, a retry wrapper, per-reply dispatch, an observability hook): 3.2% of the
    instructions per /score (docs/serving.md, "Instruction counts, and the Redis read ...").
    The commands are packed by hiredis's C packer (the same bytes; redis-py's asyncio
    connection packs in Python even with hiredis installed, 4x slower: docs/serving.md).
    Any failure disconnects the connection before it returns to the pool, so no later request
    reads a reply left unread; errors are redis-py's (ConnectionError, TimeoutError,
    ResponseError, MaxConnectionsError from the pool), as the pipeline raises them."""
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(b"".join([hiredis.pack_command(c) for c in commands]), check_health=False)
        replies = [await connection.read_response() for _ in commands]
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)
    callbacks = client.response_callbacks
    return [callbacks[c[0]](r) if c[0] in callbacks else r for c, r in zip(commands, replies)]


async def _cluster_pipelined(client: redis.asyncio.cluster.RedisCluster, commands: list[tuple]) -> list:
    """A cluster's pipeline sends each node the commands of its keys and returns the replies in order."""
    async with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()
