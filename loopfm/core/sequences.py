"""Per-user "last n strictly before t" lookups, vectorised with NumPy.

One helper serves every history in the project (the FM's raw-ID history, the VM's own
click history and the FM-code history), so the point-in-time rule is written once.
Times are integers of any unit (the project uses microseconds); user ids any int64.
"""

from __future__ import annotations

import numpy as np


def _sorted_before(
    seq_user: np.ndarray, seq_time: np.ndarray, query_user: np.ndarray, query_time: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, user_start, end): the sequence sorted by (user, time), and per query the sorted
    positions where its user's elements begin and where those strictly before its time end."""
    # Dense ranks of users and of times make one int64 sort key that cannot overflow,
    # whatever the ids and the time unit: key = user_rank * n_times + time_rank.
    _, user_rank = np.unique(np.concatenate([seq_user, query_user]), return_inverse=True)
    times, time_rank = np.unique(np.concatenate([seq_time, query_time]), return_inverse=True)
    keys = user_rank.astype(np.int64) * len(times) + time_rank
    seq_keys, query_keys = keys[: seq_user.size], keys[seq_user.size :]
    order = np.argsort(seq_keys, kind="stable")
    sorted_keys = seq_keys[order]
    end = np.searchsorted(sorted_keys, query_keys, side="left")
    user_start = np.searchsorted(sorted_keys, user_rank[seq_user.size :].astype(np.int64) * len(times), side="left")
    return order, user_start, end


def last_n_before(
    seq_user: np.ndarray,
    seq_time: np.ndarray,
    query_user: np.ndarray,
    query_time: np.ndarray,
    n: int,
) -> np.ndarray:
    """Indices into the sequence arrays of each query's last `n` elements with time < query time.

    Returns an int64 matrix [queries, n], oldest first, right-aligned, padded with -1 on the
    left. The sequence arrays need not be sorted. Elements at exactly the query time are
    excluded: a user's current event is never part of its own history.
    """
    if seq_user.size == 0:
        return np.full((query_user.size, n), -1, dtype=np.int64)
    order, user_start, end = _sorted_before(seq_user, seq_time, query_user, query_time)
    pos = end[:, None] - n + np.arange(n)[None, :]
    valid = pos >= user_start[:, None]
    return np.where(valid, order[np.clip(pos, 0, None)], -1)


def count_before(seq_user: np.ndarray, seq_time: np.ndarray, query_user: np.ndarray, query_time: np.ndarray) -> np.ndarray:
    """Per query, how many of its user's sequence elements have time < query time: int64 [queries].
    The same point-in-time rule as `last_n_before` (an event never counts itself)."""
    if seq_user.size == 0:
        return np.zeros(query_user.size, dtype=np.int64)
    _, user_start, end = _sorted_before(seq_user, seq_time, query_user, query_time)
    return (end - user_start).astype(np.int64)


def decayed_before(
    seq_user: np.ndarray,
    seq_time: np.ndarray,
    seq_values: np.ndarray,
    query_user: np.ndarray,
    query_time: np.ndarray,
    half_life: float,
) -> np.ndarray:
    """Per query, the sum of its user's sequence values [n] or [n, c] with time < query time,
    each weighted 2^(-m / half_life), m = how many of the user's elements lie strictly between
    the element's time and the query's: float64 [queries] or [queries, c]. Elements sharing a
    time share a weight (the point-in-time rule of `count_before`, which this is with weight 1).
    The live loop keeps the same sums event by event (loopfm/stream/state.py: UserState.advance)."""
    values = np.asarray(seq_values, dtype=np.float64)
    if seq_user.size == 0:
        return np.zeros((query_user.size, *values.shape[1:]), dtype=np.float64)
    order, user_start, end = _sorted_before(seq_user, seq_time, query_user, query_time)
    user, time = seq_user[order], seq_time[order]
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_time = new_user | np.r_[True, time[1:] != time[:-1]]
    group = np.cumsum(new_time) - 1  # [n] each element's (user, time) group
    size = np.bincount(group)[group]
    # T_i = a_i T_{i-1} + v_i: a group's first element decays what came before by the group's
    # size, the others add to it undecayed, a user's first element starts from 0. At a group's
    # last element T is the sum the query after that group reads.
    decay = np.where(new_user, 0.0, np.where(new_time, 0.5 ** (size / half_life), 1.0))
    total = values[order]
    decay = decay.reshape(-1, *[1] * (total.ndim - 1))  # broadcast over the value columns
    step = 1
    while step < len(total):  # a Hillis-Steele scan of the linear recurrence: log2(n) passes
        total[step:] = total[step:] + decay[step:] * total[:-step]
        decay[step:] = decay[step:] * decay[:-step]
        step *= 2
    read = (end > user_start).reshape(-1, *[1] * (total.ndim - 1))
    return np.where(read, total[np.maximum(end - 1, 0)], 0.0)
