"""The one parser of ids, of times and of numbers for values from outside the project
(importers, `loopfm ingest`, command-line flags, server settings).

Values are never altered to fit: an id that cannot be held exactly, a time whose unit cannot
be told, a number that is not finite is refused. A refusal raises `BadValues` with the
problem and the rows it concerns; each entry point turns it into its own message naming
the file, the column and the row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ID_RANGE = (-(2**63), 2**64 - 1)  # 64-bit signed or unsigned integers
INT64_RANGE = (-(2**63), 2**63 - 1)
EXACT_FLOAT_INT = 2**53  # a float64 holds every integer up to this, and not every one beyond
TIME_UNITS = {"s": 10**6, "ms": 10**3, "us": 1, "ns": 10**-3}  # unit -> microseconds per unit
# Unix times from outside are taken to lie in [1980, 2100): in that window the four units'
# magnitudes do not overlap, so a number's unit is known from its size alone.
PLAUSIBLE_US = (pd.Timestamp("1980-01-01", tz="UTC").value // 1000, pd.Timestamp("2100-01-01", tz="UTC").value // 1000)
INTEGER_TEXT = r"\s*[+-]?\d+(\.0*)?\s*"  # "7", " 7 ", "+7", "7.0"; not "7.5", "7e3", "0x7"
PLAIN_DECIMAL = r"0|-?[1-9]\d*"  # an integer written one way only: "7", "-7"; not "07", "-0", "+7", "7.0", " 7"


class BadValues(ValueError):
    """`problem` holds for the rows where `bad` is true."""

    def __init__(self, problem: str, bad: np.ndarray):
        super().__init__(problem)
        self.problem, self.bad = problem, np.asarray(bad, dtype=bool)


def _exact(values: pd.Series, bounds: tuple[int, int], what: str) -> tuple[np.ndarray, list[int]]:
    """(code per row, -1 where missing; the distinct values as exact Python ints). The work
    is done once per distinct value, so a column of 25M ids of 1M users costs 1M parses."""
    codes, uniques = pd.factorize(values)
    if pd.api.types.is_bool_dtype(values.dtype):
        raise BadValues(f"not {what} (true/false)", codes >= 0)
    if pd.api.types.is_float_dtype(values.dtype):
        v = np.asarray(uniques, dtype=np.float64)
        bad = ~(np.isfinite(v) & (v == np.round(v)))
        if bad.any():
            raise BadValues(f"not {what}", np.isin(codes, np.flatnonzero(bad)))
        bad = np.abs(v) > EXACT_FLOAT_INT
        if bad.any():
            raise BadValues(f"{what} stored as a float beyond 2**53 cannot be held exactly: store it as an integer or text",
                            np.isin(codes, np.flatnonzero(bad)))  # fmt: skip
        exact = [int(x) for x in v]
    elif pd.api.types.is_integer_dtype(values.dtype):
        exact = [int(x) for x in uniques]
    else:
        text = pd.Series(np.asarray(uniques, dtype=object)).astype(str)
        bad = ~text.str.fullmatch(INTEGER_TEXT).to_numpy(bool)
        if bad.any():
            raise BadValues(f"not {what}", np.isin(codes, np.flatnonzero(bad)))
        exact = [int(t.strip().split(".")[0]) for t in text]
    low, high = bounds
    outside = np.array([not low <= v <= high for v in exact], dtype=bool)
    if outside.any():
        raise BadValues(f"{what} outside [{low}, {high}] cannot be held exactly", np.isin(codes, np.flatnonzero(outside)))
    return codes, exact


def integers(values: pd.Series, bounds: tuple[int, int] = ID_RANGE, what: str = "an integer") -> pd.Series:
    """Exact integers (Python ints, object dtype) from text or numbers; missing stays None.

    Text is parsed digit by digit ("7", " +7 ", "7.0"; never through float64); a float column
    is accepted only where it holds an integer up to 2**53 (beyond, it may already have been
    rounded). Raises BadValues for anything else and for values outside `bounds` (inclusive)."""
    codes, exact = _exact(values, bounds, what)
    out = np.array([*exact, None], dtype=object).take(codes)  # code -1 (missing) takes the None
    return pd.Series(out, index=values.index, dtype=object)


def integer_keys(values: pd.Series, bounds: tuple[int, int] = ID_RANGE) -> pd.Series:
    """Integer ids as their plain decimal text ("007" and "7.0" are "7"), exactly; missing
    stays missing. Raises BadValues as `integers` does."""
    codes, exact = _exact(values, bounds, "an integer")
    text = np.array([*(str(v) for v in exact), None], dtype=object).take(codes)
    return pd.Series(text, index=values.index).astype("string[pyarrow]")


def text_ids(values: pd.Series) -> pd.Series:
    """An id column as a file holds it -> ids as text (string[pyarrow]): a numeric column (a
    parquet file's integers or floats) as the plain decimal of each id ("13", never "13.0"),
    text unchanged; missing stays missing. Raises BadValues as `integer_keys` does for a
    numeric column: a float that is no integer, or beyond 2**53 (it may already have been
    rounded into another id), is refused, never merged with another id."""
    if pd.api.types.is_numeric_dtype(values.dtype):
        return integer_keys(values)
    return values.astype("string[pyarrow]")


def source_ids(keys: pd.Series) -> pd.Series:
    """Distinct ids as they came (text) -> the entity's source-id column: int64 when every id is
    the plain decimal of a signed 64-bit integer (so int64 and text name the same ids one to
    one), else the text unchanged ("07", "7.0", "a7" and 2**63 make the column text).
    Values are never altered: an int64 column holds exactly the integers the text wrote."""
    text = keys.astype(str)
    if len(text) and text.str.fullmatch(PLAIN_DECIMAL).all():
        exact = [int(t) for t in text]
        if all(INT64_RANGE[0] <= v <= INT64_RANGE[1] for v in exact):
            return pd.Series(np.array(exact, dtype=np.int64), index=keys.index)
    return text.astype("string[pyarrow]")


def _spread(present: np.ndarray, bad_present: np.ndarray) -> np.ndarray:
    bad = np.zeros(len(present), dtype=bool)
    bad[present] = bad_present
    return bad


def time_unit(number: float) -> str | None:
    """The unit in which `number` is a unix time in [1980, 2100), or None."""
    for unit, us in TIME_UNITS.items():
        if PLAUSIBLE_US[0] <= number * us < PLAUSIBLE_US[1]:
            return unit
    return None


def unix_times_us(values: pd.Series, unit: str | None = None) -> np.ndarray:
    """Times from outside -> int64 unix microseconds (UTC).

    Accepts timestamps (a datetime column), date-time text (UTC unless it names a zone by an
    offset, `Z`, UTC or GMT; an abbreviation such as EST or CST,
    which names different zones in different places, is refused rather than read as UTC) and
    unix numbers in `unit` (s, ms, us, ns); with no unit, the unit is inferred from the
    magnitude (`time_unit`) and must be the same on every row. Raises BadValues for a
    missing value, a number whose unit cannot be told or that lies outside [1980, 2100), a
    column that mixes units, and text that is no date-time."""
    if unit is not None and unit not in TIME_UNITS:
        raise ValueError(f"time unit {unit!r}: one of {', '.join(TIME_UNITS)}")
    missing = values.isna().to_numpy()
    if missing.any():
        raise BadValues("missing time", missing)
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        stamps = values if isinstance(values.dtype, pd.DatetimeTZDtype) else values.dt.tz_localize("UTC")
        return stamps.dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype(np.int64).to_numpy()
    if pd.api.types.is_numeric_dtype(values.dtype):
        numbers, text = values.to_numpy(np.float64), None
    else:
        text = values.astype(str).str.strip()
        numbers = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)
    is_number = ~np.isnan(numbers)
    out = np.zeros(len(values), dtype=np.int64)
    if is_number.any():
        raw = values[is_number] if text is None else text[is_number]
        out[is_number] = _unix_numbers_us(raw, numbers[is_number], unit)
    if (~is_number).any():
        parsed = _date_times(text, ~is_number)
        if parsed.isna().any():
            raise BadValues("neither a unix time nor a date-time", _spread(~is_number, parsed.isna().to_numpy()))
        out[~is_number] = parsed.astype("datetime64[us, UTC]").astype(np.int64).to_numpy()
    return out


# A trailing word of 2-5 letters names a zone by abbreviation ("EST", "CEST"), except these.
ZONE_WORD = r"(?:^|[^A-Za-z])([A-Za-z]{2,5})$"
UNAMBIGUOUS = ("UTC", "GMT", "UT", "AM", "PM")


def _date_times(text: pd.Series, rows: np.ndarray) -> pd.Series:
    """Date-time text of `rows` [bool] -> UTC timestamps (NaT where it is no date-time). Raises
    BadValues for text ending in a zone abbreviation: EST, CST or IST name different zones in
    different places, and the parser reads an abbreviation it does not know as UTC (or as the
    machine's local zone when that is its name)."""
    text = text[rows]
    word = text.str.extract(ZONE_WORD, expand=False)
    named = (word.notna() & ~word.str.upper().isin(UNAMBIGUOUS)).to_numpy(bool)
    if named.any():
        zones = ", ".join(sorted(set(word[named])))
        raise BadValues(f"a time zone abbreviation ({zones}) that names no one zone: write the offset "
                        "(an offset such as -05:00 after the time), or UTC", _spread(rows, named))  # fmt: skip
    return pd.to_datetime(text, errors="coerce", utc=True, format="mixed")


def _unix_numbers_us(raw: pd.Series, numbers: np.ndarray, unit: str | None) -> np.ndarray:
    """Unix numbers (`raw`, and the same as float64 in `numbers`) -> int64 microseconds.
    Whole numbers are converted exactly (nanoseconds exceed float64's 2**53), fractions of
    a second or millisecond through float64 (well under a microsecond of error)."""
    finite_ = np.isfinite(numbers)
    if not finite_.all():
        raise BadValues("not a finite number", ~finite_)
    if unit is None:
        units = np.array([time_unit(n) for n in numbers], dtype=object)
        unknown = np.array([u is None for u in units], dtype=bool)
        if unknown.any():
            raise BadValues("a unix time whose unit cannot be told from its size (s, ms, us or ns from 1980 to 2100): "
                            "give the unit explicitly (--time-unit)", unknown)  # fmt: skip
        unit = units[0]
        mixed = units != unit
        if mixed.any():
            raise BadValues(f"a unix time in another unit than the column's first row ({unit}): give --time-unit", mixed)
    whole = numbers == np.round(numbers)
    us = np.round(numbers * TIME_UNITS[unit]).astype(object)
    if whole.any():
        exact = integers(raw[whole], INT64_RANGE, "a unix time")
        us[whole] = [v // 1000 if unit == "ns" else v * TIME_UNITS[unit] for v in exact]
    outside = np.array([not PLAUSIBLE_US[0] <= v < PLAUSIBLE_US[1] for v in us], dtype=bool)
    if outside.any():
        raise BadValues(f"a unix time in {unit} outside 1980 to 2100", outside)
    return np.array([int(v) for v in us], dtype=np.int64)
