"""The loop's offline side: one parquet file per micro-batch, never rewriting what is stored.

`stream/impressions/<unix µs>-<worker>.parquet` holds the applied impressions with their FM
log columns (the embedding log's, fm/log.py: log_events) and the source ids of new users
and items; `stream/items/` the catalog upserts. A file is written whole (temporary file and
rename) before the worker touches the online store or acks, so an acked event is always
offline. A worker killed between this write and its ack applies the entries again: the
re-applied rows repeat impression ids, and `read_impressions` keeps each id's first row
(files in write order: `write_order`).

Training reads these rows back (`loopfm features build`): `run_tables` gives the run's
impressions and FM log followed by the streamed rows, `grow_id_maps` appends the dense ids
the stream assigned to the run's id maps, `catalog_upserts` the upserts as point-in-time rows.
`compact` (`loopfm stream compact`) merges the small files; no reader can tell the difference.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.contract.names import ID_INT64
from loopfm.core.files import atomic_write, read_parquet, write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import US_PER_DAY
from loopfm.data.ids import IdMap, extend_id_map, load_id_maps

TIME = pa.timestamp("us", tz="UTC")

IMPRESSIONS, ITEMS = "impressions", "items"
COMPACTED = "compacted"  # the middle part of a merged file's name: <first µs>-compacted-<last µs>.parquet


def root(paths: RunPaths) -> Path:
    """The live loop's folder in a run: its offline rows, and the records of unfinished ingests."""
    return paths.root / "stream"


def folder(paths: RunPaths, kind: str) -> Path:
    return root(paths) / kind


def append(paths: RunPaths, kind: str, rows: pa.Table, write_us: int, worker: str) -> Path | None:
    """Write `rows` as a new file of `kind` (atomically); nothing for an empty table. Times are
    timestamp[us, UTC], as write_parquet stores them."""
    if rows.num_rows == 0:
        return None
    path = folder(paths, kind) / f"{write_us}-{worker}.parquet"
    atomic_write(path, lambda tmp: pq.write_table(rows, tmp))
    return path


def write_order(path: Path) -> tuple[int, int, str]:
    """Sort key of a file: its first write time (µs), a merged file before the small files of
    that microsecond, then the name (worker names are free text and never decide)."""
    first, _, rest = path.stem.partition("-")
    return int(first), 0 if rest.startswith(COMPACTED + "-") else 1, path.name


def files(paths: RunPaths, kind: str) -> list[Path]:
    return sorted(folder(paths, kind).glob("*.parquet"), key=write_order)


def read(paths: RunPaths, kind: str) -> pd.DataFrame:
    """Every file of `kind`, in write order (empty frame when none)."""
    found = files(paths, kind)
    if not found:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in found], ignore_index=True)


def read_impressions(paths: RunPaths) -> pd.DataFrame:
    """The streamed impressions, each impression id once (its first written row)."""
    rows = read(paths, IMPRESSIONS)
    return rows if rows.empty else rows.drop_duplicates("impression_id", keep="first").reset_index(drop=True)


def run_tables(paths: RunPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(impressions, FM log): the run's tables followed by the streamed rows whose impression id
    they lack (one row per impression id, the two frames in the same order). A streamed row
    carries its code's `available_at` (when the worker wrote it), so codes stay point-in-time."""
    imp, log = read_parquet(paths.table("impressions")), read_parquet(paths.fm_log)
    streamed = read_impressions(paths)
    if streamed.empty:
        return imp, log
    streamed = streamed[~streamed["impression_id"].isin(imp["impression_id"])]
    return (pd.concat([imp, streamed[imp.columns].astype(imp.dtypes.to_dict())], ignore_index=True),
            pd.concat([log, streamed[log.columns].astype(log.dtypes.to_dict())], ignore_index=True))  # fmt: skip


def catalog_upserts(paths: RunPaths) -> pd.DataFrame:
    """The streamed catalog upserts: dense item_id, category, brand, price_bucket, written_at;
    one row per (item, written_at), the last written (empty frame when none)."""
    rows = read(paths, ITEMS)
    if rows.empty:
        return rows
    rows = rows.drop_duplicates(["item_id", "written_at"], keep="last")
    return rows[["item_id", "category", "brand", "price_bucket", "written_at"]].reset_index(drop=True)


def grow_id_maps(paths: RunPaths) -> tuple[IdMap, IdMap]:
    """The run's user and item maps, grown append-only by the dense ids the stream assigned to
    new source ids (the `user_source` / `item_source` of streamed impressions and upserts).
    Raises ValueError when the stream's ids are not the maps' next indices."""
    streamed, upserts = read(paths, IMPRESSIONS), read(paths, ITEMS)
    grown = []
    for id_map, column, frames in zip(load_id_maps(paths), ("user_source", "item_source"), ([streamed], [streamed, upserts])):
        key = id_map.key
        pairs = pd.concat([f[[key, column]] for f in frames if not f.empty] or [pd.DataFrame(columns=[key, column])])
        pairs = pairs[pairs[key] >= len(id_map.source)].drop_duplicates(key)
        source = pairs[column].astype(np.int64) if id_map.id_type == ID_INT64 else pairs[column].astype(str)
        grown.append(extend_id_map(paths, id_map, pairs[key].to_numpy(np.int64), source))
    return grown[0], grown[1]


def compact(paths: RunPaths, older_than_us: int, log=print) -> dict[str, tuple[int, int]]:
    """Merge the files of each kind written before `older_than_us` into one file per UTC day of
    their write time: {kind: (files before, files after)}. Each merged file holds exactly the
    rows `read` (impressions: `read_impressions`) gives for its files, and sorts before every
    file it replaces; it is written whole before they are removed, so a crash in between
    leaves duplicates that read the same as either side."""
    out = {}
    for kind in (IMPRESSIONS, ITEMS):
        found = files(paths, kind)
        old = [f for f in found if write_order(f)[0] < older_than_us]
        for day in sorted({write_order(f)[0] // US_PER_DAY for f in old}):
            group = [f for f in old if write_order(f)[0] // US_PER_DAY == day]
            if len(group) == 1 and write_order(group[0])[1] == 0:
                continue  # already one merged file
            rows = pd.concat([pd.read_parquet(f) for f in group], ignore_index=True)
            if kind == IMPRESSIONS:
                rows = rows.drop_duplicates("impression_id", keep="first").reset_index(drop=True)
            first = write_order(group[0])[0]
            last = max(int(f.stem.rsplit("-", 1)[1]) if write_order(f)[1] == 0 else write_order(f)[0] for f in group)
            merged = folder(paths, kind) / f"{first}-{COMPACTED}-{last}.parquet"
            write_parquet(rows, merged)
            for f in group:
                if f != merged:
                    f.unlink()
        out[kind] = (len(found), len(files(paths, kind)))
        log(f"stream/{kind}: {out[kind][0]} files -> {out[kind][1]}")
    return out


def compact_now(paths: RunPaths, older_than_s: float, log=print) -> dict[str, tuple[int, int]]:
    """`loopfm stream compact`: merge the files written more than `older_than_s` ago (default
    one lease, `stream.lease_ms`). A worker stamps a file with its micro-batch's start and stops
    writing when its lease lapses, so every file it could still be writing is younger:
    compaction runs beside live workers and leaves their newest files for the next run."""
    return compact(paths, time.time_ns() // 1000 - int(older_than_s * 1e6), log)
