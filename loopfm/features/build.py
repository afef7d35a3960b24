"""Structuring: the embedding log and the impressions -> Feast source tables and entity frames.

Everything is built on dense ids; the tables are written keyed by the source ids (Feast's
join keys, loopfm/data/ids.py), with each item's dense index as the `item_index` feature.

Histories are snapshots: one row per (user, time the sequence changed), holding the last L
elements available at or before that time. Feast's point-in-time join takes, for an entity
row at time e, the newest snapshot stamped <= e. Entity rows are stamped 1 µs (one tick
of the project's time unit) before their impression, so a snapshot that includes the
impression itself (logging delay 0) can never reach it: histories hold exactly the elements
available strictly before the example.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import pandas as pd

from loopfm.core.config import RunConfig
from loopfm.contract.names import (
    FM_HISTORY_FEATURE,
    ITEM_ACTIVITY,
    ITEM_COUNT_FEATURES,
    ITEM_FEATURES,
    ITEM_INDEX,
    VM_COUNT_FEATURES,
    VM_HISTORY_FEATURE,
)
from loopfm.core.engine import LOCAL, Engine
from loopfm.core.files import read_parquet, staged_dir, write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.sequences import last_n_before
from loopfm.core.timeunits import US_PER_DAY, from_unix_us, unix_us
from loopfm.data.ids import IdMap, write_entity_types

ENTITY_OFFSET = pd.Timedelta(microseconds=1)  # one tick of the project's time unit


def _snapshots(user: np.ndarray, available_us: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snapshot times (one per distinct (user, availability time)) and, for each, the indices
    of the last `length` elements available at or before it (-1 padded on the left)."""
    snap = pd.DataFrame({"u": user, "s": available_us}).drop_duplicates().to_numpy()
    idx = last_n_before(user, available_us, snap[:, 0], snap[:, 1] + 1, length)
    return snap[:, 0], snap[:, 1], idx


def _pack_rows(rows: np.ndarray, idx: np.ndarray) -> list[bytes]:
    """Concatenate rows[idx] (oldest first), skipping padding, into one blob per snapshot."""
    if len(rows) == 0:  # snapshots with nothing to pack (a vertical's users who never clicked)
        return [b""] * len(idx)
    gathered = rows[np.clip(idx, 0, None)]
    counts = (idx >= 0).sum(1)
    n = idx.shape[1]
    return [gathered[i, n - c :].tobytes() for i, c in enumerate(counts)]


def fm_history_members(label: np.ndarray, events: str) -> np.ndarray:
    """Which events' codes enter the FM history (`fm.history_events`): label [N] 0/1 -> [N] bool,
    the clicked events or every impression."""
    return label == 1 if events == "clicks" else np.ones(len(label), dtype=bool)


def build_fm_history(log: pd.DataFrame, member: np.ndarray, length: int) -> pd.DataFrame:
    """Per-user sequences of the last `length` FM codes of the events where `member` [N bool]
    holds (see fm_history_members), all verticals."""
    c = log[member]
    available = unix_us(c["available_at"]).to_numpy()
    user, snap_us, idx = _snapshots(c["user_id"].to_numpy(), available, length)
    codes = np.stack([np.frombuffer(b, dtype=np.uint8) for b in c["fm_code"]]) if len(c) else np.zeros((0, 1), np.uint8)
    until = unix_us(c["fm_trained_until"]).to_numpy()
    return pd.DataFrame(
        {
            "user_id": user,
            "event_timestamp": from_unix_us(snap_us),
            FM_HISTORY_FEATURE: _pack_rows(codes, idx),
            "fm_newest_available_at_us": np.where(idx >= 0, available[np.clip(idx, 0, None)], 0).max(1),
            "fm_trained_until_us": np.where(idx >= 0, until[np.clip(idx, 0, None)], 0).max(1),
        }
    )


