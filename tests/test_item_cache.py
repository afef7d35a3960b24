"""The item cache is bounded, expires entries, counts its hit rate, and returns a request's
rows in request order whether they were cached or fresh."""

import time

import numpy as np
import pytest

from serving.item_cache import ItemCache


def test_lookups_hit_after_store_and_miss_after_the_ttl():
    cache = ItemCache(max_items=10, ttl_s=0.05)
    slots, missing = cache.lookup([1, 2])
    assert slots.tolist() == [-1, -1] and missing == [1, 2]
    cache.store([1, 2], np.array([[1, 0], [2, 0]]))
    slots, missing = cache.lookup([2, 3, 1])
    assert missing == [3] and slots[1] == -1
    assert cache.rows([2, 3, 1], slots, missing, np.array([[3, 0]])).tolist() == [[2, 0], [3, 0], [1, 0]]
    assert cache.hit_rate == 2 / 5
    time.sleep(0.06)
    assert cache.lookup([1])[1] == [1]


def test_a_request_of_cached_rows_is_one_gather_and_repeated_ids_are_fetched_once():
    cache = ItemCache(max_items=10, ttl_s=60)
    slots, missing = cache.lookup([7, 8, 7])
    assert missing == [7, 8]
    assert cache.rows([7, 8, 7], slots, missing, np.array([[70], [80]])).tolist() == [[70], [80], [70]]
    slots, missing = cache.lookup([8, 7, 8])
    assert missing == [] and cache.rows([8, 7, 8], slots, missing, None).tolist() == [[80], [70], [80]]
    with pytest.raises(ValueError, match="fresh rows"):
        cache.rows([9], *cache.lookup([9]), None)


def test_the_least_recently_used_items_are_evicted_beyond_the_bound_and_size_zero_disables():
    cache = ItemCache(max_items=2, ttl_s=60)
    cache.store([1, 2], np.array([[10], [20]]))
    cache.lookup([1])  # 1 is now more recent than 2
    cache.store([3], np.array([[30]]))  # takes 2's slot
    assert len(cache) == 2 and cache.lookup([2])[1] == [2]
    slots, missing = cache.lookup([1, 3])
    assert missing == [] and cache.rows([1, 3], slots, missing, None).tolist() == [[10], [30]]
    off = ItemCache(max_items=0, ttl_s=60)
    off.store([1], np.zeros((1, 4)))
    assert len(off) == 0
    slots, missing = off.lookup([5, 6])
    assert off.rows([5, 6], slots, missing, np.array([[5], [6]])).tolist() == [[5], [6]] and len(off) == 0


def test_a_request_with_more_new_items_than_the_bound_still_gets_every_row():
    cache = ItemCache(max_items=2, ttl_s=60)
    cache.store([1], np.array([[10]]))
    ids = [1, 2, 3, 4]
    slots, missing = cache.lookup(ids)
    assert cache.rows(ids, slots, missing, np.array([[20], [30], [40]])).tolist() == [[10], [20], [30], [40]]
    assert len(cache) == 2
