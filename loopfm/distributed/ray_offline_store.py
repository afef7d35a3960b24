"""Feast's Ray offline store with an exact point-in-time join (the `ray` offline profile).

Feast 0.67's `RayOfflineStore.get_historical_features` floors entity and feature
timestamps to whole seconds before its `merge_asof`, drops duplicate entity rows, joins
only within one `window_size_for_joins` window when a source exceeds the broadcast
threshold, and converts `Bytes` values through NumPy (trailing zero bytes stripped,
nulls as b'nan'); docs/scaling.md has the reproductions. `ExactRayOfflineStore`
replaces that one method and its retrieval job's conversions; everything else (Ray
start-up from the config, parquet reading, staging, `persist`) is Feast's.

The join, per feature view: entity rows and source rows are hash-partitioned by the
view's join keys (`partitions` groups), shuffled together with Ray Data's
`groupby().map_groups()`, and each group runs a backward as-of match on integer
nanoseconds (feature time <= entity time, and >= entity time - ttl), the newest feature
row winning. Values are taken by Arrow `take` from the source's own Arrow columns, so
bytes, integer types and nulls reach the result as they are in the source. Rows come
back in entity-row order, duplicates kept: what the DuckDB store returns.

Selected by `feature_repo/feature_store.ray.yaml` (`LOOPFM_OFFLINE_STORE=ray`); Ray starts
locally unless the config's `ray_address` (or RAY_ADDRESS) names a cluster.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
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

ROW = "_loopfm_row"  # entity-row position, carried through every shuffle, dropped at the end
PART, SIDE, FEATURE_TS = "_loopfm_part", "_loopfm_side", "_loopfm_feature_ts"
ENTITY, FEATURE = 0, 1


class ExactRayOfflineStoreConfig(RayOfflineStoreConfig):
    """Feast's Ray store options plus the number of hash partitions of the join."""

    type: Literal["loopfm.distributed.ray_offline_store.ExactRayOfflineStore"] = (
        "loopfm.distributed.ray_offline_store.ExactRayOfflineStore"
    )
    partitions: PositiveInt = 8  # groups per view join: a few per worker core


class ExactRetrievalJob(RayRetrievalJob):
    """Feast's Ray retrieval job, read through Arrow only: `to_arrow` concatenates the
    result blocks as they are, `to_df` is its pandas conversion (ints with nulls become
    float64, bytes stay bytes, as the DuckDB store's frame)."""

    def to_arrow(self, validation_reference=None, timeout: int | None = None) -> pa.Table:
        import ray

        dataset = self._get_ray_dataset()
        tables = ray.get(list(dataset.to_arrow_refs()))
        return pa.concat_tables(tables) if tables else dataset.schema().base_schema.empty_table()

    def to_df(self, validation_reference=None, timeout: int | None = None) -> pd.DataFrame:
        if self._cached_df is None:
            self._cached_df = self.to_arrow().to_pandas()
        return self._cached_df

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self.to_arrow()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self.to_df()


def _partition(table: pa.Table, keys: list[str], partitions: int) -> np.ndarray:
    """Partition id (int64, shape (rows,)) of each row: a hash of its join-key values that
    is the same in every process (pandas' seeded SipHash), modulo `partitions`."""
    hashes = pd.util.hash_pandas_object(table.select(keys).to_pandas(), index=False).to_numpy()
    return (hashes % np.uint64(partitions)).astype(np.int64)


def _nanoseconds(column: pa.ChunkedArray) -> np.ndarray:
    """A timestamp column (any unit, any zone) as int64 UTC nanoseconds, nulls as int64 min."""
    ns = column.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64())
    return ns.fill_null(np.iinfo(np.int64).min).to_numpy()


def asof_positions(
    entity_keys: pd.DataFrame, entity_ns: np.ndarray, feature_keys: pd.DataFrame, feature_ns: np.ndarray, ttl_ns: int | None
) -> np.ndarray:
    """For each entity row, the position of the newest feature row with equal keys and
    feature_ns <= entity_ns (and >= entity_ns - ttl_ns when a ttl is given), else -1.
    Shapes: (n,) and (m,) int64 ns, key frames of n and m rows; returns (n,) int64."""
    left = entity_keys.assign(_t=entity_ns, _i=np.arange(len(entity_ns))).sort_values("_t", kind="stable")
    right = feature_keys.assign(_t=feature_ns, _j=np.arange(len(feature_ns))).sort_values("_t", kind="stable")
    keys = list(entity_keys.columns)
    matched = pd.merge_asof(left, right, on="_t", by=keys, direction="backward", allow_exact_matches=True)
    found = matched["_j"].to_numpy(dtype=float, na_value=np.nan)
    position = np.where(np.isnan(found), -1, found).astype(np.int64)
    if ttl_ns is not None:
        too_old = position >= 0
        too_old[too_old] = feature_ns[position[too_old]] < matched["_t"].to_numpy()[too_old] - ttl_ns
        position[too_old] = -1
    out = np.empty(len(entity_ns), dtype=np.int64)
    out[matched["_i"].to_numpy()] = position
    return out


