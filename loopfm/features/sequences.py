"""Per-user "last n strictly before t" lookups, vectorised with NumPy.

One helper serves every history in the project (the FM's raw-ID history, the VM's own
click history and the FM-code history), so the point-in-time rule is written once.
"""

from __future__ import annotations

import numpy as np

_TIME_BITS = 34  # 2**34 s is ~544 years: room for any timestamp span


def _keys(user: np.ndarray, time_s: np.ndarray, t0: int) -> np.ndarray:
    return (user.astype(np.int64) << _TIME_BITS) | (time_s.astype(np.int64) - t0)


def last_n_before(
    seq_user: np.ndarray,
    seq_time_s: np.ndarray,
    query_user: np.ndarray,
    query_time_s: np.ndarray,
    n: int,
) -> np.ndarray:
    """Indices into the sequence arrays of each query's last `n` elements with time < query time.

    Returns an int64 matrix [queries, n], oldest first, right-aligned, padded with -1 on the
    left. The sequence arrays need not be sorted. Elements at exactly the query time are
    excluded: a user's current event is never part of its own history.
    """
    if seq_user.size == 0:
        return np.full((query_user.size, n), -1, dtype=np.int64)
    t0 = int(min(seq_time_s.min(), query_time_s.min())) if query_time_s.size else int(seq_time_s.min())
    seq_keys = _keys(seq_user, seq_time_s, t0)
    order = np.argsort(seq_keys, kind="stable")
    sorted_keys = seq_keys[order]
    end = np.searchsorted(sorted_keys, _keys(query_user, query_time_s, t0), side="left")
    user_start = np.searchsorted(sorted_keys, query_user.astype(np.int64) << _TIME_BITS, side="left")
    pos = end[:, None] - n + np.arange(n)[None, :]
    valid = pos >= user_start[:, None]
    return np.where(valid, order[np.clip(pos, 0, None)], -1)
