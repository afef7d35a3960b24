"""Feast's Ray offline store with an exact point-in-time join (the `ray` offline profile).

Feast 0.67's `RayOfflineStore.get_historical_features` floors entity and feature
timestamps to whole seconds before its `merge_asof`, drops duplicate entity rows, joins
only inside one `window_size_for_joins` window when a source exceeds the broadcast
threshold, and converts `Bytes` values through NumPy (trailing zero bytes stripped, nulls
as b'None'); its `pull_latest_from_table_or_query` (materialization) floors too.
docs/scaling.md has the reproductions. `ExactRayOfflineStore` replaces those two methods
and its retrieval job's conversions; Ray start-up from the config, source paths, staging
and `persist` stay Feast's.

The join, per feature view, is a map/reduce shuffle in Ray tasks: every block of entity
rows and every parquet row group of the source (read in its own task: Ray Data's reader
costs about 2 s per view to start on 2 cores) is split by a hash of the view's join keys
into `partitions` pieces; one task per partition then runs a backward as-of match on
integer nanoseconds (feature time <= entity time, and >= entity time - ttl; the newest
feature row wins), and its output is the next view's entity block. Values are taken by
Arrow `take` from the source's own Arrow columns, so bytes, integer types and nulls reach
the result as they are in the source. Rows come back in entity-row order, duplicates
kept, entity times in UTC microseconds: what the DuckDB store returns.

Selected by `feature_repo/feature_store.ray.yaml` (`LOOPFM_OFFLINE_STORE=ray`); Ray starts
locally unless the config's `ray_address` (or RAY_ADDRESS) names a cluster.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from feast import FeatureView
from feast.infra.offline_stores.contrib.ray_offline_store.ray import (
    RayOfflineStore,
    RayOfflineStoreConfig,
    RayRetrievalJob,
)
from feast.infra.offline_stores.offline_store import RetrievalJob
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from pydantic import PositiveInt

from loopfm.features.offline_store import FEATURE_TS, asof_join, entity_table, join_keys, nanoseconds, source_rows, take_rows, view_features

ROW = "_loopfm_row"  # entity-row position, carried through every shuffle, dropped at the end


class ExactRayOfflineStoreConfig(RayOfflineStoreConfig):
    """Feast's Ray store options plus the number of hash partitions of the join."""

    type: Literal["loopfm.distributed.ray_offline_store.ExactRayOfflineStore"] = (
        "loopfm.distributed.ray_offline_store.ExactRayOfflineStore"
    )
    partitions: PositiveInt = 8  # join tasks per feature view: a few per worker core


class ExactRetrievalJob(RayRetrievalJob):
    """Joined blocks (object refs of Arrow tables, any order), read through Arrow only:
    `to_arrow` concatenates them (sorted by `order` on the caller when given, that column
    dropped), `to_df` is its pandas conversion (ints with nulls become float64, bytes stay
    bytes, as the DuckDB store's frame); Feast's Ray paths (`persist`, `to_ray_dataset`)
    get the same rows as a Ray Dataset."""

    def __init__(self, blocks: list, config: ExactRayOfflineStoreConfig, order: str | None = None):
        import ray

        def dataset():
            rows = ray.data.from_arrow_refs(blocks)
            return rows.sort(order).drop_columns([order]) if order else rows

        super().__init__(dataset, staging_location=config.storage_path, config=config)
        self._blocks, self._order = blocks, order

    def to_arrow(self, validation_reference=None, timeout: int | None = None) -> pa.Table:
        import ray

        table = pa.concat_tables(ray.get(self._blocks, timeout=timeout))
        if self._order is None:
            return table
        return take_rows(table, pc.sort_indices(table.column(self._order)).to_numpy()).drop_columns([self._order])

    def to_df(self, validation_reference=None, timeout: int | None = None) -> pd.DataFrame:
        if self._cached_df is None:
            self._cached_df = self.to_arrow(timeout=timeout).to_pandas()
        return self._cached_df

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self.to_arrow(timeout=timeout)

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self.to_df(timeout=timeout)


