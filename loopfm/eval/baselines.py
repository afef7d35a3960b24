"""Simple baselines every results table carries, fitted on the VM's own training rows.

- `popularity`: the item's click rate on the training rows, shrunk toward the overall rate
  by `training.PRIOR_IMPRESSIONS` pseudo-impressions (an item never seen scores the overall rate);
- `lr_item`, `lr_user_item`: L2 logistic regression on one-hot ids (scikit-learn), its
  strength C chosen on the newest `validation_fraction` of the training rows (the split the
  VM validates on), then refitted on all of them;
- `lr_rates` (when the impressions are given): logistic regression on two numbers per row,
  the log-odds of the Laplace click rate so far of its user in its vertical and of its item
  (every user), counted over every impression strictly before it: the counting features of
  any CTR system, and on MovieLens stronger than the id regressions (docs/training.md,
  "Click rates so far"). It counts by event time; the VM's Feast rows count an event ingested
  late (`loopfm ingest`) only from its ingest time, so on a run with late ingests the
  baseline has seen a little more than the VM;
- `lr_rates_all` (when the impressions are given): the same regression on three numbers, the
  two rates plus the user's rate so far over every vertical (`user_all_rate`): what the FM
  knows of a user's propensity and no VM sees, so the FM's own baseline. On Ciao category 10
  it beat the FM (docs/training.md, "The FM against `lr_rates_all`");
- `gbdt` (when the impressions are given): scikit-learn's HistGradientBoostingClassifier on
  the same rates plus the user's rate so far over every vertical (`user_all_rate`), the
  number of trees chosen by validation log loss on the VM's validation split, then refitted
  on all training rows with that number (as the regressions choose C).

A VM that loses to these is a defect, not a result (docs/architecture.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import OneHotEncoder
from threadpoolctl import threadpool_limits

from loopfm.core.sequences import count_before
from loopfm.core.timeunits import unix_us
from loopfm.core.training import shrunk_rate, time_split
from loopfm.eval.metrics import quality

LR_COLUMNS = {"lr_item": ("item_id",), "lr_user_item": ("user_id", "item_id")}
BASELINES = ("popularity", *LR_COLUMNS, "lr_rates", "lr_rates_all", "gbdt")
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
LR_RATES = ("user_rate", "item_rate")  # what lr_rates reads of rates_so_far; lr_rates_all and gbdt read every column
RATES = (*LR_RATES, "user_all_rate")  # every column of rates_so_far
GBDT_MAX_TREES = 300  # boosting iterations at most; the validation split picks how many of them


def popularity(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Shrunk item click rate of each row of `rows` [n] from the labelled `train` rows."""
    prior = float(train["label"].mean())
    counts = train.groupby("item_id")["label"].agg(["sum", "count"])
    rate = shrunk_rate(counts["sum"], counts["count"], prior)
    return rate.reindex(rows["item_id"]).fillna(prior).to_numpy(np.float64)


def _logistic(train: pd.DataFrame, rows: pd.DataFrame, columns: tuple[str, ...], c: float) -> np.ndarray:
    encoder = OneHotEncoder(handle_unknown="ignore")
    x = encoder.fit_transform(train[list(columns)].astype(str))
    model = LogisticRegression(C=c, max_iter=2000).fit(x, train["label"].to_numpy())
    return model.predict_proba(encoder.transform(rows[list(columns)].astype(str)))[:, 1]


def logistic_regression(train: pd.DataFrame, rows: pd.DataFrame, columns: tuple[str, ...], validation_fraction: float) -> np.ndarray:
    """P(click) of `rows` [n] by an L2 logistic regression on one-hot `columns`, C chosen by
    validation log loss on the newest rows of `train`, then refitted on all of `train`."""
    fit, val = time_split(unix_us(train["event_timestamp"]).to_numpy(), validation_fraction)
    a, b = train.iloc[fit], train.iloc[val]
    losses = {c: quality(b["label"].to_numpy(), _logistic(a, b, columns, c))["logloss"] for c in C_GRID}
    return _logistic(train, rows, columns, min(losses, key=losses.get))


