"""The default offline store: Feast's DuckDB store with an as-of point-in-time join.

Feast 0.67's DuckDB store (through `feast.infra.offline_stores.ibis.point_in_time_join`)
inner-joins every entity row to *every* older source row of its key, carrying the
feature values, then keeps the newest by a window `row_number`. With per-event history
snapshots that is rows x events-per-user rows of 800-byte values (docs/scaling.md, "The
default offline store: as-of point-in-time joins", has the cost). `AsofDuckDBOfflineStore`
replaces only that retrieval: per feature view, a backward as-of match on the join keys
and the timestamps alone (`pandas.merge_asof`), then the values by Arrow `take`. Same
rule as Feast's (feature time <= entity time, and >= entity time - ttl; the newest row
wins), same rows, dtypes and order (`tests/test_offline_store.py` compares it with the
stock store). Materialization, writes and anything the as-of path does not cover
(SQL entity frames, on-demand views, field mappings, created-timestamp columns, non-
parquet sources) stay DuckDB's own. The join primitives are shared with the Ray profile
(`loopfm/distributed/ray_offline_store.py`).
"""

from __future__ import annotations

from typing import Literal

import ibis
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from feast import FeatureView, FileSource
from feast.data_format import ParquetFormat
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig, _write_data_source
from feast.infra.offline_stores.ibis import IbisRetrievalJob
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig

FEATURE_TS = "_loopfm_feature_ts"  # a source's timestamp column inside the join


def nanoseconds(column: pa.ChunkedArray) -> np.ndarray:
    """A timestamp column (any unit, any zone) as int64 UTC nanoseconds, shape (rows,)."""
    return column.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()).to_numpy()


def asof_positions(
    entity_keys: pd.DataFrame, entity_ns: np.ndarray, feature_keys: pd.DataFrame, feature_ns: np.ndarray, ttl_ns: int | None
) -> np.ndarray:
    """For each entity row, the position of the newest feature row with equal keys and
    feature_ns <= entity_ns (and >= entity_ns - ttl_ns when a ttl is given), else -1.
    Shapes: (n,) and (m,) int64 ns, key frames of n and m rows; returns (n,) int64."""
    left = entity_keys.assign(_t=entity_ns, _i=np.arange(len(entity_ns))).sort_values("_t", kind="stable")
    right = feature_keys.assign(_t=feature_ns, _j=np.arange(len(feature_ns))).sort_values("_t", kind="stable")
    matched = pd.merge_asof(left, right, on="_t", by=list(entity_keys.columns), direction="backward")
    found = matched["_j"].to_numpy(dtype=float, na_value=np.nan)
    position = np.where(np.isnan(found), -1, found).astype(np.int64)
    if ttl_ns is not None:
        hit = position >= 0
        hit[hit] = feature_ns[position[hit]] < matched["_t"].to_numpy()[hit] - ttl_ns
        position[hit] = -1
    out = np.empty(len(entity_ns), dtype=np.int64)
    out[matched["_i"].to_numpy()] = position
    return out


def source_rows(table: pa.Table, renames: dict[str, str], key_types: dict[str, pa.DataType]) -> pa.Table:
    """Source rows as the join reads them: the columns of `renames` under their new names (the
    timestamp as FEATURE_TS), rows without a timestamp dropped, keys cast to `key_types`."""
    table = table.select(list(renames)).rename_columns(renames)
    table = table.filter(pc.is_valid(table.column(FEATURE_TS)))
    for key, kind in key_types.items():
        table = table.set_column(table.schema.get_field_index(key), key, table.column(key).cast(kind))
    return table


def asof_join(entity: pa.Table, source: pa.Table, keys: list[str], event_col: str, features: list[str], ttl_ns: int | None) -> pa.Table:
    """`entity` (rows in any order) with `features` appended: each row's values from the
    newest `source` row (`source_rows` form) of its keys at or before its `event_col`, nulls
    where none matched. Values are taken as stored (`take_rows`), so bytes, ints and nulls stay as they are."""
    position = asof_positions(
        entity.select(keys).to_pandas(),
        nanoseconds(entity.column(event_col)),
        source.select(keys).to_pandas(),
        nanoseconds(source.column(FEATURE_TS)),
        ttl_ns,
    )
    taken = take_rows(source.select(features), position)
    return pa.Table.from_arrays([*entity.columns, *taken.columns], names=[*entity.column_names, *features])


_OFFSETS_LIMIT = 2**31 - 1  # bytes a binary or string array with 32-bit offsets can hold


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """Rows `rows` [n] int64 of `table`, in that order (-1 = a row of nulls). Arrow's own
    `take` on a chunked column concatenates its chunks first, which past 2 GiB of binary
    values overflows their 32-bit offsets (ArrowInvalid "offset overflow", as fp32 FM histories
    of an experiment's sweep world do). Binary and string columns are therefore taken
    chunk by chunk; they keep their type unless the rows taken hold 2 GiB or more, which
    then come as large_binary / large_string (64-bit offsets)."""
    rows = np.asarray(rows, dtype=np.int64)  # Arrow's sort_indices give uint64, whose differences numpy makes float
    columns = [_take_column(table.column(i), rows) for i in range(table.num_columns)]
    return pa.Table.from_arrays(columns, names=table.column_names)