def _split(table: pa.Table, keys: list[str], partitions: int) -> list[pa.Table]:
    """The rows of `table` in `partitions` pieces by a hash of their join-key values that
    is the same in every process (pandas' fixed-key SipHash)."""
    hashes = pd.util.hash_pandas_object(table.select(keys).to_pandas(), index=False).to_numpy()
    part = (hashes % np.uint64(partitions)).astype(np.int64)
    return [table.filter(pa.array(part == p)) for p in range(partitions)]


def _read_and_split(
    filesystem: pafs.FileSystem, path: str, group: int, renames: dict[str, str], key_types: dict[str, pa.DataType], partitions: int
) -> list[pa.Table]:
    """One parquet row group of a source, as `_split_features` pieces."""
    table = pq.ParquetFile(filesystem.open_input_file(path)).read_row_group(group, columns=list(renames))
    return _split_features(table, renames, key_types, partitions)


def _split_features(
    table: pa.Table, renames: dict[str, str], key_types: dict[str, pa.DataType], partitions: int
) -> list[pa.Table]:
    """Source rows with the entity side's key names and types, stamped rows only, split."""
    return _split(source_rows(table, renames, key_types), list(key_types), partitions)


def _join(
    n_entity: int, keys: list[str], event_col: str, features: list[str], ttl_ns: int | None, *pieces: pa.Table
) -> pa.Table:
    """One partition: its entity rows (the first `n_entity` pieces) with the as-of values of
    `features` from its source rows (the other pieces), nulls where nothing matched."""
    entity = pa.concat_tables(pieces[:n_entity])
    return asof_join(entity, pa.concat_tables(pieces[n_entity:], promote_options="default"), keys, event_col, features, ttl_ns)


