"""The embedding log: every event encoded by a checkpoint that trained only on data older
than the event (extraction -> compression -> an int4 or fp32 code), one row per event.

Causality scheme. Checkpoint i is the FM after training on days [0, i) only, so it carries
`trained_until = start + i days`. Logging picks, for the events of day d:

- `frozen`: checkpoint `warmup_days` (W) for every event. One consistent embedding
  space, which the LoopFM paper found matters more than freshness. VM examples start at
  day `warmup_days`, so every code and KD label they see comes from a checkpoint that
  trained only on data older than the example.
- `rolling` (default): the newest checkpoint at or before max(d, W), i.e. the FM as it stood
  when the event happened (trained on everything before that day's stream period; warm-up
  days take checkpoint W, which no VM example precedes). Fresher, and it knows users who
  arrived after the warm-up, but the code space drifts between days.

Either way each log row records `fm_trained_until`, and tests check it against the time
of every VM example that uses it.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from loopfm.contract.codec import code_bytes, encode_codes
from loopfm.core.config import RunConfig
from loopfm.core.engine import LOCAL, Engine
from loopfm.core.files import write_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import from_unix_us
from loopfm.fm import plugin
from loopfm.fm.inputs import build_inputs, input_batch
from loopfm.fm.model import Compressor
from loopfm.fm.train import current_training, load_checkpoint, saved_indices


LOG_SOURCE_FILE = "log_source.json"  # beside the embedding log: {"fm": "loopfm", "training_id"} or {"fm": "imported"}


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


def encode(fm: torch.nn.Module, compressor: Compressor, layers: tuple[str, ...], batch: dict[str, torch.Tensor],
           cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One batch of FM inputs (`input_batch`) -> (logits [B] float32, stored codes [B, code_bytes]
    uint8): extraction -> compression -> the first fm.code_dim dims -> int4 or fp32. The one
    encoding of `fm log` and `loopfm stream`. Raises ValueError when the checkpoint's code is
    narrower than fm.code_dim, its compressor reads another width than the extracted layers
    have (a checkpoint saved before the FM's layers changed), or the logit or an extracted
    layer holds NaN or infinite values."""
    if compressor.encoder.out_features < cfg.fm.code_dim:
        raise ValueError(f"fm.code_dim {cfg.fm.code_dim} exceeds the checkpoint's {compressor.encoder.out_features}-dim code")
    with torch.no_grad():
        logit, acts = fm(batch)
        bad = plugin.nonfinite({"the logit": logit, **{f"layer {name!r}": acts[name] for name in layers}})
        if bad:
            raise ValueError(f"fm.model {type(fm).__name__}: NaN or infinite values in {' and '.join(bad)} on "
                             f"{len(logit)} events: a code cannot be made of them")  # fmt: skip
        extracted = plugin.extract(acts, layers)
        if extracted.shape[1] != compressor.encoder.in_features:
            raise ValueError(f"the checkpoint's compressor reads {compressor.encoder.in_features} dims, fm.model "
                             f"{type(fm).__name__}'s layers {','.join(layers)} give {extracted.shape[1]}: the FM changed "
                             "since the checkpoint was trained; re-run `loopfm fm train` and the stages after it")  # fmt: skip
        z = compressor.encode(extracted).numpy()[:, : cfg.fm.code_dim]
    return logit.numpy(), encode_codes(z, cfg.fm.code_format)


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
            logits[out], codes[out] = encode(fm, compressor, layers, input_batch(arrays, rows[out], known_users, known_items), cfg)
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
    over blocks of events (loopfm/core/engine.py)."""
    trained = current_training(paths)
    arrays, imp = build_inputs(paths, cfg)
    log = engine.map_blocks(partial(log_events, paths, cfg, arrays, imp, progress=progress), np.arange(len(imp)))
    write_log(paths, log, {"fm": "loopfm", "training_id": trained["training_id"]})
    return log