def _counts_so_far(key: np.ndarray, t: np.ndarray, label: np.ndarray, names: tuple[str, str]) -> pd.DataFrame:
    """One row per distinct (key, t), in (key, t) order: the impressions and clicks of `key` at
    or before t (that time's own included), named `names`."""
    shown = pd.DataFrame({"key": key, "t": t, "label": label}).sort_values(["key", "t"], kind="stable")
    by_key = shown.groupby("key", sort=False)
    impressions, clicks = names
    shown[impressions], shown[clicks] = by_key.cumcount() + 1, by_key["label"].cumsum()
    return shown.drop_duplicates(["key", "t"], keep="last").drop(columns="label")


def build_item_activity(imp: pd.DataFrame) -> pd.DataFrame:
    """Per-item snapshots at each time the item was shown: its impressions and clicks so far by
    every user, in every vertical (that time's own included; entity rows sit 1 µs earlier). The
    item's click rate up to the request, which a bias fitted on the training window cannot
    know: measured on MovieLens, a logistic regression on it and the user's rate beat every
    model without it (docs/training.md, "Click rates so far")."""
    snap = _counts_so_far(imp["item_id"].to_numpy(), unix_us(imp["event_timestamp"]).to_numpy(), imp["label"].to_numpy(),
                          ITEM_COUNT_FEATURES)  # fmt: skip
    return pd.DataFrame({"item_id": snap["key"].to_numpy(), "event_timestamp": from_unix_us(snap["t"].to_numpy()),
                         **{f: snap[f].to_numpy(np.int64) for f in ITEM_COUNT_FEATURES}})  # fmt: skip


