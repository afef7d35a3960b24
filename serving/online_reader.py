"""Read a model's features for one user and its candidates from Redis in one round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import redis

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


def read_online_features(
    client: redis.Redis,
    project: str,
    requests: Sequence[tuple[str, Sequence[int], dict[str, list[str]]]],
) -> list[EntityRows]:
    """Each request is (join key, entity ids, {view: [features]}); all HMGETs go in one pipeline.

    Returns one EntityRows per request, values in entity order. Equals what
    FeatureStore.get_online_features returns for the same keys (tests/test_online_reader.py)."""
    plans = []
    with client.pipeline(transaction=False) as pipe:
        for join_key, ids, views in requests:
            fields: list[bytes] = []
            for view, features in views.items():
                fields += [feature_field(view, f) for f in features] + [timestamp_field(view)]
            for entity_id in ids:
                pipe.hmget(entity_key(join_key, int(entity_id), project), fields)
            plans.append((len(ids), views))
        replies = pipe.execute()

    out, cursor = [], 0
    for n, views in plans:
        rows = replies[cursor : cursor + n]
        cursor += n
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