def _join_group(entity_columns: list[str], keys: list[str], features: list[str], event_col: str, ttl_ns: int | None):
    """The per-group step: entity rows of one partition with their as-of feature values."""

    def join(group: pa.Table) -> pa.Table:
        side, stamped = group.column(SIDE).to_numpy(), group.column(FEATURE_TS).is_valid().to_numpy()
        entity, source = group.filter(pa.array(side == ENTITY)), group.filter(pa.array((side == FEATURE) & stamped))
        position = asof_positions(
            entity.select(keys).to_pandas(),
            _nanoseconds(entity.column(event_col)),
            source.select(keys).to_pandas(),
            _nanoseconds(source.column(FEATURE_TS)),
            ttl_ns,
        )
        taken = source.select(features).take(pa.array(position, mask=position < 0))
        return pa.Table.from_arrays(
            [*entity.select(entity_columns).columns, *taken.columns], names=[*entity_columns, *features]
        )

    return join


class ExactRayOfflineStore(RayOfflineStore):
    """`RayOfflineStore` whose `get_historical_features` is an exact, microsecond (indeed
    nanosecond) point-in-time join that keeps every entity row in order; see the module doc."""

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

        if not isinstance(config.offline_store, ExactRayOfflineStoreConfig):
            raise ValueError(f"ExactRayOfflineStore needs its own config, got {type(config.offline_store).__name__}")
        if not isinstance(entity_df, pd.DataFrame):
            raise ValueError("ExactRayOfflineStore needs entity_df as a pandas DataFrame (no SQL, no entity-less mode)")
        if any(ref.split(":", 1)[0] not in {fv.projection.name_to_use() for fv in feature_views} for ref in feature_refs):
            raise ValueError(f"ExactRayOfflineStore serves plain feature views only, got refs {feature_refs}")
        store = ExactRayOfflineStore()
        store._init_ray(config)
        event_col = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes)))
        partitions = config.offline_store.partitions
        entity = pa.Table.from_pandas(entity_df.assign(**{ROW: np.arange(len(entity_df))}), preserve_index=False)
        result = ray.data.from_arrow(entity)
        for fv in feature_views:
            feats = [ref.split(":", 1)[1] for ref in feature_refs if ref.split(":", 1)[0] == fv.projection.name_to_use()]
            if feats:
                result = _join_view(store, config, registry, project, fv, feats, result, event_col, partitions, full_feature_names)
        result = result.sort(ROW).drop_columns([ROW])
        job = ExactRetrievalJob(result, staging_location=config.offline_store.storage_path, config=config.offline_store)
        job._full_feature_names, job._on_demand_feature_views = full_feature_names, []
        job._feature_refs, job._entity_df = feature_refs, entity_df
        return job


def _join_view(
    store: ExactRayOfflineStore,
    config: RepoConfig,
    registry: BaseRegistry,
    project: str,
    fv: FeatureView,
    feats: list[str],
    result,
    event_col: str,
    partitions: int,
    full_feature_names: bool,
):
    """`result` (a Ray Dataset of entity rows) with the view's features `feats` appended."""
    source = fv.batch_source
    if source.field_mapping or source.created_timestamp_column:
        raise ValueError(f"ExactRayOfflineStore: feature view {fv.name!r} uses a field mapping or created-timestamp column")
    source_keys = [registry.get_entity(e, project).join_key for e in fv.entities]
    keys = [fv.projection.join_key_map.get(k, k) for k in source_keys]
    names = [f"{fv.projection.name_to_use()}__{f}" if full_feature_names else f for f in feats]
    entity_schema = result.schema().base_schema
    missing = [k for k in keys if k not in entity_schema.names]
    if missing:
        raise ValueError(f"entity_df lacks the join keys {missing} of feature view {fv.name!r}")
    ttl_ns = int(fv.ttl.total_seconds() * 1e9) if fv.ttl else None
    rows = store._resolve_source_dataset(source, config, columns=[*source_keys, source.timestamp_field, *feats])
    source_schema = rows.schema().base_schema
    feature_types = [source_schema.field(f).type for f in feats]

    def tag_entities(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        extra = {FEATURE_TS: pa.nulls(n, pa.timestamp("ns", tz="UTC"))}
        extra |= {name: pa.nulls(n, t) for name, t in zip(names, feature_types)}
        batch = batch.append_column(PART, pa.array(_partition(batch, keys, partitions))).append_column(
            SIDE, pa.array(np.full(n, ENTITY, np.int8))
        )
        for name, column in extra.items():
            batch = batch.append_column(name, column)
        return batch

    def tag_features(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        renamed = batch.rename_columns(
            {**dict(zip(source_keys, keys)), source.timestamp_field: FEATURE_TS, **dict(zip(feats, names))}
        )
        out = {}
        for field in entity_schema:
            if field.name in keys:
                out[field.name] = renamed.column(field.name).cast(field.type)
            else:
                out[field.name] = pa.nulls(n, field.type)
        out[PART] = pa.array(_partition(pa.table({k: out[k] for k in keys}), keys, partitions))
        out[SIDE] = pa.array(np.full(n, FEATURE, np.int8))
        out[FEATURE_TS] = renamed.column(FEATURE_TS).cast(pa.timestamp("ns", tz="UTC"))
        out |= {name: renamed.column(name) for name in names}
        return pa.table(out)

    both = result.map_batches(tag_entities, batch_format="pyarrow").union(rows.map_batches(tag_features, batch_format="pyarrow"))
    return both.groupby(PART).map_groups(
        _join_group(entity_schema.names, keys, names, event_col, ttl_ns), batch_format="pyarrow"
    )