def rates_so_far(impressions: pd.DataFrame) -> pd.DataFrame:
    """Per impression (indexed by impression_id), the columns RATES: `user_rate`, `item_rate`,
    `user_all_rate`, the log-odds of (clicks + 1) / (impressions + 2) of its user in its vertical, of its item
    and of its user over every vertical, counted over the impressions strictly before it
    (loopfm/core/sequences.count_before: the histories' rule)."""
    t = unix_us(impressions["event_timestamp"]).to_numpy()
    clicks = impressions["label"].to_numpy() == 1
    keys = (pd.factorize(pd.MultiIndex.from_frame(impressions[["user_id", "vertical"]]))[0],
            pd.factorize(impressions["item_id"])[0], pd.factorize(impressions["user_id"])[0])  # fmt: skip
    out = {}
    for name, key in zip(RATES, keys, strict=True):
        n, k = count_before(key, t, key, t), count_before(key[clicks], t[clicks], key, t)
        out[name] = np.log(k + 1.0) - np.log(n - k + 1.0)
    return pd.DataFrame(out, index=impressions["impression_id"].to_numpy())


def rate_regression(train: pd.DataFrame, rows: pd.DataFrame, rates: pd.DataFrame, columns: tuple[str, ...] = LR_RATES) -> np.ndarray:
    """P(click) of `rows` [n] by a logistic regression on `columns` of `rates_so_far` fitted on
    `train` (both frames need impression_id; train label)."""
    x = rates.loc[train["impression_id"], list(columns)].to_numpy()
    model = LogisticRegression(max_iter=1000).fit(x, train["label"].to_numpy())
    return model.predict_proba(rates.loc[rows["impression_id"], list(columns)].to_numpy())[:, 1]


def _gbdt(trees: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=trees, early_stopping=False, random_state=0)


def gradient_boosting(train: pd.DataFrame, rows: pd.DataFrame, rates: pd.DataFrame, validation_fraction: float) -> np.ndarray:
    """P(click) of `rows` [n] by gradient-boosted trees on every column of `rates_so_far`: the
    number of trees (1..GBDT_MAX_TREES) is the one with the lowest log loss on the newest
    `validation_fraction` of `train` (the VM's validation split) for a model fitted on the
    rest; then refitted on all of `train` with that number.

    On one OpenMP thread: the trees are small and every split is a parallel region whose
    threads wait for each other: on a machine whose cores are busy (beside VM training, or a
    test run) two threads are many times slower than one, and give the same predictions to
    the bit (docs/developing.md, "Test time")."""
    fit, val = time_split(unix_us(train["event_timestamp"]).to_numpy(), validation_fraction)
    x, y = rates.loc[train["impression_id"]].to_numpy(), train["label"].to_numpy()
    with threadpool_limits(1, user_api="openmp"):
        staged = _gbdt(GBDT_MAX_TREES).fit(x[fit], y[fit]).staged_predict_proba(x[val])
        losses = [log_loss(y[val], p[:, 1], labels=[0, 1]) for p in staged]
        model = _gbdt(int(np.argmin(losses)) + 1).fit(x, y)
        return model.predict_proba(rates.loc[rows["impression_id"]].to_numpy())[:, 1]


def baseline_predictions(
    train: pd.DataFrame, rows: pd.DataFrame, validation_fraction: float, impressions: pd.DataFrame | None = None
) -> dict[str, np.ndarray]:
    """Every baseline's P(click) for `rows`; both frames need user_id, item_id, event_timestamp
    and (train) label; `lr_rates`, `lr_rates_all` and `gbdt` also their impression_id and the run's `impressions` table."""
    out = {"popularity": popularity(train, rows)}
    for name, columns in LR_COLUMNS.items():
        out[name] = logistic_regression(train, rows, columns, validation_fraction)
    if impressions is not None:
        rates = rates_so_far(impressions)
        out["lr_rates"] = rate_regression(train, rows, rates)
        out["lr_rates_all"] = rate_regression(train, rows, rates, RATES)
        out["gbdt"] = gradient_boosting(train, rows, rates, validation_fraction)
    return out
