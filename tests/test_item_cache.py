"""The item cache is bounded, expires entries, counts its hit rate, and returns a request's
rows in request order whether they were cached or fresh, even when another request stores
(and evicts) while this one awaits Redis."""

import numpy as np
import pytest

from serving.item_cache import ItemCache


def test_lookups_hit_after_store_and_miss_after_the_ttl():
    now = [100.0]
    cache = ItemCache(max_items=10, ttl_s=0.05, clock=lambda: now[0])
    rows, hit, missing = cache.lookup([1, 2])
    assert rows is None and hit.tolist() == [False, False] and missing == [1, 2]
    cache.store([1, 2], np.array([[1, 0], [2, 0]]))
    rows, hit, missing = cache.lookup([2, 3, 1])
    assert missing == [3] and hit.tolist() == [True, False, True]
    assert cache.complete([2, 3, 1], rows, hit, missing, np.array([[3, 0]])).tolist() == [[2, 0], [3, 0], [1, 0]]
    assert cache.hit_rate == 2 / 5
    now[0] += 0.049
    assert cache.lookup([1])[2] == []  # still within the TTL
    now[0] += 0.002
    assert cache.lookup([1])[2] == [1]


def test_a_request_of_cached_rows_is_one_gather_and_repeated_ids_are_fetched_once():
    cache = ItemCache(max_items=10, ttl_s=60)
    rows, hit, missing = cache.lookup([7, 8, 7])
    assert missing == [7, 8]
    assert cache.complete([7, 8, 7], rows, hit, missing, np.array([[70], [80]])).tolist() == [[70], [80], [70]]
    rows, hit, missing = cache.lookup([8, 7, 8])
    assert missing == [] and cache.complete([8, 7, 8], rows, hit, missing, None).tolist() == [[80], [70], [80]]
    with pytest.raises(ValueError, match="fresh rows"):
        cache.complete([9], *cache.lookup([9]), None)


def test_rows_gathered_at_lookup_survive_another_request_evicting_their_slots_meanwhile():
    cache = ItemCache(max_items=2, ttl_s=60)
    cache.store([1, 2], np.array([[10], [20]]))
    rows, hit, missing = cache.lookup([1, 2, 3])  # request A, then it awaits Redis for item 3
    cache.store([4, 5], np.array([[40], [50]]))  # request B stores meanwhile: 1 and 2 lose their slots
    assert cache.complete([1, 2, 3], rows, hit, missing, np.array([[30]])).tolist() == [[10], [20], [30]]


def test_the_least_recently_used_items_are_evicted_beyond_the_bound_and_size_zero_disables():
    cache = ItemCache(max_items=2, ttl_s=60)
    cache.store([1, 2], np.array([[10], [20]]))
    cache.lookup([1])  # 1 is now more recent than 2
    cache.store([3], np.array([[30]]))  # takes 2's slot
    assert len(cache) == 2 and cache.lookup([2])[2] == [2]
    rows, hit, missing = cache.lookup([1, 3])
    assert missing == [] and cache.complete([1, 3], rows, hit, missing, None).tolist() == [[10], [30]]
    off = ItemCache(max_items=0, ttl_s=60)
    off.store([1], np.zeros((1, 4)))
    assert len(off) == 0
    rows, hit, missing = off.lookup([5, 6])
    assert off.complete([5, 6], rows, hit, missing, np.array([[5], [6]])).tolist() == [[5], [6]] and len(off) == 0


def test_a_request_with_more_new_items_than_the_bound_still_gets_every_row():
    cache = ItemCache(max_items=2, ttl_s=60)
    cache.store([1], np.array([[10]]))
    ids = [1, 2, 3, 4]
    rows, hit, missing = cache.lookup(ids)
    assert cache.complete(ids, rows, hit, missing, np.array([[20], [30], [40]])).tolist() == [[10], [20], [30], [40]]
    assert len(cache) == 2


