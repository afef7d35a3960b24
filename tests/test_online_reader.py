"""The server's Redis reader returns exactly what Feast's get_online_features returns."""

import asyncio

import numpy as np
import pytest
import redis.asyncio
from feast.protos.feast.types.Value_pb2 import Value

from loopfm.contract.names import FM_HISTORY, ITEM_ACTIVITY, ITEM_FEATURES_VIEW, PROJECT, USER_PROFILE, VM_CLICK_HISTORY, views
from serving.feast_layout import CorruptValue, decode_value, encode_bytes, encode_int64, feature_refs
from serving.online_reader import read_online_features

USER_VIEWS, CLICK_VIEWS, ITEM_VIEWS = views(USER_PROFILE, FM_HISTORY), views(VM_CLICK_HISTORY), views(ITEM_FEATURES_VIEW, ITEM_ACTIVITY)


@pytest.mark.parametrize(
    "value",
    [Value(int64_val=-5), Value(int64_val=2**62), Value(int32_val=-3), Value(double_val=0.1), Value(float_val=1.5),
     Value(string_val="ü"), Value(bytes_val=b"\x00\xff"), Value(bool_val=True), Value(unix_timestamp_val=1_700_000_000), Value()],
)  # fmt: skip
def test_decoder_agrees_with_feast_protobuf(value):
    kind = value.WhichOneof("val")
    expected = None if kind is None else getattr(value, kind)
    got = decode_value(value.SerializeToString())
    assert got == (pytest.approx(expected) if kind == "float_val" else expected)


def test_the_live_loops_encoders_write_feasts_protobuf_byte_for_byte():
    for v in (0, 1, -1, 127, 128, 300, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, -(2**63)):
        assert encode_int64(v) == Value(int64_val=v).SerializeToString(), v
    for b in (b"", b"\x00", b"\x00\xff" * 64, bytes(range(256)) * 3):
        assert encode_bytes(b) == Value(bytes_val=b).SerializeToString(), len(b)


@pytest.mark.parametrize("blob", [b"\x0a\x05ab", b"\x20\xff", b"\x2d\x00\x00", b"\x12\x02\xff\xfe", b"\xa2\x01\x00"])
def test_corrupt_or_unsupported_values_raise_a_clear_error_instead_of_misreading(blob):
    with pytest.raises(CorruptValue):
        decode_value(blob)


def reader_agrees_with_feast(
    make_client, store, users: list[int | str], items: list[int | str] = (0, 5, 399, 1199, 10**9),
    verticals: tuple[str, str] = ("shop", "video"),
) -> None:  # fmt: skip
    """Read users (the last unknown), their clicks in two verticals and items (the last
    unknown) with the server's reader through `make_client()`, and compare with
    get_online_features. Ids are source ids of the run's entity types (int64 or strings)."""
    clicks = [(u, v) for u in users[:3] for v in verticals] + [(users[0], "cars")]  # no such vertical
    requests = [
        (("user_id",), [(u,) for u in users], USER_VIEWS),
        (("user_id", "vertical"), clicks, CLICK_VIEWS),
        (("item_id",), [(i,) for i in items], ITEM_VIEWS),
    ]

    async def read():
        client = make_client()
        try:
            return (await read_online_features(client, PROJECT, requests))[0]
        finally:
            await client.aclose()

    got = asyncio.run(read())
    for (keys, entities, views), rows in zip(requests, got):
        rows_as_dicts = [dict(zip(keys, entity)) for entity in entities]
        expected = store.get_online_features(features=feature_refs(views), entity_rows=rows_as_dicts).to_dict()
        for feature in (f for fs in views.values() for f in fs):
            assert rows.values[feature] == expected[feature], feature
        assert rows.corrupt == 0
    user_rows, click_rows, item_rows = got
    assert any(v is not None for v in user_rows.values["fm_codes"])
    assert click_rows.values["item_ids"][0] != click_rows.values["item_ids"][1]  # shop and video differ
    assert click_rows.values["item_ids"][-1] is None
    assert user_rows.values["age_bucket"][-1] is None and item_rows.values["category"][-1] is None
    assert all(ts[-1] is None for ts in user_rows.timestamps.values())
    assert np.isfinite(user_rows.timestamps["user_profile"][0])


def test_reader_equals_get_online_features_for_known_and_unknown_entities(store, redis_url):
    reader_agrees_with_feast(lambda: redis.asyncio.Redis.from_url(redis_url), store, [0, 1, 2, 3, 17, 10**9])


def test_a_failed_command_raises_redis_error_and_leaves_no_reply_behind_for_the_next_request(store, redis_url):
    """A command failing first in the round trip (HMGET on a key that is no hash) raises
    redis-py's ResponseError, and the next read on the same one-connection pool gets its
    own replies, not the unread rest of the failed round trip's."""
    from serving.feast_layout import entity_key

    wrong = 987_654_321  # a user id no run holds, its key made a plain string
    requests = [(("user_id",), [(0,), (1,)], USER_VIEWS)]

    async def run():
        client = redis.asyncio.Redis.from_url(redis_url, max_connections=1)
        try:
            await client.set(entity_key(("user_id",), (wrong,), PROJECT), b"not a hash")
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                await read_online_features(client, PROJECT, [(("user_id",), [(wrong,), (0,), (1,)], USER_VIEWS)])
            after_failure = (await read_online_features(client, PROJECT, requests))[0][0]
        finally:
            await client.delete(entity_key(("user_id",), (wrong,), PROJECT))
            await client.aclose()
        fresh = redis.asyncio.Redis.from_url(redis_url)
        try:
            return after_failure, (await read_online_features(fresh, PROJECT, requests))[0][0]
        finally:
            await fresh.aclose()

    after_failure, expected = asyncio.run(run())
    assert after_failure.values == expected.values and after_failure.values["fm_codes"][0] is not None