def _take_column(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array | pa.ChunkedArray:
    kind = column.type
    if not (pa.types.is_binary(kind) or pa.types.is_string(kind)):
        return column.take(pa.array(rows, mask=rows < 0))
    starts = np.cumsum([0, *(len(c) for c in column.chunks)])
    chunk = np.searchsorted(starts, rows, side="right") - 1  # -1 for the null rows
    pieces, order = [], []
    for c, values in enumerate(column.chunks):
        at = np.flatnonzero((chunk == c) & (rows >= 0))
        if at.size:
            pieces.append(values.take(pa.array(rows[at] - starts[c])))
            order.append(at)
    missing = np.flatnonzero(rows < 0)
    pieces.append(pa.nulls(missing.size, kind))
    order.append(missing)
    if sum(p.nbytes for p in pieces) >= _OFFSETS_LIMIT:
        large = pa.large_binary() if pa.types.is_binary(kind) else pa.large_string()
        pieces = [p.cast(large) for p in pieces]
    stacked = pa.concat_arrays(pieces)  # rows in the order of np.concatenate(order)
    return stacked.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def view_features(fv: FeatureView, feature_refs: list[str], full_feature_names: bool) -> tuple[list[str], list[str]]:
    """(the view's requested features, their output names) for refs "view:feature"."""
    name = fv.projection.name_to_use()
    feats = [ref.split(":", 1)[1] for ref in feature_refs if ref.split(":", 1)[0] == name]
    return feats, [f"{name}__{f}" if full_feature_names else f for f in feats]


def join_keys(fv: FeatureView, entity_columns: list[str]) -> tuple[list[str], list[str]]:
    """(the view's join keys as its source names them, as the entity frame names them);
    ValueError naming the view when the entity frame lacks one."""
    source_keys = [c.name for c in fv.entity_columns]
    keys = [fv.projection.join_key_map.get(k, k) for k in source_keys]
    missing = [k for k in keys if k not in entity_columns]
    if missing:
        raise ValueError(f"entity_df lacks the join keys {missing} of feature view {fv.name!r}")
    return source_keys, keys


def entity_table(entity_df: pd.DataFrame, event_col: str, **extra: np.ndarray) -> pa.Table:
    """The entity frame as Arrow, its event times in UTC microseconds (tz-naive read as UTC),
    as the DuckDB store returns them."""
    times = pd.to_datetime(entity_df[event_col], utc=True).dt.as_unit("us")
    return pa.Table.from_pandas(entity_df.assign(**{event_col: times}, **extra), preserve_index=False)


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """The DuckDB store's options; only the type differs."""

    type: Literal["loopfm.features.offline_store.AsofDuckDBOfflineStore"] = (  # type: ignore[assignment]
        "loopfm.features.offline_store.AsofDuckDBOfflineStore"
    )


class ArrowRetrievalJob(IbisRetrievalJob):
    """A finished training set held as one Arrow table: `to_arrow` returns it, `to_df` is its
    pandas conversion; `persist` writes it through the DuckDB store's writer."""

    def __init__(self, rows: pa.Table, config: RepoConfig, full_feature_names: bool, metadata: RetrievalMetadata):
        options = config.offline_store
        super().__init__(ibis.memtable(rows), [], full_feature_names, metadata, _write_data_source, options.staging_location,
                         options.staging_location_endpoint_override, str(config.repo_path))  # fmt: skip
        self._rows = rows

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._rows

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._rows.to_pandas()


def _as_of_path_covers(feature_views: list[FeatureView], feature_refs: list[str], entity_df, filter_by_created_timestamp: bool) -> bool:
    views = {fv.projection.name_to_use() for fv in feature_views}
    return (
        isinstance(entity_df, pd.DataFrame)
        and not filter_by_created_timestamp
        and all(ref.split(":", 1)[0] in views for ref in feature_refs)  # no on-demand views
        and all(
            type(fv.batch_source) is FileSource
            and isinstance(fv.batch_source.file_format, (ParquetFormat, type(None)))
            and not fv.batch_source.field_mapping
            and not fv.batch_source.created_timestamp_column
            for fv in feature_views
        )
    )


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    """`DuckDBOfflineStore` whose `get_historical_features` is an as-of join (module doc)."""

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        """entity_df: a frame with an event-timestamp column and every view's join keys; rows
        come back in its order, duplicates kept. Raises ValueError when a join key is missing."""
        if not _as_of_path_covers(feature_views, feature_refs, entity_df, filter_by_created_timestamp):
            return DuckDBOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project, full_feature_names, filter_by_created_timestamp
            )
        event_col = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes)))
        rows = entity_table(entity_df, event_col)
        for fv in feature_views:
            feats, names = view_features(fv, feature_refs, full_feature_names)
            if not feats:
                continue
            source_keys, keys = join_keys(fv, rows.column_names)
            source = fv.batch_source
            renames = {**dict(zip(source_keys, keys)), source.timestamp_field: FEATURE_TS, **dict(zip(feats, names))}
            stored = pads.dataset(FileSource.get_uri_for_file_path(config.repo_path, source.path), format="parquet")
            table = source_rows(stored.to_table(columns=list(renames)), renames, {k: rows.schema.field(k).type for k in keys})
            ttl_ns = int(fv.ttl.total_seconds() * 1e9) if fv.ttl else None
            rows = asof_join(rows, table, keys, event_col, names, ttl_ns)
        times = rows.column(event_col)
        metadata = RetrievalMetadata(
            features=feature_refs,
            keys=[c for c in entity_df.columns if c != event_col],
            min_event_timestamp=pc.min(times).as_py() if len(rows) else None,
            max_event_timestamp=pc.max(times).as_py() if len(rows) else None,
        )
        return ArrowRetrievalJob(rows, config, full_feature_names, metadata)
