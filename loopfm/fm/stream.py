"""Stream training of the FM, day by day, and the embedding log it writes.

The FM is whatever module `fm.model` names (loopfm/fm/plugin.py; default loopfm's own
FoundationModel); the compressor learns from the concatenation of its `fm.extract_layer`
layers. Checkpoints record the `fm.model` and layers they were trained with, so `fm log`
rebuilds the same module.

Causality scheme. Checkpoint i is the FM after training on days [0, i) only, so it carries
`trained_until = start + i days`. Logging picks, for the events of day d:

- `frozen`: checkpoint `warmup_days` (W) for every event. One consistent embedding
  space, which the LoopFM paper found matters more than freshness. VM examples start at
  day `warmup_days`, so every code and KD label they see comes from a checkpoint that
  trained only on data older than the example.
- `rolling` (default): the newest checkpoint at or before max(d, W), i.e. the FM as it stood
  when the event happened (trained on everything before that day's stream period; warm-up
  days take checkpoint W, which no VM example precedes). Fresher, and it knows users who arrived after the warm-up, but the code space
  drifts between days.

Checkpoints exist for W..n_days only: W is fit by epochs on the warm-up days with early
stopping, later ones stream one day at a time, with a checkpoint at the end of each
stream period (stream_periods: a day, or on data with fewer than `fm.batch_size` events a day
the days that hold one batch). A checkpoint reads users and items it never
trained on as unknown (a zero embedding the FM learned to use through id dropout), never
through an untrained random embedding.

Either way each log row records `fm_trained_until`, and tests check it against the time
of every VM example that uses it.

One training, one embedding space. `fm train` writes its checkpoints into a new folder that
replaces `fm/checkpoints` only once every checkpoint is written (loopfm.io.staged_dir), with
`training.json`: the training's id, which each checkpoint also carries, and a digest of the
data it was trained on. A killed training leaves the previous set whole; `fm log` refuses a
set trained on other data, and any checkpoint of another training. The embedding log names
the FM that wrote it (`log_source.json`: a training id, or an imported log), so the live
loop encodes new events only with the FM that made the history they join.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from loopfm.config import RunConfig
from loopfm.contract.codec import code_bytes, encode_codes
from loopfm.contract.tensorize import activity_bucket_arrays
from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION, check_format
from loopfm.data.dataset import Vocab
from loopfm.engine import LOCAL, Engine
from loopfm.sequences import count_before, last_n_before
from loopfm.fm import plugin
from loopfm.fm.model import Compressor, FMShapes
from loopfm.io import (
    US_PER_DAY, RunPaths, atomic_write, from_unix_us, read_parquet, staged_dir, unix_us, write_parquet, write_text,
)  # fmt: skip
from loopfm.training import EarlyStopping, time_split

_ID_COLUMNS = ("user_id", "item_id", "category", "brand", "vertical_id", "hour", "age_bucket", "gender", "price_bucket")
ACTIVITY_COLUMNS = ("rate_all", "count_all", "rate_vertical", "count_vertical", "rate_item", "count_item")


def build_inputs(paths: RunPaths, cfg: RunConfig) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Every event's FM input arrays, in impression order, and the impressions themselves."""
    imp = read_parquet(paths.table("impressions"))
    users = read_parquet(paths.table("users")).set_index("user_id")
    items = read_parquet(paths.table("items")).set_index("item_id")
    t = unix_us(imp["event_timestamp"]).to_numpy()
    day = (t - _start_us(cfg)) // US_PER_DAY
    vertical_ids = {v: i for i, v in enumerate(cfg.world.verticals)}

    clicks = imp["label"].to_numpy() == 1
    hist_idx = last_n_before(
        imp["user_id"].to_numpy()[clicks], t[clicks], imp["user_id"].to_numpy(), t, cfg.fm.raw_history_length
    )
    clicked_items = imp["item_id"].to_numpy()[clicks] + 1
    raw_history = np.where(hist_idx >= 0, clicked_items[np.clip(hist_idx, 0, None)], 0)

    vertical = imp["vertical"].map(vertical_ids).to_numpy()
    activity = _activity(imp["user_id"].to_numpy(), imp["item_id"].to_numpy(), vertical, len(vertical_ids), t, clicks)
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
        **activity,
        "label": imp["label"].to_numpy().astype(np.float32),
        "day": day,
        "time_s": t,
    }
    return arrays, imp


