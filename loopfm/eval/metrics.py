"""Quality metrics: AUC, LogLoss, NE and the transfer ratio.

NE (normalized entropy, He et al. 2014) = LogLoss / entropy of the base click rate, so 1.0
is "no better than predicting the average". TR = dNE_VM / dNE_FM: the share of the FM's NE
improvement over the base VM that a VM variant captures.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def rate_entropy(rate):
    """Log loss of always predicting click rate(s) `rate` (a float or an array), clipped to
    [EPS, 1 - EPS]: NE's denominator."""
    rate = np.clip(rate, EPS, 1 - EPS)
    return -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))


def base_rate_entropy(y: np.ndarray) -> float:
    """Log loss of always predicting the observed click rate of labels `y`."""
    return float(rate_entropy(y.mean()))


def quality(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    logloss = float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))
    return {"auc": float(roc_auc_score(y, p)), "logloss": logloss, "ne": logloss / base_rate_entropy(y)}


def gains(ne: float, reference_ne: float, fm_ne: float, bayes_ne: float | None = None) -> dict[str, float]:
    """dNE over the reference (the base VM), TR = dNE / dNE_FM and, given the Bayes-optimal
    NE (synthetic data only), the share of the reference-to-Bayes gap closed; NaN where a
    denominator is zero."""
    gain, fm_gain = reference_ne - ne, reference_ne - fm_ne
    out = {"delta_ne": gain, "tr": gain / fm_gain if abs(fm_gain) > 1e-12 else float("nan")}
    if bayes_ne is not None:
        bayes_gap = reference_ne - bayes_ne
        out["bayes_gap_closed"] = gain / bayes_gap if bayes_gap else float("nan")
    return out


def comparison_table(y: np.ndarray, predictions: dict[str, np.ndarray], reference: str = "base") -> dict[str, dict]:
    """Quality of every predictor plus dNE, TR and the share of the gap to Bayes closed.

    `predictions` must hold `reference` (the base VM) and `fm`; `bayes` (the true click
    probability) is optional and only known on synthetic data."""
    rows = {name: quality(y, p) for name, p in predictions.items()}
    bayes_ne = rows["bayes"]["ne"] if "bayes" in rows else None
    for row in rows.values():
        row.update(gains(row["ne"], rows[reference]["ne"], rows["fm"]["ne"], bayes_ne))
    return rows


def markdown_table(rows: dict[str, dict], title: str) -> str:
    """The "Bayes gap closed" column only when the rows have one (synthetic data)."""
    bayes = all("bayes_gap_closed" in r for r in rows.values())
    header = "| model | AUC | LogLoss | NE | dNE vs base | TR |" + (" Bayes gap closed |" if bayes else "")
    header += "\n|---|---|---|---|---|---|" + ("---|" if bayes else "") + "\n"
    lines = [
        f"| {name} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['ne']:.4f} | {r['delta_ne']:+.4f} | {r['tr']:.3f} |"
        + (f" {r['bayes_gap_closed']:.1%} |" if bayes else "")
        for name, r in rows.items()
    ]
    return f"### {title}\n\n{header}" + "\n".join(lines) + "\n"
