"""VM training: entity rows -> Feast point-in-time features -> shared tensorization -> model.

Every variant reads its features only through `get_historical_features` with its own
feature service; the KD label (the FM's logged prediction) travels with the entity rows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from loopfm.contract.names import CANDIDATE_FEATURES, FM_HISTORY_FEATURE, ITEM_FEATURES, USER_FEATURES, VM_COUNT_FEATURES, VM_HISTORY_FEATURE
from loopfm.contract.tensorize import TensorSpec, candidate_tensors, model_inputs
from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION, check_format
from loopfm.core.config import RunConfig, Variant, variant_named
from loopfm.core.files import atomic_write, read_parquet, write_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import unix_us
from loopfm.core.training import EarlyStopping, time_split
from loopfm.data.vocab import Vocab
from loopfm.eval.metrics import quality
from loopfm.features.store import historical_features
from loopfm.vm.model import WIDE_PARAMETER_PREFIXES, VerticalModel, VMShapes


def tensor_spec(cfg: RunConfig, vocab: Vocab) -> TensorSpec:
    return TensorSpec(
        history_length=cfg.vm.history_length,
        code_dim=cfg.fm.code_dim,
        code_format=cfg.fm.code_format,
        n_items=vocab.n_items,
        n_categories=vocab.n_categories,
        n_brands=vocab.n_brands,
        item_activity=cfg.vm.item_activity,
    )


def frame_tensors(df: pd.DataFrame, spec: TensorSpec) -> dict[str, np.ndarray]:
    """A historical-features frame (one candidate per row) -> model inputs."""
    user_columns = [*USER_FEATURES, VM_HISTORY_FEATURE, *VM_COUNT_FEATURES] + ([FM_HISTORY_FEATURE] if FM_HISTORY_FEATURE in df else [])
    wanted = CANDIDATE_FEATURES if spec.item_activity else ITEM_FEATURES
    missing = [c for c in wanted if c not in df]
    if missing:
        raise ValueError(f"the historical features lack {missing}: this run's feature tables predate them; rebuild them "
                         "(`loopfm features build`, `loopfm features apply`) or set vm.item_activity=false")  # fmt: skip
    candidates = candidate_tensors({c: df[c].tolist() for c in wanted}, spec)
    return model_inputs({c: df[c].tolist() for c in user_columns}, df["hour"].tolist(), candidates, spec,
                        candidate_user=np.arange(len(df), dtype=np.int64))  # fmt: skip


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


def variant_frame(df: pd.DataFrame, variant: Variant) -> pd.DataFrame:
    """A frame read through the LoopFM+KD feature service as `variant`'s own service gives it:
    without the FM history unless the variant reads it."""
    return df if variant.fm_history else df.drop(columns=FM_HISTORY_FEATURE)


def shapes_for(cfg: RunConfig, spec: TensorSpec, variant: str) -> VMShapes:
    return VMShapes(
        user_context_vocab=spec.user_context_vocab,
        candidate_vocab=spec.candidate_vocab,
        code_dim=spec.code_dim,
        embedding_dim=cfg.vm.embedding_dim,
        hidden=tuple(cfg.vm.hidden),
        use_fm_history=variant_named(variant).fm_history,
        encoder=cfg.vm.encoder,
        history_length=spec.history_length,
        dropout=cfg.vm.dropout,
        history_product=cfg.vm.history_product,
        short_window=min(cfg.vm.short_window, spec.history_length),  # an L sweep may go below it
        item_bias=not spec.item_activity,
        recency_decay=cfg.vm.recency_decay,
        recency_slope=cfg.vm.recency_slope,
    )


def train_variant(paths: RunPaths, cfg: RunConfig, store, variant: str, log=print) -> dict:
    """Train one variant, save it to vm/<variant>/, return eval-window predictions."""
    service = variant_named(variant).feature_service
    started = time.perf_counter()
    train_df = historical_features(store, read_parquet(paths.features / "vm_train_entities.parquet"), service)
    eval_df = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), service)
    spec = tensor_spec(cfg, Vocab.load(paths))
    model, p, fit = fit_variant(cfg, spec, variant, train_df, eval_df, log)
    out = paths.vm / variant
    out.mkdir(parents=True, exist_ok=True)
    state = {FORMAT_KEY: FORMAT_VERSION, "state": model.state_dict(), "shapes": asdict(model.shapes), "spec": asdict(spec)}
    atomic_write(out / "model.pt", lambda tmp: torch.save(state, tmp))
    write_text(out / "training.json", json.dumps(fit, indent=2))
    write_parquet(pd.DataFrame({"impression_id": eval_df["impression_id"], "p": p}), out / "eval_predictions.parquet")
    return {"variant": variant, "train_rows": len(train_df), "eval_rows": len(eval_df), "seconds": time.perf_counter() - started,
            **fit}  # fmt: skip


def fit_variant(
    cfg: RunConfig, spec: TensorSpec, variant: str, train_df: pd.DataFrame, eval_df: pd.DataFrame, log=print
) -> tuple[VerticalModel, np.ndarray, dict]:
    """Train one variant on frames read through its feature service; return the model, its
    eval-window predictions and its training summary (epochs run, the epoch restored).

    Selection: the newest `vm.validation_fraction` of the training window validates every
    epoch (the initial weights are epoch 0); training stops `vm.patience` epochs after the
    best validation log loss (serving head only) and restores that epoch's weights. With
    `vm.refit` (default) a fresh model, same seed, then trains on the whole window for the
    chosen number of epochs: the newest days are the ones most like the held-out window, and
    selection alone would never learn from them. Split from train_variant so experiments can
    train many cells on one retrieval."""
    train_t, eval_t = frame_tensors(train_df, spec), frame_tensors(eval_df, spec)
    label = train_df["label"].to_numpy(np.float32)
    kd_target = 1 / (1 + np.exp(-train_df["fm_logit"].to_numpy(np.float32)))
    fit_idx, val_idx = time_split(unix_us(train_df["event_timestamp"]).to_numpy(), cfg.vm.validation_fraction)
    stopping = EarlyStopping(cfg.vm.patience, first=0)
    val_t, val_label = {k: v[val_idx] for k, v in train_t.items()}, label[val_idx]

    def validate(model: VerticalModel, epoch: int) -> bool:
        loss = quality(val_label, predict(model, val_t))["logloss"]
        log(f"  vm {variant}: epoch {epoch}/{cfg.vm.epochs} val logloss {loss:.4f}")
        return stopping.update(loss, model)

    model = _train(cfg, spec, variant, train_t, label, kd_target, fit_idx, cfg.vm.epochs, validate)
    stopping.restore(model)
    summary = stopping.summary()
    log(f"  vm {variant}: best epoch {stopping.best_epoch} of {stopping.epochs} (val logloss {stopping.best_loss:.4f})")
    if cfg.vm.refit:
        model = _train(cfg, spec, variant, train_t, label, kd_target, np.arange(len(label)), stopping.best_epoch)
        summary["refit_epochs"] = stopping.best_epoch
        log(f"  vm {variant}: refit on all {len(label)} training rows for {stopping.best_epoch} epochs")
    return model, predict(model, eval_t), summary


def _train(
    cfg: RunConfig, spec: TensorSpec, variant: str, tensors: dict[str, np.ndarray], label: np.ndarray, kd_target: np.ndarray,
    rows: np.ndarray, epochs: int, after_epoch=None,
) -> VerticalModel:  # fmt: skip
    """A fresh model (seed vm.seed, serving head started at the popularity of `rows`:
    VerticalModel.init_biases) trained on `rows` for up to `epochs` epochs;
    `after_epoch(model, epoch)` (epoch 0 = before training) returns True to stop early."""
    torch.manual_seed(cfg.vm.seed)
    rng = np.random.default_rng(cfg.vm.seed)
    model = VerticalModel(shapes_for(cfg, spec, variant))
    model.init_biases(tensors["candidates"][rows], label[rows])
    wide = [p for n, p in model.named_parameters() if n.startswith(WIDE_PARAMETER_PREFIXES)]
    deep = [p for n, p in model.named_parameters() if not n.startswith(WIDE_PARAMETER_PREFIXES)]
    opt = torch.optim.AdamW([{"params": deep}, {"params": wide, "lr": cfg.vm.lr * cfg.vm.wide_lr_multiplier}],
                            lr=cfg.vm.lr, weight_decay=cfg.vm.weight_decay)  # fmt: skip
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    y, kd = torch.from_numpy(label), torch.from_numpy(kd_target)
    use_kd = variant_named(variant).kd
    average = _weight_average(model, cfg.vm.average_epochs, math.ceil(len(rows) / cfg.vm.batch_size))
    kept = average.module if average else model  # what is validated and returned
    if after_epoch and after_epoch(kept, 0):
        return kept
    for epoch in range(1, epochs + 1):
        model.train()
        kd_weight = cfg.vm.kd_weight * kd_ramp(epoch, cfg.vm.kd_ramp_epochs)
        order = rng.permutation(rows)
        for lo in range(0, len(order), cfg.vm.batch_size):
            idx = order[lo : lo + cfg.vm.batch_size]
            logit, kd_logit = model(**_rows(tensors, idx))
            loss = bce(logit, y[idx])
            if use_kd and kd_weight:  # auxiliary head: FM bias does not flow into the serving head
                loss = loss + kd_weight * bce(kd_logit, kd[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if average:
                average.update_parameters(model)
        if after_epoch and after_epoch(kept, epoch):
            break
    return kept


def _weight_average(model: VerticalModel, epochs: float, steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights whose horizon, 1 / (1 - decay)
    optimizer steps, is `epochs` epochs (None when epochs is 0). PyTorch's AveragedModel
    (as in SWA, Izmailov et al. 2018; EMA as in Polyak averaging)."""
    if epochs <= 0:
        return None
    decay = 1 - 1 / max(1.0, epochs * steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def kd_ramp(epoch: int, ramp_epochs: int) -> float:
    """The share of vm.kd_weight used in epoch `epoch` (1-based): 0 in epoch 1, rising linearly
    to 1 at epoch 1 + ramp_epochs (1 throughout when ramp_epochs is 0). Measured in
    docs/training.md: at the full weight from the first step, the auxiliary head's gradient
    disturbed the shared layers before the serving head had learned anything, the first
    epochs validated worse than the popularity start, and early stopping kept epoch 0 (a
    ramp-up as for the consistency weight of Laine & Aila 2017)."""
    return 1.0 if ramp_epochs == 0 else min(1.0, (epoch - 1) / ramp_epochs)


def load_variant(paths: RunPaths, variant: str) -> tuple[VerticalModel, TensorSpec]:
    path = paths.vm / variant / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `loopfm vm train --variant {variant}` first")
    state = torch.load(path, weights_only=False)
    check_format(state, path, f"re-run `loopfm vm train --variant {variant}`")
    shapes = state["shapes"]
    shapes = VMShapes(**{k: tuple(v) if isinstance(v, list) else v for k, v in shapes.items()})
    model = VerticalModel(shapes)
    model.load_state_dict(state["state"])
    return model.eval(), TensorSpec(**state["spec"])