def _activity(
    user: np.ndarray, item: np.ndarray, vertical: np.ndarray, n_verticals: int, t: np.ndarray, clicks: np.ndarray
) -> dict[str, np.ndarray]:  # fmt: skip
    """Per event [n]: the impressions and clicks before it of its user over every vertical, of its
    user in the event's vertical, and of its item by every user, as the VM's
    (contract/tensorize.activity_bucket_arrays) click-rate and count buckets. The VM sees only
    its own vertical's counts; the FM's cross-vertical ones tell a user's propensity where that
    vertical has little of the user, and the item's tell its click rate up to the event, which
    a checkpoint's item embedding knows only up to the day it was trained (issue 15)."""
    out = {}
    for scope, key in (("all", user), ("vertical", user * n_verticals + vertical), ("item", item)):
        n = count_before(key, t, key, t)
        k = count_before(key[clicks], t[clicks], key, t)
        out[f"rate_{scope}"], out[f"count_{scope}"] = activity_bucket_arrays(n, k)
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


def _start_us(cfg: RunConfig) -> int:
    return pd.Timestamp(cfg.world.start_date, tz="UTC").value // 1000


def _shapes(cfg: RunConfig, vocab: Vocab, intent_dim: int) -> FMShapes:
    return FMShapes(
        n_users=vocab.n_users,
        n_items=vocab.n_items,
        n_categories=vocab.n_categories,
        n_brands=vocab.n_brands,
        n_verticals=len(cfg.world.verticals),
        intent_dim=intent_dim,
        embedding_dim=cfg.fm.embedding_dim,
        hidden=tuple(cfg.fm.hidden),
        code_dim=cfg.fm.code_dim,
        extract_layer=cfg.fm.extract_layer,
        dot_logit=cfg.fm.dot_logit,
    )


def _batch(
    arrays: dict[str, np.ndarray], idx: np.ndarray, known_users: np.ndarray | None = None, known_items: np.ndarray | None = None
) -> dict[str, torch.Tensor]:  # fmt: skip
    """FM inputs of events `idx`; given a checkpoint's known ids [bool], every other user and
    item id (one it never trained on, or one beyond its vocabulary) reads as unknown (-1; 0 in
    raw_history, which holds item id + 1)."""
    b = {k: arrays[k][idx].astype(np.int64) for k in (*_ID_COLUMNS, *ACTIVITY_COLUMNS, "raw_history")}
    if known_users is not None:
        b["user_id"] = np.where(_known(known_users, b["user_id"]), b["user_id"], -1)
        b["item_id"] = np.where(_known(known_items, b["item_id"]), b["item_id"], -1)
        b["raw_history"] = np.where(_known(known_items, b["raw_history"] - 1), b["raw_history"], 0)
    out = {k: torch.from_numpy(v) for k, v in b.items()}
    out["intent"] = torch.from_numpy(arrays["intent"][idx])
    return out


