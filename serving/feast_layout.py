"""Feast's Redis online layout, read without the Feast SDK (which would pull torch and the
whole offline stack into the server).

Layout written by `feast materialize` / push (feast/infra/online_stores/redis.py):
- key: serialize_entity_key(EntityKey, version 3) + project name;
- one hash field per feature: murmur3_32("view:feature"), 4 bytes little endian;
- value: a serialized feast.types.Value protobuf; plus `_ts:<view>`, a protobuf Timestamp.
tests/test_online_reader.py keeps this equal to FeatureStore.get_online_features.
"""

from __future__ import annotations

import struct
from typing import Any

import mmh3
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

_STRING, _INT64 = 2, 4  # feast ValueType numbers used in entity keys


def entity_key(join_key: str, value: int, project: str) -> bytes:
    """Redis key of one int64 entity (entity key serialization version 3)."""
    name = join_key.encode()
    return b"".join(
        (
            struct.pack("<III", 1, _STRING, len(name)),
            name,
            struct.pack("<IIq", _INT64, 8, value),
            project.encode(),
        )
    )


def feature_refs(views: dict[str, list[str]]) -> list[str]:
    """{view: [features]} -> Feast's "view:feature" references."""
    return [f"{view}:{feature}" for view, features in views.items() for feature in features]


def feature_field(view: str, feature: str) -> bytes:
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def timestamp_field(view: str) -> bytes:
    return f"_ts:{view}".encode()


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CorruptValue("truncated or overlong varint")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


class CorruptValue(ValueError):
    """A stored value that cannot be decoded, or whose kind (lists, maps, ...) the server does not use."""


def decode_value(blob: bytes | None) -> Any:
    """Serialized feast.types.Value -> Python value (None when absent or null).

    Handles the scalar kinds: bytes(1) string(2) int32(3) int64(4) double(5) float(6)
    bool(7) unix_timestamp(8)."""
    if not blob:
        return None
    tag, pos = _varint(blob, 0)
    number, wire = tag >> 3, tag & 7
    if wire == 2 and number in (1, 2):
        length, pos = _varint(blob, pos)
        if pos + length != len(blob):
            raise CorruptValue(f"length {length} does not match the {len(blob) - pos} bytes stored")
        raw = blob[pos:]
        try:
            return raw if number == 1 else raw.decode()
        except UnicodeDecodeError as exc:
            raise CorruptValue("string value is not UTF-8") from exc
    if wire == 0 and number in (3, 4, 7, 8):
        v, _ = _varint(blob, pos)
        if number == 7:
            return bool(v)
        return _signed(v & 0xFFFFFFFF, 32) if number == 3 else _signed(v & ((1 << 64) - 1), 64)
    if wire == 1 and number == 5 and len(blob) == pos + 8:
        return struct.unpack_from("<d", blob, pos)[0]
    if wire == 5 and number == 6 and len(blob) == pos + 4:
        return struct.unpack_from("<f", blob, pos)[0]
    if number == 19:  # null_val
        return None
    raise CorruptValue(f"feast Value field {number} (wire type {wire}) is not decodable here")


def decode_timestamp(blob: bytes | None) -> float | None:
    """`_ts:<view>` field -> unix seconds, or None."""
    if not blob:
        return None
    try:
        ts = Timestamp.FromString(blob)
    except DecodeError as exc:
        raise CorruptValue("undecodable _ts field") from exc
    return ts.seconds + ts.nanos / 1e9
