"""Reading a user's files of impressions and catalog rows, checked whole before anything uses
them: the first fault is named by file, column and row (IngestError). Shared by `loopfm
ingest`, `loopfm events publish` and `loopfm items upsert`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from loopfm.contract.names import ID_INT64, N_PRICE_BUCKETS
from loopfm.core.config import RunConfig
from loopfm.core.files import text_separator
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import from_unix_us
from loopfm.data.ids import IdMap, load_id_maps
from loopfm.data.parse import INT64_RANGE, BadValues, integers, text_ids, unix_times_us
from loopfm.data.vocab import Vocab

EVENT_COLUMNS = ("impression_id", "user_id", "item_id", "vertical", "event_timestamp", "label")
ITEM_COLUMNS = ("item_id", "category", "brand", "price_bucket")


class IngestError(ValueError):
    """A bad events file; the message names the file, the column and the row."""


def _first_bad(path: Path, column: str, bad, what: str) -> None:
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise IngestError(f"{path}: column {column!r}, row {row + 1}: {what} ({int(bad.sum())} such rows)")


def _parsed(path: Path, raw: pd.DataFrame, column: str, parse):
    """`parse(raw[column])` (loopfm.data.parse), its BadValues named by file, column and row."""
    _first_bad(path, column, raw[column].isna(), "missing value")
    try:
        return parse(raw[column])
    except BadValues as exc:
        _first_bad(path, column, exc.bad, exc.problem)
        raise


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV or TSV file, compressed or not (the separator follows the name: loopfm.core.files.text_separator;
    read as text: numbers are parsed exactly later, never through float64), or else a parquet
    file, holding `columns`. Raises IngestError naming the file."""
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    sep = text_separator(path)
    csv = sep is not None
    try:
        raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""]) if csv else pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many kinds for a file that is not what it says
        raise IngestError(f"{path}: not a readable {'CSV' if csv else 'parquet'} file: {exc}") from None
    missing = [c for c in columns if c not in raw.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
    return raw


def read_event_file(path: Path, cfg: RunConfig, paths: RunPaths, time_unit: str | None = None) -> pd.DataFrame:
    """Load and check a file of impressions (parquet or CSV) against the run it joins, ids kept
    as source ids (int64 or text per the run's entity types, loopfm/data/ids.py). Ids are parsed
    exactly, times by the project's one parser (`time_unit`: the unit of numeric
    event_timestamp values, None infers it). Raises IngestError naming the file, column and row."""
    raw = read_table(path, EVENT_COLUMNS)
    events = pd.DataFrame({"vertical": raw["vertical"].astype(str)})
    for column in ("impression_id", "label"):
        events[column] = _parsed(path, raw, column, lambda v: integers(v, INT64_RANGE)).astype(np.int64)
    for id_map in load_id_maps(paths):
        events[id_map.key] = _source_ids(path, raw, id_map).to_numpy()
    events["event_timestamp"] = from_unix_us(_parsed(path, raw, "event_timestamp", lambda v: unix_times_us(v, time_unit)))
    events["hour"] = events["event_timestamp"].dt.hour.astype(np.int64)
    _first_bad(path, "label", ~events["label"].isin([0, 1]), "labels must be 0 or 1")
    _first_bad(path, "vertical", ~events["vertical"].isin(cfg.world.verticals), f"vertical not in {list(cfg.world.verticals)}")
    return events[["impression_id", "user_id", "item_id", "vertical", "event_timestamp", "hour", "label"]]


def _source_ids(path: Path, raw: pd.DataFrame, id_map: IdMap) -> pd.Series:
    """A batch's id column as the run's source ids: exact int64 for an int64 entity (never
    through float64), text for a string one (a numeric column's ids in plain decimal: text_ids)."""
    if id_map.id_type == ID_INT64:
        return _parsed(path, raw, id_map.key, lambda v: integers(v, INT64_RANGE)).astype(np.int64)
    return _parsed(path, raw, id_map.key, text_ids).astype(str)


def read_item_file(path: Path, paths: RunPaths) -> pd.DataFrame:
    """A catalog file (CSV or parquet with ITEM_COLUMNS), checked whole: item ids of the run's
    type, attributes integers inside the FM's vocabularies. Raises IngestError naming the file,
    column and row."""
    raw = read_table(path, ITEM_COLUMNS)
    vocab = Vocab.load(paths)
    out = pd.DataFrame({"item_id": _source_ids(path, raw, load_id_maps(paths)[1]).to_numpy()})
    for column, size in (("category", vocab.n_categories), ("brand", vocab.n_brands), ("price_bucket", N_PRICE_BUCKETS)):
        out[column] = _parsed(path, raw, column, lambda v: integers(v, INT64_RANGE)).astype("int64").to_numpy()
        _first_bad(path, column, (out[column] < 0) | (out[column] >= size), f"must lie in 0..{size - 1} (the FM's vocabulary)")
    return out