def _known(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """known[ids] [bool], False for ids outside 0..len(known)-1 (unknown or grown since)."""
    inside = (ids >= 0) & (ids < known.size)
    return inside & known[np.where(inside, ids, 0)]


def checkpoint_dir(paths: RunPaths) -> Path:
    return paths.fm / "checkpoints"


def checkpoint_path(paths: RunPaths, index: int) -> Path:
    return checkpoint_dir(paths) / f"ckpt_{index:03d}.pt"


TRAINING_FILE = "training.json"  # in the checkpoint folder: {"training_id", "data_sha256", "checkpoints"}
LOG_SOURCE_FILE = "log_source.json"  # beside the embedding log: {"fm": "loopfm", "training_id"} or {"fm": "imported"}


def data_digest(paths: RunPaths) -> str:
    """sha256 over the names and bytes of the run's data/ files: the data an FM trained on."""
    h = hashlib.sha256()
    for path in sorted(p for p in paths.data.iterdir() if p.is_file()):
        h.update(path.name.encode())
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def training(paths: RunPaths) -> dict:
    """The finished training whose checkpoints are in fm/checkpoints (TRAINING_FILE). Raises
    FileNotFoundError when there is none (no `fm train`, or one of an older loopfm)."""
    record = checkpoint_dir(paths) / TRAINING_FILE
    if not record.exists():
        raise FileNotFoundError(f"no finished FM training in {checkpoint_dir(paths)} ({TRAINING_FILE} not found): "
                                "run `loopfm fm train`")  # fmt: skip
    return json.loads(record.read_text())


def current_training(paths: RunPaths) -> dict:
    """`training(paths)`, refused (ValueError) when the run's data changed since it trained."""
    trained = training(paths)
    if trained["data_sha256"] != data_digest(paths):
        raise ValueError(f"the FM checkpoints in {checkpoint_dir(paths)} were trained on other data than {paths.data} "
                         "holds now: re-run `loopfm fm train`, then `loopfm fm log`")  # fmt: skip
    return trained


def log_source(paths: RunPaths) -> dict:
    """Which FM wrote the embedding log (LOG_SOURCE_FILE). Raises FileNotFoundError when no
    log says so (none written, or one interrupted or of an older loopfm)."""
    source = paths.fm / LOG_SOURCE_FILE
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: no embedding log names the FM that wrote it; run `loopfm fm log` "
                                "(or `loopfm fm import-log`)")  # fmt: skip
    return json.loads(source.read_text())


def write_log(paths: RunPaths, log: pd.DataFrame, source: dict) -> None:
    """The embedding log, then LOG_SOURCE_FILE naming its FM; the old source goes first, so an
    interrupted write leaves a log that names no FM rather than the wrong one."""
    (paths.fm / LOG_SOURCE_FILE).unlink(missing_ok=True)
    write_parquet(log, paths.fm_log)
    write_text(paths.fm / LOG_SOURCE_FILE, json.dumps(source))


