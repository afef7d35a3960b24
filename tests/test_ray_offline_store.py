"""The Ray offline profile (feature_store.ray.yaml, loopfm.distributed.ray_offline_store)
returns exactly what the DuckDB profile returns, on real Feast and a real local Ray.

The shared run logs with delay 0 at microsecond event times, so a code is available in
the very second (often the very millisecond) of its own impression: Feast's own Ray store
floors both sides to whole seconds and joins such codes (docs/scaling.md)."""

from __future__ import annotations

import pandas as pd
import pytest

from loopfm.core.config import RunConfig
from loopfm.data.vocab import Vocab
from loopfm.eval.metrics import quality
from loopfm.features.store import feature_store_yaml, historical_features, open_store
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import unix_us
from loopfm.vm.train import fit_variant, tensor_spec


@pytest.fixture(scope="module")
def ray_store(materialized_run, redis_url):
    """The Ray profile's FeatureStore on the shared run; Ray starts once for the module."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPFM_OFFLINE_STORE", "ray")
        yield open_store(materialized_run, redis_url)
    ray.shutdown()


@pytest.fixture(scope="module")
def both_profiles(ray_store, store, materialized_run) -> dict[str, dict[str, pd.DataFrame]]:
    """{"ray"|"duckdb": {"train"|"eval": the vm_loopfm_kd rows of that window}}."""
    features = RunPaths(materialized_run).features
    entities = {part: read_parquet(features / f"vm_{part}_entities.parquet") for part in ("train", "eval")}
    return {
        name: {part: historical_features(s, frame, "vm_loopfm_kd") for part, frame in entities.items()}
        for name, s in (("ray", ray_store), ("duckdb", store))
    }


def test_the_world_has_what_floored_or_numpy_bytes_would_corrupt(both_profiles, materialized_run):
    rows = both_profiles["duckdb"]["train"]
    t = unix_us(rows["event_timestamp"]).to_numpy()
    assert (t % 1_000_000 != 0).mean() > 0.99  # sub-second entity times
    snapshots = read_parquet(RunPaths(materialized_run).features / "fm_history.parquet")
    pairs = rows[["user_id"]].assign(t=t).merge(snapshots.assign(s=unix_us(snapshots["event_timestamp"]))[["user_id", "s"]])
    leaks = ((pairs.s > pairs.t) & (pairs.s < pairs.t - pairs.t % 1_000_000 + 1_000_000)).sum()
    assert leaks > 0  # snapshots a second-floored join would wrongly see
    ids = rows["item_ids"].dropna()
    ids = ids[ids.map(len) > 0]  # b"": impressions so far but no click yet
    assert ids.map(lambda b: b.endswith(b"\x00")).mean() > 0.9  # int32 little-endian ids < 2**24
    # nulls in a Bytes column (fm_codes has none here: with the FM history of every impression,
    # every user of this world, active from its first day, has one by the VM's window)
    assert rows["item_ids"].isna().any()


@pytest.mark.parametrize("part", ["train", "eval"])
def test_ray_profile_returns_the_duckdb_rows(both_profiles, part):
    pd.testing.assert_frame_equal(both_profiles["ray"][part], both_profiles["duckdb"][part], check_exact=True)


def test_vm_trained_on_either_profile_reaches_the_same_auc(both_profiles, materialized_run):
    paths, cfg = RunPaths(materialized_run), RunConfig.load(materialized_run)
    spec = tensor_spec(cfg, Vocab.load(paths))
    auc = {}
    for name, frames in both_profiles.items():
        _, p, _ = fit_variant(cfg, spec, "loopfm_kd", frames["train"], frames["eval"], log=lambda _: None)
        auc[name] = quality(frames["eval"]["label"].to_numpy(), p)["auc"]
    assert auc["ray"] == auc["duckdb"] and auc["ray"] > 0.5


def test_duplicates_unknowns_and_entity_order_are_kept(ray_store, store, materialized_run):
    entities = read_parquet(RunPaths(materialized_run).features / "vm_eval_entities.parquet").head(300)
    unknown = entities.head(3).assign(user_id=10**12, item_id=-7, vertical="nowhere")
    frame = pd.concat([entities.iloc[::-1], entities.head(60), unknown], ignore_index=True)  # reversed time, 60 duplicates
    frame["event_timestamp"] = frame["event_timestamp"].dt.tz_convert("Europe/Berlin").dt.as_unit("ns")  # both return UTC µs
    ray_rows = historical_features(ray_store, frame, "vm_loopfm")
    pd.testing.assert_frame_equal(ray_rows, historical_features(store, frame, "vm_loopfm"), check_exact=True)
    assert len(ray_rows) == len(frame) and ray_rows.tail(3)[["fm_codes", "category", "item_ids"]].isna().all().all()


def test_materialization_reads_the_same_newest_rows(ray_store, store):
    """`feast materialize` writes what pull_latest_from_table_or_query returns."""
    start, end = pd.Timestamp("2000-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")
    for view in ("fm_history", "vm_click_history", "user_profile"):
        fv = store.get_feature_view(view)
        keys = [store.get_entity(e).join_key for e in fv.entities]
        tables = []
        for s in (ray_store, store):
            job = type(s._get_provider().offline_store).pull_latest_from_table_or_query(
                s.config, fv.batch_source, keys, [f.name for f in fv.features], "event_timestamp", None, start, end
            )
            tables.append(job.to_arrow().to_pandas().sort_values(keys, ignore_index=True))
        pd.testing.assert_frame_equal(tables[0], tables[1][tables[0].columns], check_exact=True)
        assert not tables[0].duplicated(keys).any()


def test_misconfigured_offline_profile_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("LOOPFM_OFFLINE_STORE", "spark")
    with pytest.raises(ValueError, match="LOOPFM_OFFLINE_STORE must be duckdb or ray, got 'spark'"):
        feature_store_yaml("redis://127.0.0.1:6379")
    monkeypatch.setenv("LOOPFM_OFFLINE_STORE", "ray")
    with pytest.raises(ValueError, match="no profile with a redis\\+cluster"):
        feature_store_yaml("redis+cluster://127.0.0.1:7000")
    assert feature_store_yaml("redis://127.0.0.1:6379").name == "feature_store.ray.yaml"


def test_entity_rows_without_a_view_s_join_key_are_refused(ray_store, materialized_run):
    entities = read_parquet(RunPaths(materialized_run).features / "vm_eval_entities.parquet").head(5)
    with pytest.raises(ValueError, match="join keys"):
        historical_features(ray_store, entities.drop(columns="vertical"), "vm_base")
