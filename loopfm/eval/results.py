"""The results table of a run: every trained VM variant's held-out predictions against the
base VM, the FM, the baselines and (synthetic data) the Bayes-optimal predictor, written as
results/quality.{md,json}."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from loopfm.core.config import VARIANTS, RunConfig
from loopfm.core.files import read_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.eval.baselines import baseline_predictions
from loopfm.eval.metrics import comparison_table, markdown_table


def reference_predictions(
    paths: RunPaths, cfg: RunConfig, entities: pd.DataFrame, train_entities: pd.DataFrame
) -> dict[str, np.ndarray]:
    """What every results table compares the VMs with, one probability per row of `entities`
    (eval entity rows, in order): `bayes`, the true click probability (synthetic data only:
    the run has a truth table), `fm`, the FM's logged prediction, and the baselines fitted on
    `train_entities` (loopfm/eval/baselines.py)."""
    predictions = {}
    if paths.table("truth").exists():
        truth = read_parquet(paths.table("truth")).set_index("impression_id")["p_true"]
        predictions["bayes"] = truth.loc[entities["impression_id"]].to_numpy()
    predictions["fm"] = 1 / (1 + np.exp(-entities["fm_logit"].to_numpy(np.float64)))
    impressions = read_parquet(paths.table("impressions"))
    predictions.update(baseline_predictions(train_entities, entities, cfg.vm.validation_fraction, impressions))
    return predictions


def evaluate(paths: RunPaths, cfg: RunConfig) -> dict[str, dict]:
    """Eval-window table of every trained variant against the base VM, the FM, the baselines
    fitted on the same training rows (loopfm/eval/baselines.py) and, when the data is
    synthetic (it has a truth table), the Bayes-optimal predictor."""
    variants = [v for v in VARIANTS if (paths.vm / v / "eval_predictions.parquet").exists()]
    if "base" not in variants:
        raise FileNotFoundError(f"{paths.vm / 'base'} has no predictions: every comparison is against the base VM; "
                                "run `loopfm vm train --variant base`")  # fmt: skip
    entities = read_parquet(paths.features / "vm_eval_entities.parquet")
    train_entities = read_parquet(paths.features / "vm_train_entities.parquet")
    predictions = reference_predictions(paths, cfg, entities, train_entities)
    for v in variants:
        p = read_parquet(paths.vm / v / "eval_predictions.parquet").set_index("impression_id")["p"]
        if not entities["impression_id"].isin(p.index).all():
            raise ValueError(f"{paths.vm / v / 'eval_predictions.parquet'} predicts another held-out window (features "
                             f"were rebuilt since): re-train it with `loopfm vm train --variant {v}` or remove it")  # fmt: skip
        predictions[v] = p.loc[entities["impression_id"]].to_numpy()
    rows = comparison_table(entities["label"].to_numpy(), predictions)
    paths.results.mkdir(parents=True, exist_ok=True)
    write_text(paths.results / "quality.json", json.dumps({"eval_rows": len(entities), "models": rows}, indent=2))
    md = markdown_table(rows, f"Held-out window: {len(entities)} impressions of the target vertical")
    write_text(paths.results / "quality.md", md)
    return rows
