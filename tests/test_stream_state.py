"""A user's running state (loopfm/stream/state.py) reads as the batch inputs (fm/inputs.py) on
the same events, events sharing a time included."""

import numpy as np

from loopfm.core.sequences import count_before, decayed_before
from loopfm.stream.state import ALL, UserState


def test_the_running_counts_before_each_event_equal_the_batch_ones_with_ties_in_time():
    rng = np.random.default_rng(0)
    times = np.sort(rng.integers(0, 40, 120))  # many events share a time
    labels = rng.integers(0, 2, 120)
    user = np.zeros(120, dtype=np.int64)
    state, seen = UserState(dense=0), []
    for i, (t, label) in enumerate(zip(times.tolist(), labels.tolist())):
        state.advance(t, raw_length=5, recent_half_life=4.0)
        seen.append((*state.counts(ALL), *state.recent_before))
        state.record(f"{i + 1}-0", i, "shop", item=i, label=label, history_length=5, dedup_window=0)
    n, k, recent_n, recent_k = np.array(seen).T
    assert n.tolist() == count_before(user, times, user, times).tolist()
    assert k.tolist() == count_before(user[labels == 1], times[labels == 1], user, times).tolist()
    np.testing.assert_allclose(recent_n, decayed_before(user, times, np.ones(120), user, times, 4.0), rtol=1e-12)
    np.testing.assert_allclose(recent_k, decayed_before(user, times, labels, user, times, 4.0), rtol=1e-12)
