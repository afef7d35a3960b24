"""Every user's and item's starting state, from the run's batch tables, written once before
the first worker applies anything (as `feast materialize` fills the online store once).

The states equal what applying the run's impressions one by one would leave
(tests/test_stream.py): per user the newest event time, the counts and click histories before
and at it, the last L FM codes of the FM history's members, and the FM-only signal averages
after the last day of the table; per item its impressions and clicks.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from loopfm.core.config import RunConfig
from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.core.sequences import decayed_before
from loopfm.core.timeunits import unix_us
from loopfm.data.ids import load_id_maps
from loopfm.features.build import fm_history_members
from loopfm.stream.keys import StreamKeys
from loopfm.stream.online import ITEM_CLICKS, ITEM_IMPRESSIONS, STATE_FIELD, item_key, user_key
from loopfm.stream.state import ALL, UserState

_CHUNK = 2000  # commands per pipeline


def _last(frame: pd.DataFrame, by: str | list[str], column: str, n: int) -> dict:
    """{group key: the last n values of `column` as a list}, in the frame's order."""
    if n == 0 or frame.empty:
        return {}
    return frame.groupby(by, sort=False).tail(n).groupby(by, sort=False)[column].agg(list).to_dict()


def _counts(frame: pd.DataFrame, by: list[str]) -> dict:
    if frame.empty:
        return {}
    agg = frame.groupby(by, sort=False)["label"].agg(["size", "sum"])
    return {key: [int(n), int(k)] for key, (n, k) in zip(agg.index, agg.to_numpy())}


def user_states(paths: RunPaths, cfg: RunConfig) -> dict[int, UserState]:
    """{dense user id: state} for every user of the run's users table."""
    from loopfm.fm.inputs import intent_after_signals

    imp = read_parquet(paths.table("impressions"))
    log = read_parquet(paths.fm_log)
    users = read_parquet(paths.table("users"))["user_id"].to_numpy()
    imp = imp.assign(t=unix_us(imp["event_timestamp"]).to_numpy(), member=fm_history_members(imp["label"].to_numpy(), cfg.fm.history_events))
    log = log.assign(available=unix_us(log["available_at"]).to_numpy(), until=unix_us(log["fm_trained_until"]).to_numpy())
    log = log[imp.set_index("impression_id").loc[log["impression_id"], "member"].to_numpy()]
    log = log.sort_values(["user_id", "available"], kind="stable")
    imp = imp.sort_values(["user_id", "t"], kind="stable")

    t_last = imp.groupby("user_id")["t"].max()
    at = imp["t"].to_numpy() == t_last.loc[imp["user_id"]].to_numpy()
    before, now = imp[~at], imp[at]
    clicked_before, clicked_now = before[before["label"] == 1], now[now["label"] == 1]
    clicks_before = _last(clicked_before, "user_id", "item_id", cfg.fm.raw_history_length)
    clicks_at = _last(clicked_now, "user_id", "item_id", len(now))
    declined_before = _last(before[before["label"] == 0], "user_id", "item_id", cfg.fm.raw_history_length)
    declined_at = _last(now[now["label"] == 0], "user_id", "item_id", len(now))
    counts_before = {**_counts(before.assign(s=ALL), ["user_id", "s"]), **_counts(before, ["user_id", "vertical"])}
    counts_at = {**_counts(now.assign(s=ALL), ["user_id", "s"]), **_counts(now, ["user_id", "vertical"])}
    seen = np.stack([np.ones(len(imp)), imp["label"].to_numpy()], axis=1)  # [n, (impression, click)]
    recent = decayed_before(imp["user_id"].to_numpy(), imp["t"].to_numpy(), seen, t_last.index.to_numpy(),
                            t_last.to_numpy(), cfg.fm.recent_half_life)  # fmt: skip
    recent_before = dict(zip(t_last.index.tolist(), recent.tolist()))
    clicked = imp[imp["label"] == 1]
    vm_clicks = _last(clicked, ["user_id", "vertical"], "item_id", cfg.vm.history_length)
    codes = _last(log.assign(hex=log["fm_code"].map(bytes.hex)), "user_id", "hex", cfg.vm.history_length)
    tail = log.groupby("user_id", sort=False).tail(cfg.vm.history_length).groupby("user_id")
    newest, until = tail["available"].max().to_dict(), tail["until"].max().to_dict()
    signals = intent_after_signals(paths, cfg.fm.intent_half_lives)
    if signals is not None:  # a user without signals keeps zeros (read as 0, as _intent does)
        signal_users, intent_day, totals, weights = signals
        row_of = {int(u): r for r, u in enumerate(signal_users)}

    def by_scope(counts: dict, user: int) -> dict[str, list[int]]:
        return {scope: counts[(user, scope)] for scope in (ALL, *cfg.world.verticals) if (user, scope) in counts}

    states = {}
    for user in users.tolist():
        states[user] = UserState(
            dense=user,
            t_last=int(t_last.get(user, -1)),
            clicks_before=[int(i) for i in clicks_before.get(user, [])],
            clicks_at=[int(i) for i in clicks_at.get(user, [])],
            declined_before=[int(i) for i in declined_before.get(user, [])],
            declined_at=[int(i) for i in declined_at.get(user, [])],
            counts_before=by_scope(counts_before, user),
            counts_at=by_scope(counts_at, user),
            recent_before=recent_before.get(user, [0.0, 0.0]),
            vm_clicks={v: [int(i) for i in vm_clicks[(user, v)]] for v in cfg.world.verticals if (user, v) in vm_clicks},
            fm_codes=list(codes.get(user, [])),
            fm_newest_available_us=int(newest.get(user, 0)),
            fm_trained_until_us=int(until.get(user, 0)),
        )
        if signals is not None:
            row = row_of.get(user)
            states[user].intent_day = int(intent_day)
            states[user].intent_total = (totals[row] if row is not None else totals[0] * 0).tolist()
            states[user].intent_weight = (weights[row] if row is not None else weights[0] * 0).tolist()
    return states


