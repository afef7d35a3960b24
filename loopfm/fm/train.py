"""Stream training of the FM, day by day: checkpoint i is the FM and its compressor trained on
days [0, i) only (loopfm/fm/log.py says which checkpoint encodes which event).

The FM is whatever module `fm.model` names (loopfm/fm/plugin.py; default loopfm's own
FoundationModel); the compressor learns from the concatenation of its `fm.extract_layer`
layers. Checkpoints record the `fm.model` and layers they were trained with, so `fm log`
rebuilds the same module.

Checkpoints exist for W..n_days only: W is fit by epochs on the warm-up days with early
stopping, later ones stream one day at a time, with a checkpoint at the end of each stream
period (stream_periods: a day, or on data with fewer than `fm.batch_size` events a day the
days that hold one batch). A checkpoint reads users and items it never
trained on as unknown (a zero embedding the FM learned to use through id dropout), never
through an untrained random embedding.

One training, one embedding space. `fm train` writes its checkpoints into a new folder that
replaces `fm/checkpoints` only once every checkpoint is written (loopfm.core.files.staged_dir), with
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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION, check_format
from loopfm.core.config import RunConfig
from loopfm.core.files import atomic_write, staged_dir, write_text
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import US_PER_DAY
from loopfm.core.training import EarlyStopping, time_split
from loopfm.data.vocab import Vocab
from loopfm.fm import plugin
from loopfm.fm.inputs import build_inputs, input_batch, start_us
from loopfm.fm.model import Compressor, FMShapes


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


def checkpoint_dir(paths: RunPaths) -> Path:
    return paths.fm / "checkpoints"


def checkpoint_path(paths: RunPaths, index: int) -> Path:
    return checkpoint_dir(paths) / f"ckpt_{index:03d}.pt"


TRAINING_FILE = "training.json"  # in the checkpoint folder: {"training_id", "data_sha256", "checkpoints"}


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
    width = plugin.activation_width(fm, input_batch(arrays, np.arange(min(8, len(arrays["day"])))), cfg.fm.model, cfg.fm.layers)
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
            "trained_until_us": start_us(cfg) + index * US_PER_DAY,
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
            task, rec = objective(input_batch(arrays, bi), torch.from_numpy(arrays["label"][bi]))
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
        fit_rows, val_rows = (warmup[i] for i in time_split(arrays["time_us"][warmup], cfg.fm.validation_fraction))
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


def _validation_logloss(fm: torch.nn.Module, arrays: dict[str, np.ndarray], rows: np.ndarray) -> float:
    """Task log loss of the FM on events `rows` (every id read as it is: they were trained on or not)."""
    fm.eval()
    with torch.no_grad():
        logits = torch.cat([fm(input_batch(arrays, rows[lo : lo + 8192]))[0] for lo in range(0, rows.size, 8192)])
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
        raise RuntimeError(f"{path}: its parameters are not {type(fm).__name__}'s (the FM changed since it was saved): "
                           "re-run `loopfm fm train` and the stages after it") from None  # fmt: skip
    width, code_dim = state["compressor"]["encoder.weight"].shape[::-1]
    compressor = Compressor(width, code_dim)
    compressor.load_state_dict(state["compressor"])
    bad = plugin.nonfinite({**fm.state_dict(), **{f"compressor.{k}": v for k, v in compressor.state_dict().items()}})
    if bad:
        raise ValueError(f"{path}: NaN or infinite values in parameters {', '.join(bad[:5])}: re-run `loopfm fm train` "
                         "(with a fixed fm.model or a lower fm.lr)")  # fmt: skip
    layers = tuple(state["layers"])
    return fm.eval(), compressor.eval(), layers, int(state["trained_until_us"]), state["known_users"], state["known_items"]
