"""Run-directory layout and atomic file writes shared by every stage."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
