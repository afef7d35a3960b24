"""A synthetic multi-vertical world with a known click model.

Click model (documented in docs/architecture.md, the Bayes ceiling of every evaluation):

    u[user, day]  ~ stationary Gaussian random walk in R^k: u_d = sqrt(1-r) u_{d-1} + sqrt(r) xi
    w[item]       = category_vector[category] + 0.5 * item_noise      (shared across verticals)
    logit p       = vertical_bias[v] + 1.3 <u[user, day], w[item]> + quality[item]
                    + hour_effect[v, hour] + age_affinity[age, category] - 0.25 z(log price)

A user's interest drifts day by day and is revealed by clicks in *every* vertical, so a
model that sees all verticals (the FM) can track it better than a vertical model that sees
only its own vertical. The FM additionally sees `intent = u[user, day] + noise * eps`, a
daily FM-only signal (think: behaviour on surfaces no VM is trained on); `fm_signal_noise`
sets how much the FM knows beyond the VM. The true click probability of every impression
is written to `truth.parquet`, which only evaluation reads.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from loopfm.contract.names import ITEM_KEY, N_AGE_BUCKETS, N_GENDERS, N_HOURS, N_PRICE_BUCKETS, USER_KEY
from loopfm.core.config import DataConfig
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import US_PER_DAY, US_PER_HOUR
from loopfm.data.ids import id_map
from loopfm.data.run_data import replace_data
from loopfm.data.vocab import Vocab



def simulate(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Return the canonical tables: users, items, impressions, fm_user_signals, truth."""
    rng = np.random.default_rng(cfg.seed)
    k, n_users, n_days = cfg.latent_dim, cfg.n_users, cfg.n_days
    n_verticals = len(cfg.verticals)

    # Items: each vertical has its own pool; categories and brands are shared.
    n_items = cfg.n_items_per_vertical * n_verticals
    item_vertical = np.repeat(np.arange(n_verticals), cfg.n_items_per_vertical)
    category = rng.zipf(1.6, n_items) % cfg.n_categories
    brand = (category * 7 + rng.integers(0, 5, n_items)) % cfg.n_brands
    log_price = rng.normal(3.0, 0.8, n_items) + 0.05 * category
    price_bucket = np.digitize(log_price, np.quantile(log_price, np.linspace(0, 1, N_PRICE_BUCKETS + 1)[1:-1]))
    category_vec = rng.normal(0, 1 / np.sqrt(k), (cfg.n_categories, k))
    item_vec = category_vec[category] + 0.5 * rng.normal(0, 1 / np.sqrt(k), (n_items, k))
    quality = rng.normal(0, 0.4, n_items)

    # Users: static profile plus a drifting interest vector per day.
    age_bucket = rng.integers(0, N_AGE_BUCKETS, n_users)
    gender = rng.integers(0, N_GENDERS, n_users)
    activity = rng.lognormal(0, 0.5, n_users)
    vertical_pref = rng.dirichlet(np.asarray(cfg.vertical_mix) * 20, n_users)
    interest = np.empty((n_users, n_days, k))
    interest[:, 0] = rng.normal(size=(n_users, k))
    r = cfg.interest_drift
    for d in range(1, n_days):
        interest[:, d] = np.sqrt(1 - r) * interest[:, d - 1] + np.sqrt(r) * rng.normal(size=(n_users, k))
    intent = interest + cfg.fm_signal_noise * rng.normal(size=interest.shape)

    # Impressions: Poisson count per user-day, uniform time of day, vertical by preference.
    counts = rng.poisson(activity[:, None] * cfg.impressions_per_user_day, (n_users, n_days))
    user = np.repeat(np.repeat(np.arange(n_users), n_days), counts.ravel())
    day = np.repeat(np.tile(np.arange(n_days), n_users), counts.ravel())
    time_us = day * US_PER_DAY + rng.integers(0, US_PER_DAY, user.size)  # microsecond resolution
    hour = (time_us % US_PER_DAY) // US_PER_HOUR
    vertical = (rng.random(user.size)[:, None] > np.cumsum(vertical_pref[user], axis=1)).sum(axis=1)
    vertical = np.minimum(vertical, n_verticals - 1)
    item = vertical * cfg.n_items_per_vertical + rng.integers(0, cfg.n_items_per_vertical, user.size)

    vertical_bias = np.linspace(-2.6, -3.0, n_verticals)
    hour_effect = 0.3 * np.sin(np.arange(N_HOURS)[None, :] / N_HOURS * 2 * np.pi + rng.uniform(0, 6, (n_verticals, 1)))
    age_affinity = rng.normal(0, 0.3, (N_AGE_BUCKETS, cfg.n_categories))
    z_price = (log_price - log_price.mean()) / log_price.std()
    logit = (
        vertical_bias[vertical]
        + 1.3 * np.einsum("nk,nk->n", interest[user, day], item_vec[item])
        + quality[item]
        + hour_effect[vertical, hour]
        + age_affinity[age_bucket[user], category[item]]
        - 0.25 * z_price[item]
    )
    p_true = 1 / (1 + np.exp(-logit))
    label = (rng.random(user.size) < p_true).astype(np.int64)

    order = np.argsort(time_us, kind="stable")
    start = pd.Timestamp(cfg.start_date, tz="UTC")
    names = np.asarray(cfg.verticals)
    impressions = pd.DataFrame(
        {
            "impression_id": np.arange(user.size, dtype=np.int64),
            "user_id": user[order].astype(np.int64),
            "item_id": item[order].astype(np.int64),
            "vertical": names[vertical[order]],
            "event_timestamp": (start + pd.to_timedelta(time_us[order], unit="us")).astype("datetime64[us, UTC]"),
            "hour": hour[order].astype(np.int64),
            "label": label[order],
        }
    )
    truth = pd.DataFrame({"impression_id": impressions["impression_id"], "p_true": p_true[order]})
    users = pd.DataFrame(
        {"user_id": np.arange(n_users, dtype=np.int64), "age_bucket": age_bucket, "gender": gender}
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int64),
            "vertical": names[item_vertical],
            "category": category.astype(np.int64),
            "brand": brand.astype(np.int64),
            "price": np.exp(log_price).astype(np.float32),
            "price_bucket": price_bucket.astype(np.int64),
        }
    )
    signal_user, signal_day = np.divmod(np.arange(n_users * n_days), n_days)
    fm_user_signals = pd.DataFrame({"user_id": signal_user.astype(np.int64), "day": signal_day.astype(np.int64)})
    for j in range(k):
        fm_user_signals[f"intent_{j}"] = intent[:, :, j].ravel().astype(np.float32)
    return {
        "users": users,
        "items": items,
        "impressions": impressions,
        "fm_user_signals": fm_user_signals,
        "truth": truth,
    }


def write_world(cfg: DataConfig, paths: RunPaths) -> dict[str, int]:
    """Simulate the world and write its tables; returns their row counts."""
    return write_tables(simulate(cfg), cfg, paths)


def write_tables(tables: dict[str, pd.DataFrame], cfg: DataConfig, paths: RunPaths) -> dict[str, int]:
    """Write the tables `simulate(cfg)` returned, their id maps and vocab.json, all or none
    (replace_data); returns row counts."""
    users, items = tables["users"][USER_KEY], tables["items"][ITEM_KEY]  # the world's ids are their own source ids
    tables |= {"user_ids": id_map(USER_KEY, users, users), "item_ids": id_map(ITEM_KEY, items, items)}
    replace_data(paths.root, tables, Vocab.from_world(cfg))
    return {name: len(df) for name, df in tables.items()}
