"""Read a model's features for one user and its candidates from Redis in one round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import redis.asyncio

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
    client: redis.asyncio.Redis, project: str, requests: Sequence[Request], after: tuple | None = None
) -> tuple[list[EntityRows], Any]:
    """All HMGETs of all requests in one pipeline (one round trip), then the command `after`
    (its reply second; None without one); the event loop stays free while Redis answers.

    Returns one EntityRows per request, values in entity order. Equals what
    FeatureStore.get_online_features returns for the same keys (tests/test_online_reader.py)."""
    async with client.pipeline(transaction=False) as pipe:
        for key, fields in _commands(project, requests):
            pipe.hmget(key, fields)
        if after is not None:
            pipe.execute_command(*after)
        replies = await pipe.execute()
    if after is None:
        return _decode(replies, requests), None
    return _decode(replies[:-1], requests), replies[-1]
