"""`loopfm ingest`: fresh impressions -> FM codes (offline) -> embedding log -> Feast push.

The FM runs here, in a batch job, never in the server. Every step is keyed by
`impression_id` and is an atomic file replacement that adds only what is missing, so the
command can be killed anywhere: a re-run completes a half-done batch, and a repeated batch
adds nothing.

  1. append the new impressions to data/impressions.parquet (an impression_id already
     stored with other values is refused: one id, one event);
  2. FM-log every impression the embedding log lacks, and append those rows to the log;
  3. recompute the newest history snapshots of every user in the batch, and the newest
     counts of every item in it, append them to the Feast batch sources
     (features/{fm_history,vm_click_history,item_activity}.parquet);
  4. push the same snapshots to the online store through Feast's push API.

Event time versus availability time: whatever an ingest adds became known when it was
ingested, however old its events. Its codes are logged as available at the ingest time at
the earliest, and a newest snapshot whose content the ingest changed is stamped with the
ingest time (never earlier than its own newest element). So a late event never reaches a
training row older than the ingest, and the push, newer than anything stored, is never
skipped by Feast's writer: online equals offline after every ingest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from loopfm.config import RunConfig
from loopfm.contract.names import ID_INT64, ITEM_ACTIVITY, ITEM_KEY, USER_KEY, VERTICAL_KEY
from loopfm.data.ids import IdMap, id_map_path, load_id_maps
from loopfm.io import RunPaths, from_unix_us, read_parquet, text_separator, write_parquet
from loopfm.parse import INT64_RANGE, BadValues, integers, text_ids, unix_times_us

EVENT_COLUMNS = ("impression_id", "user_id", "item_id", "vertical", "event_timestamp", "label")


class IngestError(ValueError):
    """A bad events file; the message names the file, the column and the row."""


def _first_bad(path: Path, column: str, bad, what: str) -> None:
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise IngestError(f"{path}: column {column!r}, row {row + 1}: {what} ({int(bad.sum())} such rows)")


def _parsed(path: Path, raw: pd.DataFrame, column: str, parse):
    """`parse(raw[column])` (loopfm.parse), its BadValues named by file, column and row."""
    _first_bad(path, column, raw[column].isna(), "missing value")
    try:
        return parse(raw[column])
    except BadValues as exc:
        _first_bad(path, column, exc.bad, exc.problem)
        raise


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV or TSV file, compressed or not (the separator follows the name: loopfm.io.text_separator;
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


def read_events(path: Path, cfg: RunConfig, paths: RunPaths, time_unit: str | None = None) -> pd.DataFrame:
    """`read_event_file` with dense user and item ids; users and items the run's id maps lack
    are refused, as is one impression_id with different values."""
    events = read_event_file(path, cfg, paths, time_unit)
    for id_map in load_id_maps(paths):  # source ids of the run's entity types -> dense ids (-1: unknown)
        events[id_map.key] = id_map.to_dense(events[id_map.key])
    _first_bad(path, "user_id", events["user_id"] < 0,
               f"user unknown to the FM (not in {id_map_path(paths, USER_KEY)}); new users need a retrained FM")  # fmt: skip
    _first_bad(path, "item_id", events["item_id"] < 0, f"item not in {id_map_path(paths, ITEM_KEY)}")
    events = events.drop_duplicates()
    _first_bad(path, "impression_id", events["impression_id"].duplicated(), "the same impression_id with different values")
    return events


def _source_ids(path: Path, raw: pd.DataFrame, id_map: IdMap) -> pd.Series:
    """A batch's id column as the run's source ids: exact int64 for an int64 entity (never
    through float64), text for a string one (a numeric column's ids in plain decimal: text_ids)."""
    if id_map.id_type == ID_INT64:
        return _parsed(path, raw, id_map.key, lambda v: integers(v, INT64_RANGE)).astype(np.int64)
    return _parsed(path, raw, id_map.key, text_ids).astype(str)


def _append_impressions(paths: RunPaths, events: pd.DataFrame, events_path: Path) -> int:
    """Append the events not yet stored; raise IngestError, writing nothing, if an
    impression_id is already stored with other values (a re-sent batch matches exactly)."""
    imp = read_parquet(paths.table("impressions"))
    stored = imp.merge(events, on="impression_id", suffixes=("", "_batch"))
    columns = [c for c in EVENT_COLUMNS if c != "impression_id"]
    differs = np.zeros(len(stored), dtype=bool)
    for c in columns:
        differs |= (stored[c] != stored[f"{c}_batch"]).to_numpy()
    if differs.any():
        ids = stored.loc[differs, "impression_id"].tolist()
        first = stored[differs].iloc[0]
        changed = {c: (first[c], first[f"{c}_batch"]) for c in columns if first[c] != first[f"{c}_batch"]}
        raise IngestError(f"{events_path}: impression_id(s) {ids[:10]}{' ...' if len(ids) > 10 else ''} already stored in "
                          f"{paths.table('impressions')} with other values (impression {ids[0]}, stored vs batch: {changed}); "
                          "an impression_id names one event: give new events new ids")  # fmt: skip
    new = events[~events["impression_id"].isin(imp["impression_id"])]
    if len(new):
        write_parquet(pd.concat([imp, new], ignore_index=True), paths.table("impressions"))
    return len(new)


def _append_fm_log(paths: RunPaths, cfg: RunConfig, ingested_at: pd.Timestamp) -> int:
    """Log what the embedding log lacks; a code logged now is available now at the earliest."""
    from loopfm.fm.stream import build_inputs, log_events

    log = read_parquet(paths.fm_log)
    arrays, imp = build_inputs(paths, cfg)
    rows = np.flatnonzero(~imp["impression_id"].isin(log["impression_id"]).to_numpy())
    if rows.size:
        fresh = log_events(paths, cfg, arrays, imp, rows, progress=False)
        fresh["available_at"] = fresh["available_at"].clip(lower=ingested_at)
        position = pd.Series(np.arange(len(imp)), index=imp["impression_id"])
        log = pd.concat([log, fresh], ignore_index=True)
        log = log.iloc[np.argsort(position.loc[log["impression_id"]].to_numpy(), kind="stable")]
        write_parquet(log.reset_index(drop=True), paths.fm_log)  # stays in impression order
    return int(rows.size)


def newest_snapshots(paths: RunPaths, cfg: RunConfig, users: np.ndarray, items: np.ndarray) -> dict[str, pd.DataFrame]:
    """Each user's newest history snapshot and each item's newest counts per pushed view, from
    the whole log, keyed by source ids as the Feast sources are (`users`, `items`: dense ids)."""
    from loopfm.features.build import (
        build_fm_history, build_item_activity, build_vm_click_history, fm_history_members, keyed_by_source_ids,
    )  # fmt: skip

    imp = read_parquet(paths.table("impressions"))
    log = read_parquet(paths.fm_log)
    mine = imp["user_id"].isin(users).to_numpy()
    snapshots = {
        "fm_history": build_fm_history(log[mine], fm_history_members(imp["label"].to_numpy()[mine], cfg.fm.history_events),
                                       cfg.vm.history_length),
        "vm_click_history": build_vm_click_history(imp[mine], cfg.world.verticals, cfg.vm.history_length),
        ITEM_ACTIVITY: build_item_activity(imp[imp["item_id"].isin(items)]),
    }
    id_maps = load_id_maps(paths)
    return {view: keyed_by_source_ids(df.sort_values("event_timestamp").groupby(entity_keys(df)).tail(1), id_maps)
            for view, df in snapshots.items()}  # fmt: skip


def entity_keys(snapshots: pd.DataFrame) -> list[str]:
    return [key for key in (USER_KEY, VERTICAL_KEY, ITEM_KEY) if key in snapshots]


def _stamp_and_append(paths: RunPaths, snapshots: dict[str, pd.DataFrame], ingested_at: pd.Timestamp) -> dict[str, pd.DataFrame]:
    """Per view: a recomputed newest snapshot equal to the stored newest one keeps that row
    (a re-run adds nothing); one the ingest changed is stamped max(its own time, the ingest
    time, just after the stored newest) and appended. Returns the rows to push."""
    out = {}
    for view, df in snapshots.items():
        path = paths.features / f"{view}.parquet"
        stored = read_parquet(path)
        keys = entity_keys(df)
        content = [c for c in df.columns if c not in (*keys, "event_timestamp")]
        newest = stored.sort_values("event_timestamp").groupby(keys).tail(1)
        both = df.merge(newest, on=keys, how="left", suffixes=("", "_stored"), indicator=True)
        same = (both["_merge"] == "both").to_numpy()
        for c in content:
            same &= (both[c] == both[f"{c}_stored"]).to_numpy()
        after_stored = both["event_timestamp_stored"] + pd.Timedelta(microseconds=1)
        stamp = np.maximum(both["event_timestamp"], ingested_at)
        stamp = stamp.where(after_stored.isna() | (stamp >= after_stored), after_stored)
        both["event_timestamp"] = stamp.where(~same, both["event_timestamp_stored"])
        rows = both[df.columns].astype({"event_timestamp": "datetime64[us, UTC]"})
        if (~same).any():
            write_parquet(pd.concat([stored, rows[~same]], ignore_index=True), path)
        out[view] = rows.reset_index(drop=True)
    return out


def ingest(run_dir: Path, events_path: Path, redis_url: str, log=print, time_unit: str | None = None) -> dict:
    """Run the four steps (module docstring); return what each added."""
    from loopfm.pipeline.stages import stage
    from loopfm.features.store import open_store

    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    ingested_at = pd.Timestamp.now(tz="UTC").as_unit("us")  # when this batch becomes available
    events = read_events(events_path, cfg, paths, time_unit)
    with stage(1, 4, f"append {len(events)} impressions from {events_path}"):
        added = _append_impressions(paths, events, events_path)
    with stage(2, 4, "FM-log the impressions the embedding log lacks (offline, never in the server)"):
        logged = _append_fm_log(paths, cfg, ingested_at)
    with stage(3, 4, "recompute the batch's users' newest histories and items' counts into the Feast sources"):
        newest = newest_snapshots(paths, cfg, events["user_id"].unique(), events["item_id"].unique())
        snapshots = _stamp_and_append(paths, newest, ingested_at)
    with stage(4, 4, "push them to the online store (Feast push API)"):
        from feast.data_source import PushMode

        store = open_store(run_dir, redis_url)
        for view, df in snapshots.items():
            if len(df):
                store.push(f"{view}_push", df.reset_index(drop=True), to=PushMode.ONLINE)
    summary = {"events": len(events), "new_impressions": added, "newly_logged": logged,
               "pushed": {view: len(df) for view, df in snapshots.items()}}  # fmt: skip
    log(summary)
    return summary
