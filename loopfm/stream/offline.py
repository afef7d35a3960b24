"""The loop's offline side: one parquet file per micro-batch, never rewriting what is stored.

`stream/impressions/<unix µs>-<worker>.parquet` holds the applied impressions with their FM
log columns (the embedding log's, fm/stream.py: log_events) and the source ids of new users
and items; `stream/items/` the catalog upserts. A file is written whole (temporary file and
rename) before the worker touches the online store or acks, so an acked event is always
offline. A worker killed between this write and its ack applies the entries again: the
re-applied rows repeat impression ids, and `read_impressions` keeps each id's first row.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.io import RunPaths, atomic_write

TIME = pa.timestamp("us", tz="UTC")

IMPRESSIONS, ITEMS = "impressions", "items"


def folder(paths: RunPaths, kind: str) -> Path:
    return paths.root / "stream" / kind


def append(paths: RunPaths, kind: str, rows: pa.Table, write_us: int, worker: str) -> Path | None:
    """Write `rows` as a new file of `kind` (atomically); nothing for an empty table. Times are
    timestamp[us, UTC], as write_parquet stores them."""
    if rows.num_rows == 0:
        return None
    path = folder(paths, kind) / f"{write_us}-{worker}.parquet"
    atomic_write(path, lambda tmp: pq.write_table(rows, tmp))
    return path


def read(paths: RunPaths, kind: str) -> pd.DataFrame:
    """Every file of `kind`, in write order (empty frame when none)."""
    files = sorted(folder(paths, kind).glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_impressions(paths: RunPaths) -> pd.DataFrame:
    """The streamed impressions, each impression id once (its first written row)."""
    rows = read(paths, IMPRESSIONS)
    return rows if rows.empty else rows.drop_duplicates("impression_id", keep="first").reset_index(drop=True)