def item_counts(paths: RunPaths) -> pd.DataFrame:
    """Per dense item id: impressions `n` and clicks `k` in the run's impressions."""
    imp = read_parquet(paths.table("impressions"), columns=["item_id", "label"])
    return imp.groupby("item_id")["label"].agg(n="size", k="sum").reset_index()


def ensure_bootstrapped(client, keys: StreamKeys, paths: RunPaths, cfg: RunConfig, log=print) -> bool:
    """Write every starting state unless the store says it holds them (keys.bootstrapped);
    one worker writes while the others wait. Returns True when this call wrote them."""
    if client.exists(keys.bootstrapped):
        return False
    lock = keys.bootstrapped + ":lock"
    if not client.set(lock, "1", nx=True, px=600_000):
        while not client.exists(keys.bootstrapped):
            time.sleep(0.2)
        return False
    try:
        started = time.perf_counter()
        users, items = load_id_maps(paths)
        states = user_states(paths, cfg)
        sources = users.to_source(list(states))
        commands = [(user_key(keys.project, _plain(s)), {STATE_FIELD: st.to_bytes()}) for s, st in zip(sources, states.values())]
        counts = item_counts(paths)
        commands += [(item_key(keys.project, _plain(s)), {ITEM_IMPRESSIONS: int(n), ITEM_CLICKS: int(k)})
                     for s, n, k in zip(items.to_source(counts["item_id"]), counts["n"], counts["k"])]  # fmt: skip
        for lo in range(0, len(commands), _CHUNK):
            pipe = client.pipeline(transaction=False)
            for key, mapping in commands[lo : lo + _CHUNK]:
                pipe.hset(key, mapping=mapping)
            pipe.execute()
        client.set(keys.bootstrapped, "1")
        log(f"stream: starting state of {len(states)} users and {len(counts)} items written in {time.perf_counter() - started:.1f} s")
        return True
    finally:
        client.delete(lock)


def _plain(source_id) -> int | str:
    """A source id as entity_key takes it: a Python int or str (not a NumPy scalar)."""
    return source_id if isinstance(source_id, str) else int(source_id)
