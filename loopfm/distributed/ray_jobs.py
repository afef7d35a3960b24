"""The Ray engine (loopfm/core/engine.py): FM logging and structuring as Ray Data jobs, on the
very work functions the local engine runs.

- map_blocks (FM logging): events are independent once their inputs are built, so the work
  runs on BLOCKS blocks of event positions, one Ray task per block.
- map_users (structuring): histories are per user, so the work runs on shards that hold all
  of a user's rows (user_id % shards), grouped by Ray Data.

Outputs come back in block order, and the histories are sorted by the caller, so both
engines write the same tables. Ray starts locally (one worker per core) unless RAY_ADDRESS
names a cluster.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from loopfm.core.config import ConfigError
from loopfm.core.engine import BlockWork, Engine, UserWork

BLOCKS = 8  # tasks per job: enough to keep every local core busy, few enough to start fast


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs the `ray` extra: pip install -e '.[train,ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    return ray


def map_blocks(work: BlockWork, rows: np.ndarray) -> pd.DataFrame:
    """`work` over BLOCKS blocks of `rows`, one Ray task per block; outputs in `rows` order."""
    ray = _ray()
    parts = [part for part in np.array_split(rows, BLOCKS) if part.size]
    blocks = ray.data.from_items([{"block": i, "rows": part} for i, part in enumerate(parts)])
    shared = ray.put(work)  # once into the object store (it holds the inputs), not pickled into every task

    def run(batch: dict) -> pd.DataFrame:
        block_work = ray.get(shared)
        return pd.concat([block_work(part).assign(_block=b) for b, part in zip(batch["block"], batch["rows"])])

    out = _to_pandas(ray, blocks.map_batches(run, batch_size=1, batch_format="numpy"))
    return out.sort_values("_block", kind="stable").drop(columns="_block").reset_index(drop=True)


def map_users(work: UserWork, table: pd.DataFrame, shards: int = BLOCKS) -> pd.DataFrame:
    """`work(rows)` on shards holding every row of their users (user_id % shards), one Ray
    task per shard; rows in shard order (the caller sorts)."""
    ray = _ray()
    ds = ray.data.from_pandas(table.assign(_shard=table["user_id"].to_numpy() % shards))
    return _to_pandas(ray, ds.groupby("_shard").map_groups(lambda rows: work(rows.drop(columns="_shard")), batch_format="pandas"))


def _to_pandas(ray, ds) -> pd.DataFrame:
    """Through Arrow, so columns get the NumPy dtypes the local path has (Dataset.to_pandas
    keeps Arrow-backed ones)."""
    import pyarrow as pa

    return pa.concat_tables(ray.get(ds.to_arrow_refs())).to_pandas()


RAY = Engine("ray", map_blocks=map_blocks, map_users=map_users)
