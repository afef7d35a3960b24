"""`loopfm fm import-log`: an embedding log produced outside loopfm -> the standard embedding log.

The input is a parquet file with one row per impression of the run:

- `impression_id`: the run's impression ids (`data/impressions.parquet`), each exactly once.
  Every impression needs an embedding: the log is the FM's record of every event, and a
  missing one would silently drop a click from its user's FM history and leave a VM example
  without its KD label, so ids of the run absent from the file are refused (named), as are
  ids the run does not have and ids given twice.
- `embedding`: a list or fixed-size list of floats, one width for every row (any width;
  float16 and float64 are read as float32). NaN, infinite and null values are refused.
- `fm_logit` (optional): the FM's click logit, the KD label. Absent, the KD label is a
  logistic regression on the standardised embedding (scikit-learn), fitted like the
  compressor on the rows available before the VM's training window.
- `available_at` (optional): when the embedding was logged, as timestamps or unix numbers
  (unit inferred, loopfm/data/parse.py); default event time + `fm.logging_delay_s`. Never before
  the event.

The embeddings are the user's FM's: that each was computed only from data before its
`available_at` is theirs to keep (loopfm cannot see their FM). What loopfm trains here is
kept causal by construction: the compressor (loopfm/fm/model.py Compressor: autoencoder,
tanh code, Matryoshka prefixes `fm.matryoshka_dims`, stored as `fm.code_format` with
`fm.code_dim` dims) and the KD probe learn only from rows available strictly before the
VM's training window (day `fm.warmup_days`), validated on the newest `fm.validation_fraction`
of them and early-stopped (loopfm/core/training.py); every row's `fm_trained_until` is that
window start, as under the `frozen` checkpoint scheme. Inputs are standardised per
dimension with the same rows' mean and standard deviation before compression.

Nothing is written unless every check passes: then the log (atomically, the same file and
columns as `loopfm fm log`), `fm/import_summary.json` and `fm/log_source.json` (the log's FM is
an imported one: the live loop refuses such a run, whatever checkpoints `fm/` holds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from loopfm.contract.codec import encode_codes
from loopfm.core.config import RunConfig
from loopfm.core.files import read_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import US_PER_DAY, from_unix_us, unix_us
from loopfm.core.training import EarlyStopping, time_split
from loopfm.data.parse import INT64_RANGE, BadValues, integers, unix_times_us
from loopfm.fm.log import write_log
from loopfm.fm.model import Compressor

REQUIRED = ("impression_id", "embedding")
OPTIONAL = ("fm_logit", "available_at")
SHOWN = 10  # ids named in a message
STD_FLOOR = 1e-6  # a constant dimension is centred, not divided by zero


class ImportLogError(ValueError):
    """A bad embedding file; the message names the file, the column and the rows."""


def _ids(values: np.ndarray) -> str:
    values = np.asarray(values).tolist()
    return f"{values[:SHOWN]}{' ...' if len(values) > SHOWN else ''}"


def _refuse_rows(path: Path, column: str, bad: np.ndarray, ids: np.ndarray, problem: str) -> None:
    """ImportLogError naming the rows where `bad` holds by impression id, if any."""
    if bad.any():
        raise ImportLogError(f"{path}: column {column!r}: {problem} in {int(bad.sum())} row(s), impression id(s) {_ids(ids[bad])}")


def _impression_ids(path: Path, table: pa.Table) -> np.ndarray:
    raw = table.column("impression_id").to_pandas()
    missing = raw.isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing) + 1
        raise ImportLogError(f"{path}: column 'impression_id': missing in {missing.sum()} row(s), row(s) {_ids(rows)}")
    try:
        ids = integers(raw, INT64_RANGE, "an integer impression id").to_numpy(np.int64)
    except BadValues as exc:
        rows = np.flatnonzero(exc.bad) + 1
        raise ImportLogError(f"{path}: column 'impression_id': {exc.problem} in row(s) {_ids(rows)}") from None
    duplicated = pd.Series(ids).duplicated(keep=False).to_numpy()
    _refuse_rows(path, "impression_id", duplicated, ids, "ids given more than once")
    return ids


def _embeddings(path: Path, column: pa.ChunkedArray, ids: np.ndarray) -> np.ndarray:
    """[N, D] float32 from a list or fixed-size list column; refuses nulls, mixed widths, non-finite values."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
        pa.types.is_floating(kind.value_type)
    ):
        raise ImportLogError(f"{path}: column 'embedding': expected a list or fixed-size list of float32, got {kind}")
    _refuse_rows(path, "embedding", column.is_null().to_numpy(zero_copy_only=False), ids, "missing embedding")
    widths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    counts = pd.Series(widths).value_counts()
    width = int(counts.index[0])
    if width == 0:
        raise ImportLogError(f"{path}: column 'embedding': empty embeddings (width 0)")
    shown = ", ".join(f"{w} ({n} rows)" for w, n in counts.items())
    _refuse_rows(path, "embedding", widths != width, ids, f"widths differ ({shown}); a width other than {width}")
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), width)
    _refuse_rows(path, "embedding", ~np.isfinite(values).all(1), ids, "NaN, infinite or null values")
    return values


