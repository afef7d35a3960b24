"""The item cache is bounded, expires entries and counts its hit rate."""

import time

import numpy as np

from serving.item_cache import ItemCache


def test_lookups_hit_after_store_and_miss_after_the_ttl():
    cache = ItemCache(max_items=10, ttl_s=0.05)
    rows, missing = cache.lookup([1, 2])
    assert rows == [None, None] and missing == [1, 2]
    cache.store([1, 2], np.array([[1, 0], [2, 0]]))
    rows, missing = cache.lookup([2, 3, 1])
    assert missing == [3] and rows[0].tolist() == [2, 0] and rows[2].tolist() == [1, 0]
    assert cache.hit_rate == 2 / 5
    time.sleep(0.06)
    assert cache.lookup([1])[1] == [1]


def test_the_least_recently_used_items_are_evicted_beyond_the_bound_and_size_zero_disables():
    cache = ItemCache(max_items=2, ttl_s=60)
    cache.store([1, 2], np.zeros((2, 4)))
    cache.lookup([1])  # 1 is now more recent than 2
    cache.store([3], np.zeros((1, 4)))
    assert len(cache) == 2 and cache.lookup([2])[1] == [2] and cache.lookup([1, 3])[1] == []
    off = ItemCache(max_items=0, ttl_s=60)
    off.store([1], np.zeros((1, 4)))
    assert len(off) == 0
