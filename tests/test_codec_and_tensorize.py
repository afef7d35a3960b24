"""int4 codes and the shared tensorization (training and serving build inputs the same way)."""

import dataclasses

import numpy as np

from loopfm.contract.codec import pack_int4, quantize_int4, unpack_int4
from loopfm.contract.names import N_COUNT_BUCKETS, N_RATE_BUCKETS
from loopfm.contract.tensorize import (
    TensorSpec,
    activity_buckets,
    candidate_tensors,
    decode_fm_history,
    rate_bucket_log_odds,
    request_tensors,
)

SPEC = TensorSpec(history_length=4, code_dim=4, n_items=100, n_categories=10, n_brands=20)


def test_int4_round_trip_is_exact_on_the_quantization_grid():
    z = np.random.default_rng(0).uniform(-1, 1, (50, 8))
    levels = quantize_int4(z)
    assert levels.min() >= -8 and levels.max() <= 7
    packed = pack_int4(levels)
    assert packed.shape == (50, 4) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed), levels / 8.0)
    assert np.abs(unpack_int4(packed) - np.clip(z, -1, 7 / 8)).max() <= 1 / 16 + 1e-9


def test_histories_are_right_aligned_truncated_to_the_newest_and_masked():
    codes = pack_int4(quantize_int4(np.linspace(-1, 0.8, 6 * 4).reshape(6, 4)))
    blob = codes.tobytes()  # six codes, oldest first; the spec keeps the newest four
    values, mask = decode_fm_history([blob, None, codes[:1].tobytes()], 4, 4)
    np.testing.assert_array_equal(values[0], unpack_int4(codes[2:]))
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert not values[1].any()


def test_missing_and_out_of_vocabulary_values_become_zero_instead_of_failing():
    users = {
        "age_bucket": [3, None],
        "gender": [1, float("nan")],
        "item_ids": [np.array([5, 7, 500], dtype="<i4").tobytes(), b"\x01\x02"],  # 500 unknown; 2 bytes corrupt
        "fm_codes": [None, b""],
        "impressions": [3, 2],
        "clicks": [1, 5],  # more clicks than impressions: inconsistent, unknown
    }
    t = request_tensors(users, [13, 99], SPEC)
    assert t["user_context"].tolist() == [[4, 2, 14, 53, 3], [0, 0, 0, 0, 0]]
    assert t["vm_history"].tolist() == [[0, 6, 8, 0], [0, 0, 0, 0]]
    assert t["fm_mask"].sum() == 0
    items = {"item_index": [42, None, 44, 100], "category": [2, None, "x", 1], "brand": [3, None, float("inf"), 1],
             "price_bucket": [9, None, b"\x01", 1]}  # fmt: skip
    # The dense index is the stored item_index feature, never the request's (source) id. A malformed
    # stored value (wrong kind) reads as unknown; the item itself stays known by its index; an
    # index outside the model's vocabulary (100 of 0..99) is unknown.
    assert candidate_tensors(items, SPEC).tolist() == [[43, 3, 4, 10], [0, 0, 0, 0], [45, 0, 0, 0], [0, 2, 2, 2]]
    assert request_tensors({**users, "item_ids": ["text", 5]}, [1, 2], SPEC)["vm_history"].sum() == 0


def test_candidates_carry_the_item_s_rate_and_count_buckets_when_the_model_reads_item_activity():
    spec = dataclasses.replace(SPEC, item_activity=True)
    items = {"item_index": [42, 43, None], "category": [2, 2, None], "brand": [3, 3, None], "price_bucket": [9, 9, None],
             "item_impressions": [0, 1000, None], "item_clicks": [0, 900, None]}  # fmt: skip
    rate, count = activity_buckets(items["item_impressions"], items["item_clicks"])
    out = candidate_tensors(items, spec)
    assert out.shape == (3, 6) and len(spec.candidate_vocab) == 6
    assert out[:, 4].tolist() == rate.tolist() == [57, 74, 0]  # an unseen item at even odds; no counts: unknown
    assert out[:, 5].tolist() == count.tolist()
    assert candidate_tensors(items, SPEC).shape == (3, 4)  # without vm.item_activity: four columns


def test_rate_bucket_log_odds_are_the_bucket_centres_and_zero_for_unknown():
    centres = rate_bucket_log_odds()
    rate, _ = activity_buckets([0, 1000, 1000], [0, 900, 10])
    log_odds = np.log(np.array([1, 901, 11]) / np.array([1, 101, 991]))
    assert centres[0] == 0 and len(centres) == N_RATE_BUCKETS + 1
    assert np.abs(centres[rate] - log_odds).max() <= 0.0625 + 1e-6  # within half a bin


def test_activity_buckets_place_a_new_user_at_even_odds_and_separate_heavy_clickers():
    rate, count = activity_buckets([0, 1, 1000, 1000, None, 5], [0, 1, 900, 10, 0, -1])
    assert rate.tolist() == [57, 62, 74, 20, 0, 0]  # log-odds of (k+1)/(n+2) in bins of 0.125 from -7, +1; 0 = unknown
    assert count.tolist() == [1, 2, 10, 10, 0, 0]  # floor(log2(n+1)), +1
    assert activity_buckets([10**9], [10**9])[1].tolist() == [N_COUNT_BUCKETS]  # capped


def test_activity_buckets_tell_apart_click_rates_of_an_ads_log():
    # 1%, 3% and 10% CTR users (equal bins of 0.05 in the rate put all three in the first bin)
    rate, _ = activity_buckets([1000, 1000, 1000], [10, 30, 100])
    assert len(set(rate.tolist())) == 3
    assert rate.tolist() == sorted(rate.tolist())
    assert activity_buckets([10**9, 10**9], [0, 10**9])[0].tolist() == [1, N_RATE_BUCKETS]  # both ends clipped