def read_embedding_file(path: Path, imp: pd.DataFrame, delay_s: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Check `path` against the run's impressions `imp` and return, in impression order, the
    embeddings [N, D] float32, the FM logits [N] float32 (None when the file has none) and
    the availability times [N] (unix µs). Raises ImportLogError naming file, column and rows."""
    if not path.exists():
        raise ImportLogError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many kinds for a file that is not what it says
        raise ImportLogError(f"{path}: not a readable parquet file: {exc}") from None
    names = table.column_names
    missing = [c for c in REQUIRED if c not in names]
    unknown = [c for c in names if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise ImportLogError(f"{path}: " + "; ".join(
            [f"missing column(s) {missing}"] * bool(missing) + [f"unknown column(s) {unknown}"] * bool(unknown))
            + f"; expected {list(REQUIRED)} and optionally {list(OPTIONAL)}")  # fmt: skip
    ids = _impression_ids(path, table)
    run_ids = imp["impression_id"].to_numpy(np.int64)
    _refuse_rows(path, "impression_id", ~np.isin(ids, run_ids), ids, "ids that are no impression of the run")
    absent = ~np.isin(run_ids, ids)
    if absent.any():
        raise ImportLogError(f"{path}: column 'impression_id': {int(absent.sum())} impression(s) of the run have no "
                             f"embedding, impression id(s) {_ids(run_ids[absent])}; every impression needs one")  # fmt: skip
    order = pd.Index(ids).get_indexer(run_ids)  # file row of each impression, in impression order
    event_us = unix_us(imp["event_timestamp"]).to_numpy()
    embeddings = _embeddings(path, table.column("embedding"), ids)[order]

    logits = None
    if "fm_logit" in names:
        raw = table.column("fm_logit")
        if not (pa.types.is_floating(raw.type) or pa.types.is_integer(raw.type)):
            raise ImportLogError(f"{path}: column 'fm_logit': expected a number, got {raw.type}")
        values = raw.to_numpy(zero_copy_only=False).astype(np.float64)
        _refuse_rows(path, "fm_logit", ~np.isfinite(values), ids, "NaN, infinite or null values")
        logits = values[order].astype(np.float32)

    if "available_at" not in names:
        return embeddings, logits, event_us + delay_s * 1_000_000
    try:
        available = unix_times_us(table.column("available_at").to_pandas())  # in file order
    except BadValues as exc:
        _refuse_rows(path, "available_at", exc.bad, ids, exc.problem)
        raise
    event_in_file_order = event_us[pd.Index(run_ids).get_indexer(ids)]
    _refuse_rows(path, "available_at", available < event_in_file_order, ids, "before the impression's event time")
    return embeddings, logits, available[order]


def train_compressor(x: np.ndarray, available_us: np.ndarray, cfg: RunConfig) -> tuple[Compressor, dict]:
    """A Compressor fitted on the rows of standardised embeddings x [N, D] whose availability
    time (unix µs) is `available_us` [N]. Epochs up to fm.warmup_epochs over shuffled batches
    of fm.batch_size (AdamW, fm.lr, fm.weight_decay), validated on the newest
    fm.validation_fraction by availability, early-stopped with fm.patience and restored to the
    best epoch; loss = reconstruction MSE averaged over the Matryoshka prefixes."""
    torch.manual_seed(cfg.world.seed)
    rng = np.random.default_rng(cfg.world.seed)
    compressor = Compressor(x.shape[1], cfg.fm.code_dim)
    opt = torch.optim.AdamW(compressor.parameters(), lr=cfg.fm.lr, weight_decay=cfg.fm.weight_decay)
    fit, val = time_split(available_us, cfg.fm.validation_fraction)
    x_val, prefixes = torch.from_numpy(x[val]), cfg.fm.matryoshka_dims
    stopping = EarlyStopping(cfg.fm.patience)
    for _ in range(cfg.fm.warmup_epochs):
        compressor.train()
        order = rng.permutation(fit)
        for lo in range(0, order.size, cfg.fm.batch_size):
            loss = compressor.reconstruction_loss(torch.from_numpy(x[order[lo : lo + cfg.fm.batch_size]]), prefixes)
            opt.zero_grad()
            loss.backward()
            opt.step()
        compressor.eval()
        with torch.no_grad():
            val_loss = float(compressor.reconstruction_loss(x_val, prefixes))
        if stopping.update(val_loss, compressor):
            break
    stopping.restore(compressor)
    summary = {k.replace("logloss", "mse"): v for k, v in stopping.summary().items()}
    return compressor.eval(), summary


def _probe_logits(x: np.ndarray, label: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The KD label when the file has no fm_logit: logit [N] of a logistic regression on
    x [N, D], fitted on `rows` only."""
    from sklearn.linear_model import LogisticRegression

    if np.unique(label[rows]).size < 2:
        raise ImportLogError("no fm_logit column, and the rows before the VM's training window hold one class only: "
                             "cannot fit the KD probe; add fm_logit to the file")  # fmt: skip
    probe = LogisticRegression(max_iter=1000).fit(x[rows], label[rows])
    return probe.decision_function(x).astype(np.float32)


def import_embedding_log(paths: RunPaths, cfg: RunConfig, embeddings_path: Path) -> dict:
    """Check the file (read_embedding_file), fit the compressor (and, without fm_logit, the
    KD probe) on the rows available before the VM's training window, and write the embedding
    log in impression order (module docstring). Returns the summary also written to
    fm/import_summary.json. Raises ImportLogError for a bad file or too few early rows."""
    imp = read_parquet(paths.table("impressions"), columns=["impression_id", "user_id", "event_timestamp", "label"])
    x, logits, available = read_embedding_file(embeddings_path, imp, cfg.fm.logging_delay_s)
    window_start = pd.Timestamp(cfg.world.start_date, tz="UTC").value // 1000 + cfg.fm.warmup_days * US_PER_DAY
    early = np.flatnonzero(available < window_start)
    n_val = round(early.size * cfg.fm.validation_fraction)
    if not 0 < n_val < early.size:
        raise ImportLogError(f"{embeddings_path}: {early.size} embedding(s) available before the VM's training window "
                             f"({from_unix_us([window_start]).iloc[0]}, day fm.warmup_days = {cfg.fm.warmup_days}): "
                             "too few to fit and validate the compressor")  # fmt: skip
    mean = x[early].mean(0)
    std = np.maximum(x[early].std(0), STD_FLOOR)
    x = ((x - mean) / std).astype(np.float32)
    compressor, fit_summary = train_compressor(x[early], available[early], cfg)
    with torch.no_grad():
        z = compressor.encode(torch.from_numpy(x)).numpy()
    codes = encode_codes(z, cfg.fm.code_format)
    label = imp["label"].to_numpy()
    kd_source = "file"
    if logits is None:
        logits, kd_source = _probe_logits(x, label, early), "logistic regression on the embedding (no fm_logit in the file)"
    log = pd.DataFrame(
        {
            "impression_id": imp["impression_id"],
            "user_id": imp["user_id"],
            "event_timestamp": imp["event_timestamp"],
            "available_at": from_unix_us(available).to_numpy(),
            "fm_code": [row.tobytes() for row in codes],
            "fm_logit": logits,
            "fm_trained_until": from_unix_us(np.full(len(imp), window_start)).to_numpy(),
        }
    )
    summary = {
        "embeddings": str(embeddings_path),
        "rows": len(log),
        "width": int(x.shape[1]),
        "code": f"{cfg.fm.code_format} x {cfg.fm.code_dim}",
        "vm_window_start": str(from_unix_us([window_start]).iloc[0]),
        "compressor_rows": int(early.size),
        "compressor_newest_available_at": str(from_unix_us([available[early].max()]).iloc[0]),
        "compressor": fit_summary,
        "kd_label": kd_source,
    }
    write_text(paths.fm / "import_summary.json", json.dumps(summary, indent=2))
    write_log(paths, log, {"fm": "imported", "summary": "import_summary.json"})
    return summary
