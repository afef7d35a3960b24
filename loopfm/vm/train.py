"""VM training: entity rows -> Feast point-in-time features -> shared tensorization -> model.

Every variant reads its features only through `get_historical_features` with its own
feature service; the KD label (the FM's logged prediction) travels with the entity rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from loopfm.config import VARIANTS, RunConfig
from loopfm.data.dataset import Vocab
from loopfm.eval.metrics import comparison_table, markdown_table
from loopfm.features.store import historical_features
from loopfm.features.tensorize import (
    FM_HISTORY_FEATURE,
    ITEM_FEATURES,
    USER_FEATURES,
    VM_HISTORY_FEATURE,
    TensorSpec,
    candidate_tensors,
    request_tensors,
)
from loopfm.io import RunPaths, read_parquet, write_parquet
from loopfm.vm.model import VerticalModel, VMShapes


def tensor_spec(cfg: RunConfig, vocab: Vocab) -> TensorSpec:
    return TensorSpec(
        history_length=cfg.vm.history_length,
        code_dim=cfg.fm.code_dim,
        code_format=cfg.fm.code_format,
        n_items=vocab.n_items,
        n_categories=vocab.n_categories,
        n_brands=vocab.n_brands,
    )


def frame_tensors(df: pd.DataFrame, spec: TensorSpec) -> dict[str, np.ndarray]:
    """A historical-features frame (one candidate per row) -> model inputs."""
    user_columns = [*USER_FEATURES, VM_HISTORY_FEATURE] + ([FM_HISTORY_FEATURE] if FM_HISTORY_FEATURE in df else [])
    tensors = request_tensors({c: df[c].tolist() for c in user_columns}, df["hour"].tolist(), spec)
    tensors["candidates"] = candidate_tensors(df["item_id"].tolist(), {c: df[c].tolist() for c in ITEM_FEATURES}, spec)
    tensors["candidate_user"] = np.arange(len(df), dtype=np.int64)
    return tensors


def _rows(tensors: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Select rows of a one-candidate-per-user batch; candidate_user becomes 0..len(idx)-1."""
    out = {k: torch.from_numpy(v[idx]) for k, v in tensors.items() if k != "candidate_user"}
    out["candidate_user"] = torch.arange(len(idx))
    return out


def predict(model: VerticalModel, tensors: dict[str, np.ndarray], batch: int = 4096) -> np.ndarray:
    model.eval()
    n = len(tensors["candidates"])
    with torch.no_grad():
        return np.concatenate(
            [torch.sigmoid(model(**_rows(tensors, np.arange(lo, min(lo + batch, n))))[0]).numpy() for lo in range(0, n, batch)]
        )


def shapes_for(cfg: RunConfig, spec: TensorSpec, variant: str) -> VMShapes:
    return VMShapes(
        user_context_vocab=spec.user_context_vocab,
        candidate_vocab=spec.candidate_vocab,
        code_dim=spec.code_dim,
        embedding_dim=cfg.vm.embedding_dim,
        hidden=tuple(cfg.vm.hidden),
        use_fm_history=variant.startswith("loopfm"),
        encoder=cfg.vm.encoder,
    )


def train_variant(paths: RunPaths, cfg: RunConfig, store, variant: str, log=print) -> dict:
    """Train one variant, save it to vm/<variant>/, return eval-window predictions."""
    if variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {VARIANTS}, got {variant!r}")
    started = time.perf_counter()
    service = f"vm_{variant}"
    train_df = historical_features(store, read_parquet(paths.features / "vm_train_entities.parquet"), service)
    eval_df = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), service)
    spec = tensor_spec(cfg, Vocab.load(paths))
    model, p = fit_variant(cfg, spec, variant, train_df, eval_df, log)
    out = paths.vm / variant
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "shapes": asdict(model.shapes), "spec": asdict(spec)}, out / "model.pt")
    write_parquet(pd.DataFrame({"impression_id": eval_df["impression_id"], "p": p}), out / "eval_predictions.parquet")
    return {"variant": variant, "train_rows": len(train_df), "eval_rows": len(eval_df), "seconds": time.perf_counter() - started}