class _Objective(torch.nn.Module):
    """FM task loss and compressor reconstruction loss in one forward, so that one module
    (DistributedDataParallel when data-parallel) owns every trained parameter. In training,
    each event's user and item id is read as unknown with probability `id_dropout`, so the
    FM learns what to make of the ids a checkpoint never saw (users who arrive later)."""

    def __init__(self, fm: torch.nn.Module, compressor: Compressor, layers: tuple[str, ...], prefixes: tuple[int, ...], id_dropout: float):
        super().__init__()
        self.fm, self.compressor, self.layers, self.prefixes, self.id_dropout = fm, compressor, layers, prefixes, id_dropout

    def forward(self, batch: dict[str, torch.Tensor], label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.id_dropout:
            batch = {**batch, **{k: batch[k].masked_fill(torch.rand(label.shape) < self.id_dropout, -1) for k in ("user_id", "item_id")}}
        logit, acts = self.fm(batch)
        task = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
        target = plugin.extract(acts, self.layers).detach()  # stop-gradient into the FM
        return task, self.compressor.reconstruction_loss(target, self.prefixes)


def train_fm(paths: RunPaths, cfg: RunConfig, progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Checkpoint i = the FM and compressor trained on days [0, i) only.

    Warm-up: checkpoint `fm.warmup_days` (W) is fit on days [0, W) by epochs, validated on the
    newest `fm.validation_fraction` of them, stopped `fm.patience` epochs after the best
    validation log loss and restored to it. Stream: every later day d is then seen
    `passes_per_day` shuffled times, in day order, and checkpoint d + 1 saved when d ends a
    stream period (stream_periods). Each checkpoint
    records the users and items it trained on; logging reads every other id as unknown.

    Data-parallel when world_size > 1 (torch.distributed already initialised, see
    loopfm/distributed/fm_train.py): every rank draws the same shuffle, takes its share
    `batch[rank::world_size]` of each global batch, and DDP averages the gradients, so one
    step still covers `fm.batch_size` events. Rank 0 alone writes checkpoints and history."""
    torch.manual_seed(cfg.world.seed)
    arrays, _ = build_inputs(paths, cfg)
    shapes = _shapes(cfg, Vocab.load(paths), arrays["intent"].shape[1])
    fm = plugin.build(cfg.fm.model, shapes)
    width = plugin.activation_width(fm, _batch(arrays, np.arange(min(8, len(arrays["day"])))), cfg.fm.model, cfg.fm.layers)
    compressor = Compressor(width, shapes.code_dim)
    objective: torch.nn.Module = _Objective(fm, compressor, cfg.fm.layers, cfg.fm.matryoshka_dims, cfg.fm.id_dropout)
    if world_size > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    wide = plugin.wide_parameters(fm)
    wide_ids = {id(p) for p in wide}
    deep = [p for p in objective.parameters() if id(p) not in wide_ids]
    opt = torch.optim.AdamW([{"params": deep}, {"params": wide, "lr": cfg.fm.lr * cfg.fm.wide_lr_multiplier}],
                            lr=cfg.fm.lr, weight_decay=cfg.fm.weight_decay)  # fmt: skip
    rng = np.random.default_rng(cfg.world.seed)
    known_users, known_items = np.zeros(shapes.n_users, bool), np.zeros(shapes.n_items, bool)
    training_id, data_sha256 = uuid.uuid4().hex, data_digest(paths)  # the data as build_inputs read it

    def save(index: int) -> None:
        if rank != 0:
            return
        path = folder / checkpoint_path(paths, index).name
        state = {
            FORMAT_KEY: FORMAT_VERSION,
            "training_id": training_id,
            "fm": fm.state_dict(),
            "compressor": compressor.state_dict(),
            "shapes": asdict(shapes),
            "model": cfg.fm.model,
            "layers": list(cfg.fm.layers),
            "trained_until_us": _start_us(cfg) + index * US_PER_DAY,
            "known_users": known_users.copy(),
            "known_items": known_items.copy(),
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def train_on(idx: np.ndarray, where: str) -> tuple[float, float]:
        """One optimizer step per global batch of `idx` (in the given order); mean losses.
        Raises ValueError naming `where` when a loss is NaN or infinite, before stepping on it."""
        objective.train()
        losses, recon = [], []
        for lo in range(0, idx.size, cfg.fm.batch_size):
            global_batch = idx[lo : lo + cfg.fm.batch_size]
            if global_batch.size < world_size:
                continue  # a tail too small to give every rank a row (never when single-process)
            bi = global_batch[rank::world_size]
            task, rec = objective(_batch(arrays, bi), torch.from_numpy(arrays["label"][bi]))
            bad = plugin.nonfinite({"the task loss (the logit)": task, f"the reconstruction loss (layers {','.join(cfg.fm.layers)})": rec})
            if bad:
                raise ValueError(f"fm train stopped in {where}: NaN or infinite values in {' and '.join(bad)}, so fm.model "
                                 f"{cfg.fm.model!r} gives non-finite values or weights; fix the model or lower fm.lr "
                                 f"({checkpoint_dir(paths)} keeps the previous training's checkpoints, if any)")  # fmt: skip
            opt.zero_grad()
            (task + rec).backward()
            opt.step()
            losses.append(task.item())
            recon.append(rec.item())
        return tuple(_mean_over_ranks([float(np.mean(losses)), float(np.mean(recon))], world_size))  # type: ignore[return-value]

    started = time.perf_counter()
    warmup = np.flatnonzero(arrays["day"] < cfg.fm.warmup_days)
    with staged_dir(checkpoint_dir(paths)) if rank == 0 else contextlib.nullcontext(Path()) as folder:
        fit_rows, val_rows = (warmup[i] for i in time_split(arrays["time_s"][warmup], cfg.fm.validation_fraction))
        stopping = EarlyStopping(cfg.fm.patience)
        for epoch in tqdm(range(cfg.fm.warmup_epochs), desc="fm warm-up (epochs)", disable=not progress):
            train_on(rng.permutation(fit_rows), f"warm-up epoch {epoch + 1}")
            if stopping.update(_validation_logloss(fm, arrays, val_rows), objective):
                break
        stopping.restore(objective)
        known_users[arrays["user_id"][warmup]] = known_items[arrays["item_id"][warmup]] = True
        save(cfg.fm.warmup_days)
        history: list[dict] = []
        ends = {b for _, b in stream_periods(arrays["day"], cfg.fm.warmup_days, cfg.world.n_days, cfg.fm.batch_size)}
        for d in tqdm(range(cfg.fm.warmup_days, cfg.world.n_days), desc="fm stream (days)", disable=not progress):
            day_idx = np.flatnonzero(arrays["day"] == d)
            if day_idx.size:
                next_day = np.flatnonzero(arrays["day"] == d + 1)
                logloss, recon_mse = train_on(np.concatenate([rng.permutation(day_idx) for _ in range(cfg.fm.passes_per_day)]), f"day {d}")
                history.append({"day": d, "logloss": logloss, "recon_mse": recon_mse,
                                "next_day_logloss": _validation_logloss(fm, arrays, next_day) if next_day.size else None})  # fmt: skip
                known_users[arrays["user_id"][day_idx]] = known_items[arrays["item_id"][day_idx]] = True
            if d + 1 in ends:
                save(d + 1)
        if rank == 0:
            record = {"training_id": training_id, "data_sha256": data_sha256,
                      "checkpoints": sorted(p.name for p in folder.glob("ckpt_*.pt"))}  # fmt: skip
            write_text(folder / TRAINING_FILE, json.dumps(record, indent=2))
    summary = {
        "warmup": stopping.summary(), "days": history, "seconds": time.perf_counter() - started,
        "events": int(arrays["day"].size), "world_size": world_size,
        "parameter_sha256": parameter_digest(fm.state_dict(), compressor.state_dict()),
    }  # fmt: skip
    if rank == 0:
        write_text(paths.fm / "train_history.json", pd.Series(summary).to_json(indent=2))
    return summary


def _validation_logloss(fm: torch.nn.Module, arrays: dict[str, np.ndarray], rows: np.ndarray) -> float:
    """Task log loss of the FM on events `rows` (every id read as it is: they were trained on or not)."""
    fm.eval()
    with torch.no_grad():
        logits = torch.cat([fm(_batch(arrays, rows[lo : lo + 8192]))[0] for lo in range(0, rows.size, 8192)])
    label = torch.from_numpy(arrays["label"][rows])
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, label))


def parameter_digest(fm_state: dict[str, torch.Tensor], compressor_state: dict[str, torch.Tensor]) -> str:
    """sha256 of every FM and compressor tensor: equal digests = bit-identical models."""
    h = hashlib.sha256()
    for prefix, state in (("fm.", fm_state), ("compressor.", compressor_state)):
        for name, tensor in sorted(state.items()):
            h.update((prefix + name).encode())
            h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _mean_over_ranks(values: list[float], world_size: int) -> list[float]:
    """The mean of each value over all ranks (the values themselves when single-process)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (t / world_size).tolist()


def load_checkpoint(paths: RunPaths, index: int) -> tuple[torch.nn.Module, Compressor, tuple[str, ...], int, np.ndarray, np.ndarray]:
    """Checkpoint `index` -> FM (the fm.model it was trained with), compressor, extracted
    layers, trained-until (unix µs), known users and items [bool]. Raises ValueError for a
    checkpoint of another training than the folder's TRAINING_FILE."""
    path = checkpoint_path(paths, index)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `loopfm fm train` first")
    state = torch.load(path, weights_only=False)
    check_format(state, path, "re-run `loopfm fm train` and the stages after it")
    if state.get("training_id") != training(paths)["training_id"]:
        raise ValueError(f"{path} is not of the training {checkpoint_dir(paths) / TRAINING_FILE} records: the folder mixes "
                         "checkpoints of two trainings; re-run `loopfm fm train`, then `loopfm fm log`")  # fmt: skip
    shapes = FMShapes(**{**state["shapes"], "hidden": tuple(state["shapes"]["hidden"])})
    fm = plugin.build(state["model"], shapes)
    try:
        fm.load_state_dict(state["fm"])
    except RuntimeError:
        raise RuntimeError(f"{path} holds parameters {type(fm).__name__} no longer has (the FM's inputs changed since it "
                           "was saved): re-run `loopfm fm train` and the stages after it") from None  # fmt: skip
    width, code_dim = state["compressor"]["encoder.weight"].shape[::-1]
    compressor = Compressor(width, code_dim)
    compressor.load_state_dict(state["compressor"])
    bad = plugin.nonfinite({**fm.state_dict(), **{f"compressor.{k}": v for k, v in compressor.state_dict().items()}})
    if bad:
        raise ValueError(f"{path}: NaN or infinite values in parameters {', '.join(bad[:5])}: re-run `loopfm fm train` "
                         "(with a fixed fm.model or a lower fm.lr)")  # fmt: skip
    layers = tuple(state["layers"])
    return fm.eval(), compressor.eval(), layers, int(state["trained_until_us"]), state["known_users"], state["known_items"]


def encode(fm: torch.nn.Module, compressor: Compressor, layers: tuple[str, ...], batch: dict[str, torch.Tensor],
           cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One batch of FM inputs (`_batch`) -> (logits [B] float32, stored codes [B, code_bytes]
    uint8): extraction -> compression -> the first fm.code_dim dims -> int4 or fp32. The one
    encoding of `fm log` and `loopfm stream`. Raises ValueError when the checkpoint's code is
    narrower than fm.code_dim, or the logit or an extracted layer holds NaN or infinite values."""
    if compressor.encoder.out_features < cfg.fm.code_dim:
        raise ValueError(f"fm.code_dim {cfg.fm.code_dim} exceeds the checkpoint's {compressor.encoder.out_features}-dim code")
    with torch.no_grad():
        logit, acts = fm(batch)
        bad = plugin.nonfinite({"the logit": logit, **{f"layer {name!r}": acts[name] for name in layers}})
        if bad:
            raise ValueError(f"fm.model {type(fm).__name__}: NaN or infinite values in {' and '.join(bad)} on "
                             f"{len(logit)} events: a code cannot be made of them")  # fmt: skip
        z = compressor.encode(plugin.extract(acts, layers)).numpy()[:, : cfg.fm.code_dim]
    return logit.numpy(), encode_codes(z, cfg.fm.code_format)


def stream_periods(days: np.ndarray, start: int, end: int, min_events: int) -> list[tuple[int, int]]:
    """The stream's steps after the warm-up: consecutive day ranges [a, b) covering [start, end),
    each closed at the end of the first day at which it holds >= `min_events` events (the last
    one at `end`). `days` [events] is each event's day. The FM saves a checkpoint at the end of
    each: every day on busy data; on data with a few events a day (day-resolution reviews over
    years) every period of about one batch, instead of a checkpoint the size of the FM per day."""
    counts = np.bincount(days[(days >= start) & (days < end)] - start, minlength=end - start)
    periods, a, held = [], start, 0
    for d, n in enumerate(counts, start):
        held += n
        if held >= min_events:
            periods.append((a, d + 1))
            a, held = d + 1, 0
    return periods + [(a, end)] if a < end else periods


def saved_indices(paths: RunPaths) -> np.ndarray:
    """The indices of the finished training's checkpoints (TRAINING_FILE), ascending."""
    return np.array(sorted(int(name[len("ckpt_") : -len(".pt")]) for name in training(paths)["checkpoints"]))


def checkpoint_index(cfg: RunConfig, day: int, saved: np.ndarray) -> int:
    """The checkpoint that encodes an event of day `day` (module docstring): the warm-up one
    under `frozen`; under `rolling` the newest of the `saved` indices at or before that day
    (trained on earlier days only: a stream period's days take the checkpoint saved before it),
    the newest for later days."""
    if cfg.fm.checkpoint_scheme == "frozen":
        return cfg.fm.warmup_days
    day = int(np.clip(day, cfg.fm.warmup_days, cfg.world.n_days))
    return int(saved[np.searchsorted(saved, day, side="right") - 1])


def log_events(
    paths: RunPaths, cfg: RunConfig, arrays: dict[str, np.ndarray], imp: pd.DataFrame, rows: np.ndarray,
    progress: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Embedding-log rows for the events at positions `rows` of `imp`, day by day with each
    day's checkpoint. Events after the last trained day (fresh ingested events) take the
    newest checkpoint under `rolling`, the warm-up one under `frozen`."""
    n = rows.size
    logits = np.zeros(n, dtype=np.float32)
    codes = np.zeros((n, code_bytes(cfg.fm.code_dim, cfg.fm.code_format)), dtype=np.uint8)
    trained_until = np.zeros(n, dtype=np.int64)
    days = arrays["day"][rows]
    loaded: dict[int, tuple] = {}
    saved = saved_indices(paths)
    for d in tqdm(np.unique(days), desc="fm log (days)", disable=not progress):
        index = checkpoint_index(cfg, int(d), saved)
        if index not in loaded:
            loaded = {index: load_checkpoint(paths, index)}
        fm, compressor, layers, until, known_users, known_items = loaded[index]
        at = np.flatnonzero(days == d)  # positions in the output
        for lo in range(0, at.size, 8192):
            out = at[lo : lo + 8192]
            logits[out], codes[out] = encode(fm, compressor, layers, _batch(arrays, rows[out], known_users, known_items), cfg)
        trained_until[at] = until
    events = imp.iloc[rows].reset_index(drop=True)
    return pd.DataFrame(
        {
            "impression_id": events["impression_id"],
            "user_id": events["user_id"],
            "event_timestamp": events["event_timestamp"],
            "available_at": events["event_timestamp"] + pd.Timedelta(seconds=cfg.fm.logging_delay_s),
            "fm_code": [row.tobytes() for row in codes],
            "fm_logit": logits,
            "fm_trained_until": from_unix_us(trained_until).to_numpy(),
        }
    )


def log_embeddings(paths: RunPaths, cfg: RunConfig, progress: bool = True, engine: Engine = LOCAL) -> pd.DataFrame:
    """Extraction -> compression -> stored code (int4 or fp32; the first fm.code_dim dims of the
    checkpoint's code), one row per event (see module docstring). `engine` maps `log_events`
    over blocks of events (loopfm/engine.py)."""
    trained = current_training(paths)
    arrays, imp = build_inputs(paths, cfg)
    log = engine.map_blocks(partial(log_events, paths, cfg, arrays, imp, progress=progress), np.arange(len(imp)))
    write_log(paths, log, {"fm": "loopfm", "training_id": trained["training_id"]})
    return log
