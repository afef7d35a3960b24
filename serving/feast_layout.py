"""Feast's Redis online layout, read without the Feast SDK (which would pull torch and the
whole offline stack into the server).

Layout written by `feast materialize` / push (feast/infra/online_stores/redis.py):
- key: serialize_entity_key(EntityKey, version 3) + project name;
- one hash field per feature: murmur3_32("view:feature"), 4 bytes little endian;
- value: a serialized feast.types.Value protobuf; plus `_ts:<view>`, a protobuf Timestamp.
tests/test_online_reader.py keeps this equal to FeatureStore.get_online_features, and the
encoders the live loop writes with equal to Feast's protobuf.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Sequence

import mmh3
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from loopfm.contract.names import ITEM_KEY, USER_KEY

_STRING, _INT64 = 2, 4  # feast ValueType numbers used in entity keys


def entity_key(join_keys: Sequence[str], values: Sequence[int | str], project: str) -> bytes:
    """Redis key of one entity of int64 and string join keys (serialization version 3: the
    key count, then names and values in join-key order, sorted when there are several). A
    value's Python type picks its Feast type: str -> STRING, int -> INT64 (exact, any int64)."""
    pairs = sorted(zip(join_keys, values)) if len(join_keys) > 1 else list(zip(join_keys, values))
    out = [struct.pack("<I", len(pairs))]
    for name, _ in pairs:
        encoded = name.encode()
        out += [struct.pack("<II", _STRING, len(encoded)), encoded]
    for _, value in pairs:
        if isinstance(value, str):
            encoded = value.encode()
            out += [struct.pack("<II", _STRING, len(encoded)), encoded]
        else:
            out.append(struct.pack("<IIq", _INT64, 8, value))
    out.append(project.encode())
    return b"".join(out)


def feature_refs(views: dict[str, list[str]]) -> list[str]:
    """{view: [features]} -> Feast's "view:feature" references."""
    return [f"{view}:{feature}" for view, features in views.items() for feature in features]


def request_side(meta: dict) -> tuple[list[tuple[tuple[str, ...], dict[str, list[str]]]], dict[str, list[str]]]:
    """A model.json's feature groups: [(join keys, {view: [features]})] read once per request
    (keyed by the user, or by the user and the model's vertical), and the item views."""
    groups = [(tuple(keys.split(",")), views) for keys, views in meta["features"].items() if keys != ITEM_KEY]
    return groups, meta["features"].get(ITEM_KEY, {})


def user_side_refs(meta: dict, user_id: int | str) -> tuple[list[str], dict[str, Any]]:
    """For the Feast SDK: every request-side feature reference of a model and the entity row
    that reaches all of them (the user id plus the model's vertical)."""
    groups, _ = request_side(meta)
    return [ref for _, views in groups for ref in feature_refs(views)], {USER_KEY: user_id, **meta.get("entity_values", {})}


def user_entity(join_keys: Sequence[str], user_id: int | str, meta: dict) -> tuple:
    """Values of a request-side entity: the user id, and the model's own `entity_values`
    (its vertical) for the other join keys."""
    return tuple(user_id if key == USER_KEY else meta["entity_values"][key] for key in join_keys)


@functools.cache  # a model reads the same few fields on every request: one hash each per process
def feature_field(view: str, feature: str) -> bytes:
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


@functools.cache
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


def _varint_bytes(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_int64(v: int) -> bytes:
    """feast.types.Value(int64_val=v) serialized, byte for byte (field 4, a varint of the
    two's complement): what the live loop writes without importing the Feast SDK."""
    return b"\x20" + _varint_bytes(int(v) & ((1 << 64) - 1))


def encode_bytes(v: bytes) -> bytes:
    """feast.types.Value(bytes_val=v) serialized, byte for byte (field 1, length-delimited)."""
    return b"\x0a" + _varint_bytes(len(v)) + bytes(v)


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