def fit_variant(
    cfg: RunConfig, spec: TensorSpec, variant: str, train_df: pd.DataFrame, eval_df: pd.DataFrame, log=print
) -> tuple[VerticalModel, np.ndarray]:
    """Train one variant on frames read through its feature service; return the model and its
    eval-window predictions. Split from train_variant so experiments can train many cells on
    one retrieval."""
    train_t, eval_t = frame_tensors(train_df, spec), frame_tensors(eval_df, spec)
    label = torch.from_numpy(train_df["label"].to_numpy(np.float32))
    kd_target = torch.sigmoid(torch.from_numpy(train_df["fm_logit"].to_numpy(np.float32)))
    use_kd = variant.endswith("kd")

    torch.manual_seed(cfg.vm.seed)
    model = VerticalModel(shapes_for(cfg, spec, variant))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.vm.lr)
    rng = np.random.default_rng(cfg.vm.seed)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for epoch in range(cfg.vm.epochs):
        model.train()
        order = rng.permutation(len(train_df))
        losses = []
        for lo in range(0, len(order), cfg.vm.batch_size):
            idx = order[lo : lo + cfg.vm.batch_size]
            logit, kd_logit = model(**_rows(train_t, idx))
            loss = bce(logit, label[idx])
            if use_kd:  # auxiliary head: FM bias does not flow into the serving head
                loss = loss + cfg.vm.kd_weight * bce(kd_logit, kd_target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        log(f"  vm {variant}: epoch {epoch + 1}/{cfg.vm.epochs} loss {np.mean(losses):.4f}")
    return model, predict(model, eval_t)


def load_variant(paths: RunPaths, variant: str) -> tuple[VerticalModel, TensorSpec]:
    path = paths.vm / variant / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `loopfm vm train --variant {variant}` first")
    state = torch.load(path, weights_only=False)
    shapes = state["shapes"]
    shapes = VMShapes(**{k: tuple(v) if isinstance(v, list) else v for k, v in shapes.items()})
    model = VerticalModel(shapes)
    model.load_state_dict(state["state"])
    return model.eval(), TensorSpec(**state["spec"])


def evaluate(paths: RunPaths) -> dict[str, dict]:
    """Eval-window table of every trained variant against the base VM, the FM and, when the
    data is synthetic (it has a truth table), the Bayes-optimal predictor."""
    variants = [v for v in VARIANTS if (paths.vm / v / "eval_predictions.parquet").exists()]
    if "base" not in variants:
        raise FileNotFoundError(f"{paths.vm / 'base'} has no predictions: every comparison is against the base VM; "
                                "run `loopfm vm train --variant base`")  # fmt: skip
    entities = read_parquet(paths.features / "vm_eval_entities.parquet")
    predictions = {}
    if paths.table("truth").exists():
        truth = read_parquet(paths.table("truth")).set_index("impression_id")["p_true"]
        predictions["bayes"] = truth.loc[entities["impression_id"]].to_numpy()
    predictions["fm"] = 1 / (1 + np.exp(-entities["fm_logit"].to_numpy(np.float64)))
    for v in variants:
        p = read_parquet(paths.vm / v / "eval_predictions.parquet").set_index("impression_id")["p"]
        if not entities["impression_id"].isin(p.index).all():
            raise ValueError(f"{paths.vm / v / 'eval_predictions.parquet'} predicts another held-out window (features "
                             f"were rebuilt since): re-train it with `loopfm vm train --variant {v}` or remove it")  # fmt: skip
        predictions[v] = p.loc[entities["impression_id"]].to_numpy()
    rows = comparison_table(entities["label"].to_numpy(), predictions)
    paths.results.mkdir(parents=True, exist_ok=True)
    (paths.results / "quality.json").write_text(json.dumps({"eval_rows": len(entities), "models": rows}, indent=2))
    md = markdown_table(rows, f"Held-out window: {len(entities)} impressions of the target vertical")
    (paths.results / "quality.md").write_text(md)
    return rows
