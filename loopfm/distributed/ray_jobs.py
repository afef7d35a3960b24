"""FM logging and structuring as Ray Data jobs, on the very functions the local path runs.

- FM logging: events are independent once their inputs are built, so `log_events` runs on
  blocks of event positions (`fm.log_blocks` per job; Ray schedules one task per block).
- Structuring: histories are per user, so `build_fm_history` / `build_vm_click_history` run
  on shards that hold all of a user's rows (user_id % shards), grouped by Ray Data.

The embedding log comes back in event order and the histories are sorted by the caller,
so both engines write the same tables.
Ray starts locally (one worker per core) unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pandas as pd

from loopfm.config import ConfigError, RunConfig
from loopfm.io import RunPaths

BLOCKS = 8  # tasks per job: enough to keep every local core busy, few enough to start fast


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs the `ray` extra: pip install -e '.[train,ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    return ray


def log_events_ray(
    paths: RunPaths, cfg: RunConfig, arrays: dict[str, np.ndarray], imp: pd.DataFrame, rows: np.ndarray
) -> pd.DataFrame:
    """`stream.log_events` over blocks of `rows`, one Ray task per block, rows in order."""
    from loopfm.fm.stream import log_events

    ray = _ray()
    blocks = ray.data.from_items([{"rows": part} for part in np.array_split(rows, BLOCKS) if part.size])
    inputs = ray.put((arrays, imp))  # once into the object store, not pickled into every task

    def log_block(batch: dict) -> pd.DataFrame:
        block_arrays, block_imp = ray.get(inputs)
        return pd.concat([log_events(paths, cfg, block_arrays, block_imp, part, progress=False) for part in batch["rows"]])

    out = _to_pandas(ray, blocks.map_batches(log_block, batch_size=1, batch_format="numpy"))
    order = pd.Series(np.arange(rows.size), index=imp["impression_id"].to_numpy()[rows])
    return out.iloc[np.argsort(order.loc[out["impression_id"]].to_numpy())].reset_index(drop=True)


def per_user_ray(build: Callable[[pd.DataFrame], pd.DataFrame], table: pd.DataFrame, shards: int = BLOCKS) -> pd.DataFrame:
    """`build(rows)` on shards holding every row of their users (user_id % shards), one Ray
    task per shard; rows in shard order (the caller sorts)."""
    ray = _ray()
    ds = ray.data.from_pandas(table.assign(_shard=table["user_id"].to_numpy() % shards))
    return _to_pandas(ray, ds.groupby("_shard").map_groups(lambda rows: build(rows.drop(columns="_shard")), batch_format="pandas"))


def _to_pandas(ray, ds) -> pd.DataFrame:
    """Through Arrow, so columns get the NumPy dtypes the local path has (Dataset.to_pandas
    keeps Arrow-backed ones)."""
    import pyarrow as pa

    return pa.concat_tables(ray.get(ds.to_arrow_refs())).to_pandas()
