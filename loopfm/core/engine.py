"""How a stage spreads its work: over blocks of event positions (FM logging) or over shards
of users (structuring). Stages take an `Engine` and never import one: `LOCAL` runs the work
in this process; the orchestration (loopfm/pipeline/) picks it or Ray's
(loopfm/distributed/ray_jobs.py), which runs the very same work functions as Ray Data jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

BlockWork = Callable[[np.ndarray], pd.DataFrame]  # event positions -> one output row per position, in order
UserWork = Callable[[pd.DataFrame], pd.DataFrame]  # every row of some users -> their output rows


@dataclass(frozen=True)
class Engine:
    """map_blocks(work, rows): `work` over parts of `rows`, outputs concatenated in `rows`
    order. map_users(work, table): `work` over parts of `table` that each hold all rows of
    their users, outputs concatenated in any order (the caller sorts)."""

    name: str
    map_blocks: Callable[[BlockWork, np.ndarray], pd.DataFrame]
    map_users: Callable[[UserWork, pd.DataFrame], pd.DataFrame]


def _whole(work: Callable, data):
    """The work in one call on all of its input."""
    return work(data)


LOCAL = Engine("local", map_blocks=_whole, map_users=_whole)
