"""`loopfm ingest`: fresh impressions -> FM codes (offline) -> embedding log -> Feast push.

The FM runs here, in a batch job, never in the server. Every step is keyed by
`impression_id` and is an atomic file replacement that adds only what is missing, so the
command can be killed anywhere: a re-run completes a half-done batch, and a repeated batch
adds nothing.

  1. append the new impressions to data/impressions.parquet;
  2. FM-log every impression the embedding log lacks, and append those rows to the log;
  3. recompute the newest history snapshots of every user in the batch, append them to the
     Feast batch sources (features/{fm_history,vm_click_history}.parquet);
  4. push the same snapshots to the online store through Feast's push API.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from loopfm.config import RunConfig
from loopfm.data.dataset import Vocab
from loopfm.io import RunPaths, read_parquet, write_parquet

EVENT_COLUMNS = ("impression_id", "user_id", "item_id", "vertical", "event_timestamp", "label")


class IngestError(ValueError):
    """A bad events file; the message names the file, the column and the row."""


def _first_bad(path: Path, column: str, bad: pd.Series, what: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise IngestError(f"{path}: column {column!r}, row {row + 1}: {what} ({int(bad.sum())} such rows)")


def read_events(path: Path, cfg: RunConfig, paths: RunPaths) -> pd.DataFrame:
    """Load and check a batch of impressions (parquet or CSV) against the run it joins."""
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    try:
        raw = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many kinds for a file that is not what it says
        raise IngestError(f"{path}: not a readable {'CSV' if path.suffix.lower() == '.csv' else 'parquet'} file: {exc}") from None
    missing = [c for c in EVENT_COLUMNS if c not in raw.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; expected {list(EVENT_COLUMNS)}")
    events = pd.DataFrame({"vertical": raw["vertical"].astype(str)})
    for column in ("impression_id", "user_id", "item_id", "label"):
        values = pd.to_numeric(raw[column], errors="coerce")
        _first_bad(path, column, values.isna() | (values != values.round()), "not an integer")
        events[column] = values.astype(np.int64)
    stamps = pd.to_datetime(raw["event_timestamp"], utc=True, errors="coerce")
    _first_bad(path, "event_timestamp", stamps.isna(), "not a timestamp")
    events["event_timestamp"] = stamps.astype("datetime64[us, UTC]")
    events["hour"] = events["event_timestamp"].dt.hour.astype(np.int64)

    vocab = Vocab.load(paths)
    catalogue = read_parquet(paths.table("items"), columns=["item_id"])["item_id"]
    _first_bad(path, "label", ~events["label"].isin([0, 1]), "labels must be 0 or 1")
    _first_bad(path, "user_id", (events["user_id"] < 0) | (events["user_id"] >= vocab.n_users),
               f"user unknown to the FM (ids 0..{vocab.n_users - 1}); new users need a retrained FM")  # fmt: skip
    _first_bad(path, "item_id", ~events["item_id"].isin(catalogue), f"item not in {paths.table('items')}")
    _first_bad(path, "vertical", ~events["vertical"].isin(cfg.world.verticals), f"vertical not in {list(cfg.world.verticals)}")
    events = events.drop_duplicates()
    _first_bad(path, "impression_id", events["impression_id"].duplicated(), "the same impression_id with different values")
    return events[["impression_id", "user_id", "item_id", "vertical", "event_timestamp", "hour", "label"]]


def _append_impressions(paths: RunPaths, events: pd.DataFrame) -> int:
    imp = read_parquet(paths.table("impressions"))
    new = events[~events["impression_id"].isin(imp["impression_id"])]
    if len(new):
        write_parquet(pd.concat([imp, new], ignore_index=True), paths.table("impressions"))
    return len(new)


def _append_fm_log(paths: RunPaths, cfg: RunConfig) -> int:
    from loopfm.fm.stream import build_inputs, log_events

    log = read_parquet(paths.fm_log)
    arrays, imp = build_inputs(paths, cfg)
    rows = np.flatnonzero(~imp["impression_id"].isin(log["impression_id"]).to_numpy())
    if rows.size:
        fresh = log_events(paths, cfg, arrays, imp, rows, progress=False)
        position = pd.Series(np.arange(len(imp)), index=imp["impression_id"])
        log = pd.concat([log, fresh], ignore_index=True)
        log = log.iloc[np.argsort(position.loc[log["impression_id"]].to_numpy(), kind="stable")]
        write_parquet(log.reset_index(drop=True), paths.fm_log)  # stays in impression order
    return int(rows.size)


def newest_snapshots(paths: RunPaths, cfg: RunConfig, users: np.ndarray) -> dict[str, pd.DataFrame]:
    """Each user's newest history snapshot per pushed view, from the whole log."""
    from loopfm.features.build import build_fm_history, build_vm_click_history

    imp = read_parquet(paths.table("impressions"))
    log = read_parquet(paths.fm_log)
    mine = imp["user_id"].isin(users).to_numpy()
    snapshots = {
        "fm_history": build_fm_history(log[mine], imp["label"].to_numpy()[mine] == 1, cfg.vm.history_length),
        "vm_click_history": build_vm_click_history(imp[mine], cfg.world.verticals, cfg.vm.history_length),
    }
    return {view: df.sort_values("event_timestamp").groupby(entity_keys(df)).tail(1) for view, df in snapshots.items()}


def entity_keys(snapshots: pd.DataFrame) -> list[str]:
    return [key for key in ("user_id", "vertical") if key in snapshots]


def _append_sources(paths: RunPaths, snapshots: dict[str, pd.DataFrame]) -> None:
    for view, df in snapshots.items():
        path = paths.features / f"{view}.parquet"
        merged = pd.concat([read_parquet(path), df], ignore_index=True)
        write_parquet(merged.drop_duplicates([*entity_keys(df), "event_timestamp"], keep="last"), path)


def ingest(run_dir: Path, events_path: Path, redis_url: str, log=print) -> dict:
    """Run the four steps (module docstring); return what each added."""
    from loopfm.pipeline import stage
    from loopfm.features.store import open_store

    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    events = read_events(events_path, cfg, paths)
    with stage(1, 4, f"append {len(events)} impressions from {events_path}"):
        added = _append_impressions(paths, events)
    with stage(2, 4, "FM-log the impressions the embedding log lacks (offline, never in the server)"):
        logged = _append_fm_log(paths, cfg)
    with stage(3, 4, "recompute the batch's users' newest histories into the Feast sources"):
        snapshots = newest_snapshots(paths, cfg, events["user_id"].unique())
        _append_sources(paths, snapshots)
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