def test_rows_of_items_the_live_loop_wrote_are_dropped_at_the_next_request(redis_url):
    """The stream workers' items-written feed, on a real Valkey: a request reads what it has not
    seen in its round trip and drops those rows after storing its own."""
    import json
    import uuid

    import redis

    from loopfm.contract.names import items_written_key
    from serving.item_cache import WRITTEN_PAGE

    client, key = redis.Redis.from_url(redis_url), items_written_key(f"test-{uuid.uuid4().hex}")
    client.xadd(key, {"items": json.dumps([1, 2, 3])})  # before this server: nothing cached to drop
    cache = ItemCache(max_items=10, ttl_s=60)

    def request(ids: list) -> list:
        rows, hit, missing = cache.lookup(ids)
        written = client.execute_command(*cache.written_query(key))  # in the request's one round trip
        cache.complete(ids, rows, hit, missing, np.array([[i] for i in missing]) if missing else None)
        cache.forget_written(written)
        return missing

    assert request([1, 2, "sku-7"]) == [1, 2, "sku-7"]
    assert request([1, 2, "sku-7"]) == []
    client.xadd(key, {"items": json.dumps([2, "sku-7", 99])})  # a micro-batch wrote 2, sku-7 and an uncached 99
    assert request([1]) == []  # this request reads the entry; its own rows were gathered before
    assert request([1, 2, "sku-7"]) == [2, "sku-7"]
    assert request([1, 2, "sku-7"]) == []  # an entry is read once
    client.xadd(key, {"items": json.dumps([5])})
    with client.pipeline(transaction=False) as pipe:  # more than one read holds: every row goes
        for _ in range(WRITTEN_PAGE):
            pipe.xadd(key, {"items": json.dumps([6])})
        pipe.execute()
    request([])
    assert request([1, 2, "sku-7"]) == [1, 2, "sku-7"]
    assert ItemCache(max_items=0, ttl_s=60).written_query(key) is None  # the cache off: no extra command
    client.delete(key)


def test_the_scorer_serves_an_items_rewritten_row_at_the_next_request_and_never_a_negative_age(trained_run, private_redis):
    """On the materialized store: an item's row is cached; the live loop rewrites it (here: it
    is removed, so the item turns unknown) and announces it; the next request reads it afresh.
    A user's FM history stamped ahead of now (availability = event time + logging delay) has age 0."""
    import asyncio
    import json
    import time

    import redis

    from loopfm.contract.names import FM_HISTORY, PROJECT, items_written_key
    from loopfm.core.rundir import RunPaths
    from loopfm.stream.online import item_key, timestamp_value, user_key
    from serving.feast_layout import timestamp_field
    from serving.redis_client import async_client
    from serving.scorer import Scorer

    store = redis.Redis.from_url(private_redis.url)
    store.hset(user_key(PROJECT, 3), timestamp_field(FM_HISTORY), timestamp_value(time.time_ns() // 1000 + 40_000_000))
    scorer = Scorer(RunPaths(trained_run).vm / "loopfm_kd" / "onnx", item_cache=ItemCache(max_items=100, ttl_s=300))

    async def unknown_after(change) -> list:
        client = async_client(private_redis.url, 2.0)
        try:
            await scorer.score(client, 3, [801, 802], 9)  # caches both rows
            change()
            scored = await scorer.score(client, 3, [801, 802], 9)  # reads the announcement
            assert scored.feature_age_s[FM_HISTORY] == 0.0
            return (await scorer.score(client, 3, [801, 802], 9)).unknown_items
        finally:
            await client.aclose()

    assert asyncio.run(unknown_after(lambda: store.delete(item_key(PROJECT, 801)))) == []  # unannounced: cached, at most the TTL
    assert asyncio.run(unknown_after(lambda: store.xadd(items_written_key(PROJECT), {"items": json.dumps([801])}))) == [801]
