"""The server's Redis reader returns exactly what Feast's get_online_features returns."""

import asyncio

import numpy as np
import pytest
import redis.asyncio
from feast.protos.feast.types.Value_pb2 import Value

from serving.feast_layout import CorruptValue, decode_value, feature_refs
from serving.online_reader import read_online_features

USER_VIEWS = {
    "user_profile": ["age_bucket", "gender"],
    "vm_click_history": ["item_ids"],
    "fm_history": ["fm_codes", "fm_newest_available_at_us", "fm_trained_until_us"],
}
ITEM_VIEWS = {"item_features": ["category", "brand", "price_bucket"]}


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


@pytest.mark.parametrize("blob", [b"\x0a\x05ab", b"\x20\xff", b"\x2d\x00\x00", b"\x12\x02\xff\xfe", b"\xa2\x01\x00"])
def test_corrupt_or_unsupported_values_raise_a_clear_error_instead_of_misreading(blob):
    with pytest.raises(CorruptValue):
        decode_value(blob)


def test_reader_equals_get_online_features_for_known_and_unknown_entities(store, redis_url):
    users = [0, 1, 2, 3, 17, 10**9]  # the last is unknown
    items = [0, 5, 399, 1199, 10**9]
    async def read():
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            return await read_online_features(
                client, "loopfm", [("user_id", users, USER_VIEWS), ("item_id", items, ITEM_VIEWS)]
            )

    user_rows, item_rows = asyncio.run(read())
    expected_users = store.get_online_features(
        features=feature_refs(USER_VIEWS), entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    expected_items = store.get_online_features(
        features=feature_refs(ITEM_VIEWS), entity_rows=[{"item_id": i} for i in items]
    ).to_dict()
    for view_features, rows, expected in ((USER_VIEWS, user_rows, expected_users), (ITEM_VIEWS, item_rows, expected_items)):
        for feature in (f for fs in view_features.values() for f in fs):
            assert rows.values[feature] == expected[feature], feature
    assert user_rows.corrupt == 0 and item_rows.corrupt == 0
    assert any(v is not None for v in user_rows.values["fm_codes"])
    assert user_rows.values["age_bucket"][-1] is None and item_rows.values["category"][-1] is None
    assert all(ts[-1] is None for ts in user_rows.timestamps.values())
    assert np.isfinite(user_rows.timestamps["user_profile"][0])
