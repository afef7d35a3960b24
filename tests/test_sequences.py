"""`last_n_before`, `count_before` and `decayed_before`: the one point-in-time rule for every
history and count."""

import numpy as np
import pytest

from loopfm.core.sequences import count_before, decayed_before, last_n_before


def brute_force(seq_user, seq_time, q_user, q_time, n):
    out = []
    for u, t in zip(q_user, q_time):
        idx = [i for i in np.argsort(seq_time, kind="stable") if seq_user[i] == u and seq_time[i] < t][-n:]
        out.append([-1] * (n - len(idx)) + idx)
    return np.array(out)


def test_matches_brute_force_on_random_sequences():
    rng = np.random.default_rng(0)
    su, st = rng.integers(0, 5, 200), rng.permutation(200) * 3  # distinct times
    qu, qt = rng.integers(0, 6, 100), rng.integers(0, 620, 100)
    np.testing.assert_array_equal(last_n_before(su, st, qu, qt, 4), brute_force(su, st, qu, qt, 4))


def test_count_before_counts_what_an_unbounded_history_would_hold():
    rng = np.random.default_rng(1)
    su, st = rng.integers(0, 5, 200), rng.integers(0, 100, 200)  # ties in time included
    qu, qt = rng.integers(0, 6, 100), rng.integers(0, 110, 100)
    expected = [sum(1 for u, t in zip(su, st) if u == q and t < tq) for q, tq in zip(qu, qt)]
    assert count_before(su, st, qu, qt).tolist() == expected
    assert count_before(np.array([]), np.array([]), np.array([1]), np.array([5])).tolist() == [0]


def test_decayed_before_weights_each_earlier_element_by_the_elements_between_it_and_the_query():
    rng = np.random.default_rng(2)
    su, st, sv = rng.integers(0, 5, 200), rng.integers(0, 60, 200), rng.random(200)  # ties in time included
    qu, qt = rng.integers(0, 6, 100), rng.integers(0, 70, 100)
    expected = [sum(v * 0.5 ** (((su == q) & (st > t) & (st < tq)).sum() / 3.0) for u, t, v in zip(su, st, sv) if u == q and t < tq)
                for q, tq in zip(qu, qt)]  # fmt: skip
    np.testing.assert_allclose(decayed_before(su, st, sv, qu, qt, 3.0), expected, rtol=1e-12, atol=1e-12)
    ones = np.ones(200)
    np.testing.assert_allclose(decayed_before(su, st, ones, qu, qt, 1e12), count_before(su, st, qu, qt), rtol=1e-9)
    columns = decayed_before(su, st, np.stack([sv, ones], axis=1), qu, qt, 3.0)  # [queries, 2]: each column on its own
    one_by_one = np.stack([expected, decayed_before(su, st, ones, qu, qt, 3.0)], axis=1)
    np.testing.assert_allclose(columns, one_by_one, rtol=1e-12, atol=1e-12)
    assert decayed_before(np.array([]), np.array([]), np.array([]), np.array([1]), np.array([5]), 3.0).tolist() == [0.0]


def test_an_element_at_the_query_time_is_not_in_its_history():
    got = last_n_before(np.array([1, 1]), np.array([10, 20]), np.array([1, 1]), np.array([20, 21]), 3)
    assert got.tolist() == [[-1, -1, 0], [-1, 0, 1]]


def test_other_users_never_leak_in_and_empty_inputs_pad():
    got = last_n_before(np.array([2, 2]), np.array([1, 2]), np.array([1, 3]), np.array([100, 100]), 2)
    assert (got == -1).all()
    assert (last_n_before(np.array([]), np.array([]), np.array([1]), np.array([5]), 2) == -1).all()


def test_huge_user_ids_and_microsecond_times_do_not_collide():
    big = np.array([2**40, 0, 2**62])
    t = np.array([1_700_000_000_000_001, 1_700_000_000_000_001, 5])  # microseconds
    got = last_n_before(big, t, np.array([0, 2**40, 2**62]), np.array([1_800_000_000_000_000] * 3), 2)
    assert got.tolist() == [[-1, 1], [-1, 0], [-1, 2]]


def test_vm_click_history_counts_impressions_and_clicks_up_to_each_time_even_before_any_click():
    import pandas as pd

    from loopfm.features.build import build_vm_click_history

    t = pd.to_datetime([1, 2, 2, 3, 1], unit="s", utc=True)
    imp = pd.DataFrame({"user_id": [7, 7, 7, 7, 8], "vertical": ["shop", "shop", "shop", "shop", "video"],
                        "item_id": [1, 2, 3, 4, 5], "label": [0, 1, 0, 1, 1], "event_timestamp": t})  # fmt: skip
    shop = build_vm_click_history(imp, ["shop"], length=4)
    assert shop["impressions"].tolist() == [1, 3, 4] and shop["clicks"].tolist() == [0, 1, 2]  # one row per time
    assert shop["item_ids"].tolist() == [b"", np.array([2], "<i4").tobytes(), np.array([2, 4], "<i4").tobytes()]
    assert build_vm_click_history(imp[imp.label == 0], ["shop"], length=4)["item_ids"].tolist() == [b"", b""]


@pytest.mark.parametrize("events, codes", [("clicks", [b"", b"B"]), ("impressions", [b"A", b"AB"])])
def test_fm_history_holds_the_codes_of_clicks_or_of_every_impression_as_configured(events, codes):
    import pandas as pd

    from loopfm.features.build import build_fm_history, fm_history_members

    t = pd.to_datetime([1, 2], unit="s", utc=True)
    log = pd.DataFrame({"user_id": [7, 7], "available_at": t, "fm_code": [b"A", b"B"], "fm_trained_until": t})
    history = build_fm_history(log, fm_history_members(np.array([0, 1]), events), length=4)
    snapshots = dict(zip(history["event_timestamp"], history["fm_codes"]))
    assert [snapshots.get(ts, b"") for ts in t] == codes  # an unclicked event's code enters only an impression history
