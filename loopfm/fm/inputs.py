"""The FM's inputs of every event, built from the run's tables by the point-in-time rule (each
event sees only what happened strictly before it): ids, the raw histories of clicked and of
declined items (impressions without a click), activity counts and the FM-only intent signal,
in impression order (`build_inputs`); `input_batch` turns rows of them into the tensors the FM
takes. The live loop builds the same inputs from each user's running state
(loopfm/stream/state.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from loopfm.contract.tensorize import activity_bucket_arrays
from loopfm.core.config import RunConfig
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.sequences import count_before, decayed_before, last_n_before
from loopfm.core.timeunits import US_PER_DAY, unix_us


_ID_COLUMNS = ("user_id", "item_id", "category", "brand", "vertical_id", "hour", "age_bucket", "gender", "price_bucket")
RAW_HISTORIES = ("raw_history", "raw_declined")  # the user's last clicked / declined items, every vertical
ACTIVITY_COLUMNS = ("rate_all", "count_all", "rate_vertical", "count_vertical", "rate_recent", "count_recent", "rate_item", "count_item")


def build_inputs(paths: RunPaths, cfg: RunConfig) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Every event's FM input arrays, in impression order, and the impressions themselves."""
    imp = read_parquet(paths.table("impressions"))
    users = read_parquet(paths.table("users")).set_index("user_id")
    items = read_parquet(paths.table("items")).set_index("item_id")
    t = unix_us(imp["event_timestamp"]).to_numpy()
    day = (t - start_us(cfg)) // US_PER_DAY
    vertical_ids = {v: i for i, v in enumerate(cfg.world.verticals)}

    clicks = imp["label"].to_numpy() == 1
    user_ids, item_ids = imp["user_id"].to_numpy(), imp["item_id"].to_numpy()
    raw_history = _last_items(user_ids, item_ids, t, clicks, cfg.fm.raw_history_length)
    raw_declined = _last_items(user_ids, item_ids, t, ~clicks, cfg.fm.raw_history_length)

    vertical = imp["vertical"].map(vertical_ids).to_numpy()
    activity = _activity(user_ids, item_ids, vertical, len(vertical_ids), t, clicks, cfg.fm.recent_half_life)
    intent = _intent(paths, imp["user_id"], day, cfg.fm.intent_half_lives)
    item_rows = items.loc[imp["item_id"]]
    user_rows = users.loc[imp["user_id"]]
    arrays = {
        "user_id": imp["user_id"].to_numpy(),
        "item_id": imp["item_id"].to_numpy(),
        "category": item_rows["category"].to_numpy(),
        "brand": item_rows["brand"].to_numpy(),
        "price_bucket": item_rows["price_bucket"].to_numpy(),
        "vertical_id": vertical,
        "hour": imp["hour"].to_numpy(),
        "age_bucket": user_rows["age_bucket"].to_numpy(),
        "gender": user_rows["gender"].to_numpy(),
        "intent": np.nan_to_num(intent),
        "raw_history": raw_history,
        "raw_declined": raw_declined,
        **activity,
        "label": imp["label"].to_numpy().astype(np.float32),
        "day": day,
        "time_us": t,
    }
    return arrays, imp


