"""Run-directory layout and atomic file writes shared by every stage."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of one run keeps its artifacts."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def fm(self) -> Path:
        return self.root / "fm"

    @property
    def fm_log(self) -> Path:
        """The embedding log: one row per event with its int4 code and FM logit."""
        return self.fm / "fm_event_embeddings.parquet"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def vm(self) -> Path:
        return self.root / "vm"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def table(self, name: str) -> Path:
        return self.data / f"{name}.parquet"


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file and rename, so a killed stage never leaves half a table.

    Timestamps are stored as microseconds UTC: DuckDB (Feast's offline store) cannot cast
    nanosecond time-zone-aware columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for col in df.columns:
        if isinstance(df[col].dtype, pd.DatetimeTZDtype):
            df = df.assign(**{col: df[col].dt.tz_convert("UTC").astype("datetime64[us, UTC]")})
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder to fill with a stage's outputs. When the block succeeds, `target`
    (a symlink to its current version folder) is switched to the new folder by one atomic
    rename and the old version removed; a stage killed or failing inside the block leaves
    `target` exactly as it was, so readers see the whole old result or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    new = target.with_name(f".{target.name}.v{time.time_ns()}.{os.getpid()}")
    new.mkdir()  # mode from the umask, as any folder (mkdtemp's 0700 hid it from a container's user)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = target.resolve() if target.is_symlink() else None
    if target.exists() and old is None:  # a run written before versioned folders: a one-time move
        old = target.rename(target.with_name(f".{target.name}.legacy"))
    link = target.with_name(f".{target.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(new.name)  # relative: the run directory can be moved or copied
    os.replace(link, target)
    if old is not None and old != new:
        shutil.rmtree(old, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.v*"):  # left by earlier killed runs
        if stale != new:
            shutil.rmtree(stale, ignore_errors=True)


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return pd.read_parquet(path, columns=columns)


def unix_us(timestamps: pd.Series) -> pd.Series:
    """UTC timestamps (any unit) -> int64 microseconds since the epoch (the project's time unit;
    rounding to seconds would let a sub-second event into its own history)."""
    return timestamps.dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype("int64")


def from_unix_us(us) -> pd.Series:
    return pd.Series(pd.to_datetime(us, unit="us", utc=True)).astype("datetime64[us, UTC]")
