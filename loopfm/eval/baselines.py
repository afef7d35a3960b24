"""Simple baselines every results table carries, fitted on the VM's own training rows.

- `popularity`: the item's click rate on the training rows, shrunk toward the overall rate
  by `training.PRIOR_IMPRESSIONS` pseudo-impressions (an item never seen scores the overall rate);
- `lr_item`, `lr_user_item`: L2 logistic regression on one-hot ids (scikit-learn), its
  strength C chosen on the newest `validation_fraction` of the training rows (the split the
  VM validates on), then refitted on all of them.

A VM that loses to these is a defect, not a result (docs/architecture.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from loopfm.eval.metrics import quality
from loopfm.io import unix_us
from loopfm.training import shrunk_rate, time_split

LR_COLUMNS = {"lr_item": ("item_id",), "lr_user_item": ("user_id", "item_id")}
BASELINES = ("popularity", *LR_COLUMNS)
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


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


def baseline_predictions(train: pd.DataFrame, rows: pd.DataFrame, validation_fraction: float) -> dict[str, np.ndarray]:
    """Every baseline's P(click) for `rows`; both frames need user_id, item_id, event_timestamp
    and (train) label."""
    out = {"popularity": popularity(train, rows)}
    for name, columns in LR_COLUMNS.items():
        out[name] = logistic_regression(train, rows, columns, validation_fraction)
    return out
