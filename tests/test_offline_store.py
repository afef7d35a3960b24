"""The default offline store (loopfm.features.offline_store.AsofDuckDBOfflineStore) returns
exactly what Feast's own DuckDB store returns, on real Feast and the shared run: the same
rows, values, dtypes and order, ttl and full feature names included."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore

from loopfm.features.offline_store import AsofDuckDBOfflineStore, take_rows
from loopfm.features.store import historical_features, open_store
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths


@pytest.fixture(scope="module")
def stock_store(materialized_run, redis_url):
    """The same repo served by Feast's DuckDB store (its ibis point-in-time join)."""
    s = open_store(materialized_run, redis_url)
    s._get_provider()._offline_store = DuckDBOfflineStore()
    return s


def _entities(run, part: str) -> pd.DataFrame:
    return read_parquet(RunPaths(run).features / f"vm_{part}_entities.parquet")


def test_the_feature_repo_retrieves_through_the_as_of_store(store):
    assert type(store._get_provider().offline_store) is AsofDuckDBOfflineStore


@pytest.mark.parametrize("part", ["train", "eval"])
def test_training_sets_equal_feast_duckdb_ones(store, stock_store, materialized_run, part):
    entities = _entities(materialized_run, part)
    mine, feast = (historical_features(s, entities, "vm_loopfm_kd") for s in (store, stock_store))
    assert mine["fm_codes"].notna().mean() > 0.5
    pd.testing.assert_frame_equal(mine, feast, check_exact=True)


def _odd_rows(run) -> pd.DataFrame:
    """300 eval rows in reverse time order, 60 of them twice, and 3 unknown users and items."""
    entities = _entities(run, "eval").head(300)
    unknown = entities.head(3).assign(user_id=10**12, item_id=-7, vertical="nowhere")
    return pd.concat([entities.iloc[::-1], entities.head(60), unknown], ignore_index=True)


def test_duplicates_unknowns_and_time_zones_come_back_as_from_feast(store, stock_store, materialized_run):
    frame = _odd_rows(materialized_run)
    frame["event_timestamp"] = frame["event_timestamp"].dt.tz_convert("Europe/Berlin").dt.as_unit("ns")  # both return UTC µs
    mine = historical_features(store, frame, "vm_loopfm")
    pd.testing.assert_frame_equal(mine, historical_features(stock_store, frame, "vm_loopfm"), check_exact=True)
    assert mine.tail(3)[["fm_codes", "category", "item_ids"]].isna().all().all()


def test_ttl_and_full_feature_names_follow_feast(store, materialized_run):
    frame = _odd_rows(materialized_run).assign(_row=lambda f: range(len(f)))
    views = []
    for name in ("fm_history", "vm_click_history", "item_features"):
        fv = store.get_feature_view(name).__copy__()
        fv.ttl = timedelta(hours=6) if name != "item_features" else fv.ttl
        views.append(fv)
    refs = [f"{fv.name}:{f.name}" for fv in views for f in fv.features]
    args = (store.config, views, refs, frame, store.registry, store.project, True)
    mine, feast = (
        cls.get_historical_features(*args).to_df().sort_values("_row", ignore_index=True)
        for cls in (AsofDuckDBOfflineStore, DuckDBOfflineStore)
    )
    pd.testing.assert_frame_equal(mine, feast, check_exact=True)
    codes = mine["fm_history__fm_codes"]
    assert 3 < codes.isna().sum() < len(frame) - 3  # the 6 h ttl drops some histories, not all


def test_entity_rows_without_a_view_s_join_key_are_refused_by_name(store, materialized_run):
    with pytest.raises(ValueError, match="join keys \\['item_id'\\] of feature view 'item_features'"):
        historical_features(store, _entities(materialized_run, "eval").head(5).drop(columns="item_id"), "vm_base")


def test_taking_rows_across_chunks_keeps_values_types_order_and_nulls():
    chunks = [pa.array([b"a", b"bb", None]), pa.array([b"ccc"]), pa.array([], pa.binary()), pa.array([b"dddd", b""])]
    table = pa.table({"codes": pa.chunked_array(chunks), "n": pa.chunked_array([[1, 2, 3], [4], [], [5, 6]])})
    rows = np.array([5, -1, 0, 3, 3, 1, 2, -1, 4])
    got = take_rows(table, rows)
    assert got.equals(table.take(pa.array(rows, mask=rows < 0)))  # what Arrow's own take gives
    assert got.schema == table.schema
    assert take_rows(table, np.array([5, 0], np.uint64)).equals(table.take([5, 0]))  # Arrow's sort_indices are uint64


def test_rows_of_a_binary_column_past_2_gib_are_taken_without_an_offset_overflow():
    """3.3 GB of fp32 FM histories made Arrow's take fail ("offset overflow while
    concatenating arrays"): three chunks of one 750 MB value each (one shared buffer)."""
    blob = pa.py_buffer(bytes(750 * 2**20))
    big = pa.Array.from_buffers(pa.binary(), 1, [None, pa.py_buffer(np.array([0, blob.size], np.int32).tobytes()), blob])
    column = pa.chunked_array([pa.array([b"x"]), big, big, big, pa.array([b"y"])])
    with pytest.raises(pa.ArrowInvalid, match="offset overflow"):
        column.take([0])  # the defect, as Arrow has it
    got = take_rows(pa.table({"codes": column}), np.array([4, -1, 0]))
    assert got.column("codes").to_pylist() == [b"y", None, b"x"] and got.schema.field("codes").type == pa.binary()
    two = take_rows(pa.table({"codes": column}), np.array([1, 4, 2, 3]))  # 2.2 GiB of rows: 64-bit offsets
    assert two.schema.field("codes").type == pa.large_binary() and two.num_rows == 4
    assert pc.binary_length(two.column("codes")).to_pylist() == [blob.size, 1, blob.size, blob.size]