def build_vm_click_history(imp: pd.DataFrame, verticals: Sequence[str], length: int) -> pd.DataFrame:
    """Per (user, vertical) snapshots at each of the user's impression times in that vertical:
    the last `length` clicked item ids, and the impressions and clicks counted so far (both
    including that time's own). Every vertical's VM reads its own rows of the one view; the
    counts give the VM the user's click propensity, which a history of clicks alone cannot
    (measured on MovieLens: docs/training.md)."""
    frames = []
    for vertical in verticals:
        v = imp[imp["vertical"] == vertical]
        snap = _counts_so_far(v["user_id"].to_numpy(), unix_us(v["event_timestamp"]).to_numpy(), v["label"].to_numpy(),
                              VM_COUNT_FEATURES).rename(columns={"key": "user_id"})  # fmt: skip
        c = v[v["label"] == 1]
        idx = last_n_before(c["user_id"].to_numpy(), unix_us(c["event_timestamp"]).to_numpy(),
                            snap["user_id"].to_numpy(), snap["t"].to_numpy() + 1, length)  # fmt: skip
        item_rows = c["item_id"].to_numpy().astype("<i4").reshape(-1, 1).view(np.uint8)
        frames.append(pd.DataFrame({"user_id": snap["user_id"].to_numpy(), "vertical": vertical,
                                    "event_timestamp": from_unix_us(snap["t"].to_numpy()),
                                    VM_HISTORY_FEATURE: _pack_rows(item_rows, idx),
                                    **{f: snap[f].to_numpy(np.int64) for f in VM_COUNT_FEATURES}}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def _histories(imp: pd.DataFrame, log: pd.DataFrame, cfg: RunConfig, engine: Engine) -> dict[str, pd.DataFrame]:
    """The two history tables, built per user (every user's rows in one call, on any engine)."""
    length = cfg.vm.history_length
    vm_history = partial(build_vm_click_history, verticals=cfg.world.verticals, length=length)
    log = log.assign(member=fm_history_members(imp["label"].to_numpy(), cfg.fm.history_events))

    def fm_history(rows: pd.DataFrame) -> pd.DataFrame:
        return build_fm_history(rows.drop(columns="member"), rows["member"].to_numpy(), length)

    tables = {"vm_click_history": engine.map_users(vm_history, imp), "fm_history": engine.map_users(fm_history, log)}
    # one snapshot per (entity, time): this order is canonical, so every engine writes the same file
    return {name: t.sort_values([c for c in ("user_id", "vertical", "event_timestamp") if c in t], kind="stable")
            .reset_index(drop=True) for name, t in tables.items()}  # fmt: skip


def keyed_by_source_ids(df: pd.DataFrame, id_maps: Sequence[IdMap]) -> pd.DataFrame:
    """`df` with its dense user and item ids replaced by the source ids, Feast's join keys."""
    return df.reset_index(drop=True).assign(**{m.key: m.to_source(df[m.key]) for m in id_maps if m.key in df})


def item_features(items: pd.DataFrame, upserts: pd.DataFrame, static_ts: pd.Timestamp) -> pd.DataFrame:
    """The `item_features` source: the run's catalog stamped `static_ts` (before every event),
    then each streamed upsert (loopfm/data/streamed.py: catalog_upserts) stamped when it was
    written, so a row at time t reads the newest attributes written before t."""
    rows = [items[["item_id", "category", "brand", "price_bucket"]].assign(event_timestamp=static_ts)]
    if not upserts.empty:
        rows.append(upserts.rename(columns={"written_at": "event_timestamp"}))
    table = pd.concat(rows, ignore_index=True).astype({"event_timestamp": "datetime64[us, UTC]"})
    return table.assign(**{ITEM_INDEX: table["item_id"]})[["item_id", *ITEM_FEATURES, "event_timestamp"]]


def build_feature_tables(
    paths: RunPaths, cfg: RunConfig, progress=partial(print, flush=True), engine: Engine = LOCAL
) -> dict[str, int]:
    """Write the Feast sources and the VM's train/eval entity frames, all or none (a staged
    folder swapped in at the end); return their row counts. `engine` maps the two history
    builders over shards of users (loopfm/core/engine.py).

    The events are the run's impressions and the live loop's streamed ones, with their codes
    as logged and available (loopfm/data/streamed.py: run_tables); the id maps first grow by
    the new users and items the stream met. A new user has no `user_profile` row: the VM reads
    its profile as unknown (index 0), online and offline alike."""
    from loopfm.data import streamed as offline

    if not np.array_equal(read_parquet(paths.fm_log, columns=["impression_id"])["impression_id"].to_numpy(),
                          read_parquet(paths.table("impressions"), columns=["impression_id"])["impression_id"].to_numpy()):  # fmt: skip
        raise ValueError(f"{paths.fm_log} does not match impressions: re-run `loopfm fm log`")
    imp, log = offline.run_tables(paths)
    start = pd.Timestamp(cfg.world.start_date, tz="UTC")
    static_ts = start - pd.Timedelta(days=1)
    users = read_parquet(paths.table("users"))
    id_maps = offline.grow_id_maps(paths)
    tables = {
        "user_profile": users[["user_id", "age_bucket", "gender"]].assign(event_timestamp=static_ts),
        "item_features": item_features(read_parquet(paths.table("items")), offline.catalog_upserts(paths), static_ts),
        ITEM_ACTIVITY: build_item_activity(imp),
        **_histories(imp, log, cfg, engine),
    }

    day = (unix_us(imp["event_timestamp"]) - start.value // 1000) // US_PER_DAY
    target = (imp["vertical"] == cfg.vm.target_vertical).to_numpy()
    entities = pd.DataFrame(
        {
            "impression_id": imp["impression_id"],
            "user_id": imp["user_id"],
            "item_id": imp["item_id"],
            "vertical": imp["vertical"],
            "hour": imp["hour"],
            "event_timestamp": imp["event_timestamp"] - ENTITY_OFFSET,
            "label": imp["label"],
            "fm_logit": log["fm_logit"],  # the KD soft label, logged by a causal checkpoint
            "kd_trained_until": log["fm_trained_until"],  # the checkpoint behind fm_logit
        }
    )
    eval_start = cfg.world.n_days - cfg.vm.eval_days
    tables["vm_train_entities"] = entities[target & (day >= cfg.fm.warmup_days).to_numpy() & (day < eval_start).to_numpy()]
    tables["vm_eval_entities"] = entities[target & (day >= eval_start).to_numpy()]
    with staged_dir(paths.features) as out:
        for name, df in tables.items():
            write_parquet(keyed_by_source_ids(df, id_maps), out / f"{name}.parquet")
            progress(f"  wrote {name}: {len(df)} rows")
        progress(f"  entity types: {write_entity_types(out, id_maps)}")
    return {name: len(df) for name, df in tables.items()}