class ExactRayOfflineStore(RayOfflineStore):
    """`RayOfflineStore` whose `get_historical_features` is an exact point-in-time join at
    the sources' own timestamp precision that keeps every entity row in order (module doc)."""

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str | None,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        **kwargs: Any,
    ) -> RetrievalJob:
        """entity_df: a pandas frame with an event-timestamp column and every join key.
        Raises ValueError for what this store does not support (SQL or absent entity_df,
        on-demand views, field mappings, created-timestamp columns)."""
        import ray

        options = config.offline_store
        if not isinstance(options, ExactRayOfflineStoreConfig):
            raise ValueError(f"ExactRayOfflineStore needs its own config, got {type(options).__name__}")
        if not isinstance(entity_df, pd.DataFrame):
            raise ValueError("ExactRayOfflineStore needs entity_df as a pandas DataFrame (no SQL, no entity-less mode)")
        views = {fv.projection.name_to_use(): fv for fv in feature_views}
        if any(ref.split(":", 1)[0] not in views for ref in feature_refs):
            raise ValueError(f"ExactRayOfflineStore serves plain feature views only, got refs {feature_refs}")
        store = ExactRayOfflineStore()
        store._init_ray(config)
        event_col = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes)))
        entity = entity_table(entity_df, event_col, **{ROW: np.arange(len(entity_df))})
        rows_per_block = max(1, -(-len(entity) // options.partitions))
        blocks = [ray.put(pa.Table.from_batches([b])) for b in entity.to_batches(max_chunksize=rows_per_block)] or [ray.put(entity)]
        for fv in views.values():
            feats, names = view_features(fv, feature_refs, full_feature_names)
            if feats:
                blocks = _join_view(store, config, fv, feats, names, blocks, entity.schema, event_col)
        job = ExactRetrievalJob(blocks, options, order=ROW)
        job._full_feature_names, job._on_demand_feature_views = full_feature_names, []
        job._feature_refs, job._entity_df = feature_refs, entity_df
        return job

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        """The newest row per join key with start_date <= timestamp <= end_date, timestamps
        as stored (Feast's floors them to seconds): what `feast materialize` writes online."""
        import ray

        if created_timestamp_column or data_source.field_mapping:
            raise ValueError(f"ExactRayOfflineStore: source {data_source.name!r} uses a field mapping or created-timestamp column")
        store = ExactRayOfflineStore()
        store._init_ray(config)
        columns = [*join_key_columns, *feature_name_columns]
        renames = {**dict(zip(columns, columns)), timestamp_field: FEATURE_TS}
        empty, pieces = _shuffled_source(store, config, data_source, renames, join_key_columns, None)
        window = [pd.Timestamp(t) for t in (start_date, end_date)]
        window = [t.tz_localize("UTC") if t.tzinfo is None else t for t in window]  # naive: UTC, as Feast reads it
        latest = ray.remote(_latest)
        blocks = [
            latest.remote(join_key_columns, timestamp_field, window[0].value, window[1].value, empty, *[f[p] for f in pieces])
            for p in range(config.offline_store.partitions)
        ]
        return ExactRetrievalJob(blocks, config.offline_store)


def _latest(keys: list[str], timestamp_field: str, start_ns: int, end_ns: int, *pieces: pa.Table) -> pa.Table:
    """One partition's newest row per key with start_ns <= FEATURE_TS <= end_ns, the
    timestamp column named `timestamp_field` again."""
    rows = pa.concat_tables(pieces, promote_options="default")
    t = nanoseconds(rows.column(FEATURE_TS))
    inside = np.flatnonzero((t >= start_ns) & (t <= end_ns))
    frame = rows.select(keys).to_pandas().iloc[inside].assign(_t=t[inside], _i=inside)
    newest = frame.sort_values("_t", kind="stable").drop_duplicates(keys, keep="last")["_i"].to_numpy()
    return take_rows(rows, np.sort(newest)).rename_columns({FEATURE_TS: timestamp_field})


def _join_view(
    store: ExactRayOfflineStore,
    config: RepoConfig,
    fv: FeatureView,
    feats: list[str],
    names: list[str],
    blocks: list,
    entity_schema: pa.Schema,
    event_col: str,
    ) -> list:
    """Entity blocks (object refs of Arrow tables) -> one block per partition, with the
    view's features `feats` appended under `names`."""
    import ray

    source = fv.batch_source
    if source.field_mapping or source.created_timestamp_column:
        raise ValueError(f"ExactRayOfflineStore: feature view {fv.name!r} uses a field mapping or created-timestamp column")
    source_keys, keys = join_keys(fv, entity_schema.names)
    partitions = config.offline_store.partitions
    ttl_ns = int(fv.ttl.total_seconds() * 1e9) if fv.ttl else None
    renames = {**dict(zip(source_keys, keys)), source.timestamp_field: FEATURE_TS, **dict(zip(feats, names))}
    empty, source_pieces = _shuffled_source(store, config, source, renames, keys, entity_schema)
    split = ray.remote(_split).options(num_returns=partitions)
    entity_pieces = [_pieces(split.remote(b, keys, partitions), partitions) for b in blocks]
    join = ray.remote(_join)
    return [
        join.remote(
            len(entity_pieces), keys, event_col, names, ttl_ns, *[e[p] for e in entity_pieces], empty, *[f[p] for f in source_pieces]
        )
        for p in range(partitions)
    ]


def _pieces(refs, partitions: int) -> list:
    """The refs of a `num_returns=partitions` task as a list (Ray returns one ref for 1)."""
    return refs if partitions > 1 else [refs]


def _shuffled_source(
    store: ExactRayOfflineStore,
    config: RepoConfig,
    source,
    renames: dict[str, str],
    keys: list[str],
    entity_schema: pa.Schema | None,
) -> tuple[Any, list[list]]:
    """A FileSource's parquet rows, columns renamed by `renames` (its timestamp to FEATURE_TS)
    and `keys` cast to their types in `entity_schema` (None: the source's own), split by key
    hash in one task per row group: (an empty piece with their schema, the pieces of each
    row group). Feast's `_get_source_path` raises ValueError for other sources."""
    import ray

    files = pads.dataset(store._get_source_path(source, config), format="parquet")
    key_types = {k: (files.schema if entity_schema is None else entity_schema).field(k).type for k in keys}
    partitions = config.offline_store.partitions
    empty = ray.put(_split_features(files.schema.empty_table(), renames, key_types, 1)[0])
    read = ray.remote(_read_and_split).options(num_returns=partitions)
    return empty, [
        _pieces(read.remote(files.filesystem, path, group, renames, key_types, partitions), partitions)
        for path in files.files
        for group in range(pq.ParquetFile(files.filesystem.open_input_file(path)).num_row_groups)
    ]