def _last_items(user: np.ndarray, item: np.ndarray, t: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """[events, n] per event: item id + 1 of its user's last n `members` events (bool [events])
    strictly before it, oldest first, right-aligned, 0 = padding."""
    idx = last_n_before(user[members], t[members], user, t, n)
    items = item[members] + 1
    return np.where(idx >= 0, items[np.clip(idx, 0, None)], 0)


def _activity(
    user: np.ndarray, item: np.ndarray, vertical: np.ndarray, n_verticals: int, t: np.ndarray, clicks: np.ndarray,
    half_life: float,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Per event [n]: the impressions and clicks before it of its user over every vertical, of its
    user in the event's vertical, and of its item by every user, as the VM's
    (contract/tensorize.activity_bucket_arrays) click-rate and count buckets. The VM sees only
    its own vertical's counts; the FM's cross-vertical ones tell a user's propensity where that
    vertical has little of the user, and the item's tell its click rate up to the event, which
    a checkpoint's item embedding knows only up to the day it was trained (issue 15). `recent`:
    the user's impressions and clicks over every vertical, each weighted 2^(-m / half_life) for
    the m events of the user between it and the event (core/sequences.decayed_before): the
    user's propensity lately, which on MovieLens says more than the one over all time
    (docs/training.md, "The user's click rate lately")."""
    out = {}
    for scope, key in (("all", user), ("vertical", user * n_verticals + vertical), ("item", item)):
        n = count_before(key, t, key, t)
        k = count_before(key[clicks], t[clicks], key, t)
        out[f"rate_{scope}"], out[f"count_{scope}"] = activity_bucket_arrays(n, k)
    n, k = decayed_before(user, t, np.stack([np.ones(user.size), clicks], axis=1), user, t, half_life).T
    out["rate_recent"], out["count_recent"] = activity_bucket_arrays(n, k)
    return out


def _intent(paths: RunPaths, user: pd.Series, day: np.ndarray, half_lives: tuple[float, ...]) -> np.ndarray:
    """The FM-only daily signal per event: the day's own [n, k] followed, for each half-life
    h (days) of `fm.intent_half_lives`, by the average of the user's signals of *earlier*
    days weighted 2^(-age / h) ([n, k] each; 0 before the user's first day): a filter over
    the days as the oracle's Kalman row of docs/training.md ("How far the FM is from its
    information") uses, with the gain left to the FM. k = 0 for imported data, which has
    none (the FM then learns from the raw histories of every vertical only)."""
    signals = _signal_grid(paths, int(day.max()) + 1 if len(day) else 0)
    if signals is None:
        return np.zeros((len(user), 0), dtype=np.float32)
    users, grid, seen = signals
    at = np.searchsorted(users, user.to_numpy()).clip(max=users.size - 1)
    known = users[at] == user.to_numpy()  # an event's user without any signal reads 0
    parts = [grid]
    for h in half_lives:
        total, weight = _decayed(grid, seen, h)
        parts.append(total / np.maximum(weight, 1e-12)[:, :, None])
    out = np.concatenate(parts, axis=2)[at, day]  # [n, k * (1 + len(half_lives))]
    return np.where(known[:, None], out, 0.0).astype(np.float32)


def _signal_grid(paths: RunPaths, min_days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The FM-only signals table as users [U], grid [U, D, k] and seen [U, D] (1 where the user
    has a signal that day), D = max(its last day + 1, min_days); None when the run has none."""
    if not paths.table("fm_user_signals").exists():
        return None
    signals = read_parquet(paths.table("fm_user_signals"))
    intent_cols = [c for c in signals.columns if c.startswith("intent_")]
    users = np.unique(signals["user_id"].to_numpy())
    n_days = int(max(signals["day"].max() + 1, min_days))
    grid = np.zeros((users.size, n_days, len(intent_cols)), dtype=np.float64)  # [U, D, k]
    seen = np.zeros((users.size, n_days), dtype=np.float64)
    u, d = np.searchsorted(users, signals["user_id"].to_numpy()), signals["day"].to_numpy()
    grid[u, d], seen[u, d] = signals[intent_cols].to_numpy(np.float64), 1.0
    return users, grid, seen


def _decayed(grid: np.ndarray, seen: np.ndarray, half_life: float) -> tuple[np.ndarray, np.ndarray]:
    """total [U, D, k] and weight [U, D]: at day t, the sum over days j < t of keep^(t-1-j) times
    the signal (total) or its presence (weight), keep = 2^(-1 / half_life)."""
    keep = 0.5 ** (1.0 / half_life)
    total, weight = np.zeros_like(grid), np.zeros_like(seen)
    for t in range(1, grid.shape[1]):
        total[:, t] = keep * total[:, t - 1] + grid[:, t - 1]
        weight[:, t] = keep * weight[:, t - 1] + seen[:, t - 1]
    return total, weight


def intent_after_signals(paths: RunPaths, half_lives: tuple[float, ...]) -> tuple[np.ndarray, int, np.ndarray, np.ndarray] | None:
    """The `_intent` filter's state on the first day after the signals table, from which any
    later day follows by decay alone (no later signals exist): users [U], that day D, total
    [U, len(half_lives), k], weight [U, len(half_lives)]. None when the run has no signals."""
    signals = _signal_grid(paths, 0)
    if signals is None:
        return None
    users, grid, seen = signals
    day = grid.shape[1]
    grid, seen = np.concatenate([grid, grid[:, :1] * 0], axis=1), np.concatenate([seen, seen[:, :1] * 0], axis=1)
    totals, weights = zip(*(_decayed(grid, seen, h) for h in half_lives)) if half_lives else ((), ())
    total = np.stack([t[:, day] for t in totals], axis=1) if half_lives else np.zeros((users.size, 0, grid.shape[2]))
    weight = np.stack([w[:, day] for w in weights], axis=1) if half_lives else np.zeros((users.size, 0))
    return users, day, total, weight


def start_us(cfg: RunConfig) -> int:
    """The run's first day (world.start_date, midnight UTC) in unix microseconds."""
    return pd.Timestamp(cfg.world.start_date, tz="UTC").value // 1000


def input_batch(
    arrays: dict[str, np.ndarray], idx: np.ndarray, known_users: np.ndarray | None = None, known_items: np.ndarray | None = None
) -> dict[str, torch.Tensor]:  # fmt: skip
    """FM inputs of events `idx`; given a checkpoint's known ids [bool], every other user and
    item id (one it never trained on, or one beyond its vocabulary) reads as unknown (-1; 0 in
    the raw histories, which hold item id + 1)."""
    b = {k: arrays[k][idx].astype(np.int64) for k in (*_ID_COLUMNS, *ACTIVITY_COLUMNS, *RAW_HISTORIES)}
    if known_users is not None:
        b["user_id"] = np.where(_known(known_users, b["user_id"]), b["user_id"], -1)
        b["item_id"] = np.where(_known(known_items, b["item_id"]), b["item_id"], -1)
        for k in RAW_HISTORIES:
            b[k] = np.where(_known(known_items, b[k] - 1), b[k], 0)
    out = {k: torch.from_numpy(v) for k, v in b.items()}
    out["intent"] = torch.from_numpy(arrays["intent"][idx])
    return out


def _known(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """known[ids] [bool], False for ids outside 0..len(known)-1 (unknown or grown since)."""
    inside = (ids >= 0) & (ids < known.size)
    return inside & known[np.where(inside, ids, 0)]
