"""Time units: times are unix microseconds, UTC, everywhere inside the project."""

from __future__ import annotations

import pandas as pd

US_PER_HOUR = 3_600 * 1_000_000
US_PER_DAY = 24 * US_PER_HOUR


def unix_us(timestamps: pd.Series) -> pd.Series:
    """UTC timestamps (any unit) -> int64 microseconds since the epoch (the project's time unit;
    rounding to seconds would let a sub-second event into its own history)."""
    return timestamps.dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype("int64")


def from_unix_us(us) -> pd.Series:
    return pd.Series(pd.to_datetime(us, unit="us", utc=True)).astype("datetime64[us, UTC]")
