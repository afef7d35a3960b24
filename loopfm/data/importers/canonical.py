"""What every importer shares: reading files with line numbers, checking and converting the
columns that play a canonical role, the `--vertical` rule, and the canonical tables.

An importer turns its files into one frame of impressions: the canonical column of each
role (`COLUMNS`; ids as text keys; `_vertical` presets a row's vertical) beside every source
column, so a vertical rule can name any column of the source without clashing with them.
`canonical` turns that frame into the tables the pipeline reads (dense ids, buckets, UTC
timestamps), the maps from dense ids back to the source ids (loopfm/data/ids.py: int64 or
text, as the source's ids allow) and the run's data span.
Every check happens before anything is written; a bad file raises `DataFormatError` naming
the file, the column and the line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from loopfm.contract.names import ITEM_KEY, N_PRICE_BUCKETS, USER_KEY
from loopfm.core.timeunits import US_PER_DAY, US_PER_HOUR
from loopfm.data.ids import id_map
from loopfm.data.parse import BadValues, integer_keys, source_ids, text_ids, unix_times_us

TARGET, OTHER = "target", "other"
# Age groups of MovieLens-1M (<18, 18-24, 25-34, 35-44, 45-55, 56+): the models' six age buckets.
AGE_EDGES = (18, 25, 35, 45, 56)
NO_TIME_START_US = pd.Timestamp(year=2000, month=1, day=1, tz="UTC").value // 1000  # for data without absolute times
# role (what a column means) -> its canonical column. timestamp: unix time (loopfm.data.parse) or date-time text;
# order: sortable numbers without absolute time; age: years; age_level: a bucket 0-5 (higher: 5).
COLUMNS = {
    "user_id": "_user", "item_id": "_item", "label": "_label", "timestamp": "_time_us", "order": "_order",
    "category": "_category", "brand": "_brand", "price": "_price", "age": "_age_bucket", "age_level": "_age_bucket",
    "gender": "_gender",
}  # fmt: skip
ROLES = tuple(COLUMNS)
REQUIRED_ROLES = ("user_id", "item_id", "label")
TEXT = "string[pyarrow]"  # every value is read as text; Arrow strings take a fraction of Python's memory


class DataFormatError(ValueError):
    """A file does not have the layout of its format; the message names file, column and line."""


def read_table(
    path: Path, columns: Sequence[str], *, sep: str = ",", names: Sequence[str] | None = None, encoding: str = "utf-8",
    id_columns: Sequence[str] = (),
) -> pd.DataFrame:  # fmt: skip
    """A CSV (header row unless `names` is given) or parquet file, every value as text, with
    `_line`: where each row is in the file. Fails unless every one of `columns` is there.
    `id_columns` of a parquet file's numeric type become the exact decimal of each id
    (loopfm.data.parse.text_ids: "13", never "13.0"; a float that is no integer or beyond 2**53 is
    refused naming the column and row)."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
            df = df.astype({c: TEXT for c in df.columns if c not in id_columns})
        else:
            df = pd.read_csv(
                path, sep=sep, header=None if names else 0, names=names, dtype=TEXT, index_col=False,
                keep_default_na=False, na_values=[""], skip_blank_lines=False, encoding=encoding,
                engine="python" if len(sep) > 1 else "c",
            )  # fmt: skip
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # pandas' ParserError is a ValueError
        raise DataFormatError(f"{path}: cannot be read as {'parquet' if path.suffix == '.parquet' else 'CSV'}: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]  # user_profile.csv's header ends in a space
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataFormatError(f"{path}: missing column {missing[0]!r} (found: {', '.join(df.columns)})")
    first_line = 1 if names or path.suffix == ".parquet" else 2
    df["_line"] = np.arange(len(df)) + first_line
    df.attrs["path"] = path
    for column in id_columns:
        df[column] = _parsed(df, column, text_ids)
    df = df[df.drop(columns="_line").notna().any(axis=1)].reset_index(drop=True)  # blank lines
    return df


def _fail(df: pd.DataFrame, column: str, bad: np.ndarray, problem: str) -> DataFormatError:
    path: Path = df.attrs["path"]
    i = int(np.flatnonzero(bad)[0])
    where = "row" if path.suffix == ".parquet" else "line"
    more = f" ({int(bad.sum()) - 1} more such rows)" if bad.sum() > 1 else ""
    value = df[column].iloc[i]
    shown = "an empty value" if pd.isna(value) else repr(str(value))
    return DataFormatError(f"{path}: {where} {df['_line'].iloc[i]}, column {column!r}: {problem}, got {shown}{more}")


def _parsed(df: pd.DataFrame, column: str, parse):
    """`parse(df[column])`, its BadValues turned into a DataFormatError naming file, column and line."""
    try:
        return parse(df[column])
    except BadValues as exc:
        raise _fail(df, column, exc.bad, exc.problem) from None


def numbers(df: pd.DataFrame, column: str, *, integer: bool = False, required: bool = True) -> pd.Series:
    """A column of finite numbers as float64 (NaN where empty and not required); names the
    first bad row. Small integers only (flags, levels): ids go through `_keys`."""
    raw = df[column]
    values = pd.Series(pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan), index=raw.index)
    infinite = np.isinf(values).to_numpy()
    if infinite.any():
        raise _fail(df, column, infinite, "not a finite number")
    bad = (values.isna() & raw.notna()).to_numpy()
    if integer:
        bad |= (values % 1 > 0).to_numpy()
    if bad.any():
        raise _fail(df, column, bad, "not an integer" if integer else "not a number")
    if required and raw.isna().any():
        raise _fail(df, column, raw.isna().to_numpy(), "missing value")
    return values


def _keys(df: pd.DataFrame, column: str, integer: bool) -> pd.Series:
    """Ids as text keys; integer ids are parsed exactly (64-bit, never through float64) and
    written in plain decimal ("007" and "7.0" are 7)."""
    if df[column].isna().any() and integer:
        raise _fail(df, column, df[column].isna().to_numpy(), "missing value")
    if integer:
        return _parsed(df, column, integer_keys)
    if df[column].isna().any():
        raise _fail(df, column, df[column].isna().to_numpy(), "missing value")
    blank = (df[column].str.strip() == "").to_numpy(bool)
    if blank.any():  # a parquet file's "" (a CSV's empty cell is missing): no id a request could send
        raise _fail(df, column, blank, "an empty id")
    return df[column]


def _label(df: pd.DataFrame, column: str, click_threshold: float | None) -> pd.Series:
    values = numbers(df, column)
    if click_threshold is not None:
        return (values >= click_threshold).astype(np.int64)
    bad = ~values.isin([0, 1]).to_numpy()
    if bad.any():
        raise _fail(df, column, bad, "a label must be 0 or 1 (or give a click threshold)")
    return values.astype(np.int64)


def _absolute_time_us(df: pd.DataFrame, column: str, unit: str | None) -> pd.Series:
    """Unix times in `unit` (inferred when None) or date-time text -> int64 microseconds (loopfm.data.parse)."""
    return pd.Series(_parsed(df, column, lambda values: unix_times_us(values, unit)), index=df.index)


def _two_values(df: pd.DataFrame, column: str) -> pd.Series:
    """The models have two genders: a third distinct value is an error (missing is allowed)."""
    kept = sorted(df[column].dropna().unique())[:2]
    bad = (df[column].notna() & ~df[column].isin(kept)).to_numpy(bool)
    if bad.any():
        raise _fail(df, column, bad, f"gender takes two values ({' and '.join(kept)} come first)")
    return df[column]


def one_row_per_id(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """The rows of a side table (ads, users, movies), one per id. Identical repeats are
    dropped; an id repeated with other values is refused, naming the ids: which row holds the
    truth cannot be told, and taking the first would alter the data in silence."""
    rows = df.drop_duplicates()
    clash = rows[key].duplicated(keep=False).to_numpy()
    if clash.any():
        ids = list(dict.fromkeys(rows.loc[clash, key].astype(str)))
        raise DataFormatError(f"{df.attrs.get('path', 'a side table')}: id(s) {ids[:5]}{' ...' if len(ids) > 5 else ''} "
                              "appear in several rows with different values; one row per id")  # fmt: skip
    return rows


def age_buckets(years: pd.Series) -> pd.Series:
    return pd.Series(np.digitize(years, AGE_EDGES), index=years.index).where(years.notna())


def convert(
    df: pd.DataFrame, roles: Mapping[str, str], *, integer_ids: bool, click_threshold: float | None = None,
    time_unit: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Add the canonical column of each role (`roles`: role -> column of this file), checked.
    `time_unit`: the unit of a numeric timestamp column (s, ms, us, ns); None infers it."""
    out = df.drop(columns="_line")
    for role, column in roles.items():
        if role in ("user_id", "item_id"):
            value = _keys(df, column, integer_ids)
        elif role == "label":
            value = _label(df, column, click_threshold)
        elif role == "timestamp":
            value = _absolute_time_us(df, column, time_unit)
        elif role in ("order", "price"):
            value = numbers(df, column, required=role == "order")
        elif role in ("category", "brand"):
            value = df[column]  # any text; missing values are a value of their own
        elif role == "gender":
            value = _two_values(df, column)
        elif role == "age":
            value = age_buckets(numbers(df, column, required=False))
        elif role == "age_level":
            value = numbers(df, column, integer=True, required=False).clip(0, len(AGE_EDGES))
        else:
            raise DataFormatError(f"unknown role {role!r}: roles are {', '.join(ROLES)}")
        out[COLUMNS[role]] = value
    return out


def _quoted(value: str) -> str:
    """A value of a rule as `VerticalRule.parse` reads it back: in double quotes if it holds a
    comma or a quote."""
    if any(c in value for c in ',"'):
        return '"' + value.replace('"', '""') + '"'
    return value


@dataclass(frozen=True)
class VerticalRule:
    """`column=value[,value...]`: the rows whose `column` holds one of the values form the VM's
    vertical; every other row is still seen by the FM. `column` is a column of the source or,
    when no source column has that name, a role (`category=12` reads the column mapped to the
    category). Values are compared as text; a cell holding several values separated by `|`
    (MovieLens genres) matches if any of them does. The values are read as one CSV record, so a
    value holding a comma is written in double quotes: `genre="Books, Kids",Toys`."""

    column: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "VerticalRule":
        column, sep, values = text.partition("=")
        try:
            parts = tuple(v.strip() for v in next(csv.reader([values], skipinitialspace=True, strict=True), []) if v.strip())
        except csv.Error as exc:
            raise DataFormatError(f"--vertical {text!r}: {exc}; a value holding a comma goes in double quotes, "
                                  'e.g. genre="Books, Kids"') from None  # fmt: skip
        if not sep or not column.strip() or not parts:
            raise DataFormatError(f"--vertical {text!r}: expected column=value[,value...], e.g. category=12")
        return cls(column.strip(), parts)

    def __str__(self) -> str:
        """The rule as `--vertical` takes it (parse(str(rule)) == rule)."""
        return f"{self.column}={','.join(_quoted(v) for v in self.values)}"

    def cells(self, events: pd.DataFrame) -> pd.Series:
        """The column the rule reads, as text."""
        column = self.column if not self.column.startswith("_") else None
        if column not in events.columns:
            column = COLUMNS.get(self.column)
        if column not in events.columns:
            usable = [c for c in events.columns if not c.startswith("_")]
            usable += [role for role, c in COLUMNS.items() if c in events.columns and role not in ("timestamp", "order")]
            raise DataFormatError(f"--vertical {self}: the data has no column {self.column!r} (columns: {', '.join(usable)})")
        return events[column].astype(TEXT)

    def matches(self, events: pd.DataFrame) -> np.ndarray:
        cells = self.cells(events)
        hit = cells.isin(self.values).fillna(False).to_numpy(bool)
        multi = cells.str.contains("|", regex=False).fillna(False).to_numpy(bool)
        if multi.any():
            parts = cells[multi].astype(object).str.split("|").explode()
            hit[multi] = parts.isin(self.values).groupby(level=0).any().reindex(cells[multi].index).to_numpy()
        return hit


@dataclass(frozen=True)
class Span:
    """Where the imported data lies in time and which verticals it has (the run's world)."""

    start_date: str
    n_days: int
    verticals: tuple[str, ...]
    vertical_mix: tuple[float, ...]
    duplicates: int  # rows dropped as repeats of an earlier row (`drop_repeated_rows`)


def _times(events: pd.DataFrame, days: int) -> np.ndarray:
    """Event times in µs. Without absolute times, the order (a column, else the row order) is
    spread evenly over `days` days from NO_TIME_START_US (the start of the year 2000, UTC)."""
    if "_time_us" in events and events["_time_us"].notna().all():
        return events["_time_us"].to_numpy(np.int64)
    key = events["_order"].to_numpy(np.float64) if "_order" in events else np.arange(len(events), dtype=np.float64)
    span = max(key.max() - key.min(), 1e-12)
    return NO_TIME_START_US + ((key - key.min()) / span * (days * US_PER_DAY - 1)).astype(np.int64)


def _codes(values: pd.Series) -> np.ndarray:
    """Dense codes 0..n-1 in order of first appearance; a missing value is a value of its own."""
    return pd.factorize(values.astype(TEXT).fillna("<missing>"))[0].astype(np.int64)


def _price_buckets(price: pd.Series) -> np.ndarray:
    """Deciles of the items' prices (rank based, so ties and skew do not matter); none -> 0."""
    ranks = price.rank(method="first", pct=True)
    return np.nan_to_num(np.ceil(ranks * N_PRICE_BUCKETS) - 1, nan=0).clip(0, N_PRICE_BUCKETS - 1).astype(np.int64)


def _gender_codes(gender: pd.Series) -> np.ndarray:
    values = sorted(gender.dropna().astype(str).unique())
    if len(values) > 2:
        raise DataFormatError(f"column mapped to gender has {len(values)} values ({', '.join(values[:5])}...): at most 2")
    return gender.astype(str).map({v: i for i, v in enumerate(values)}).fillna(0).astype(np.int64).to_numpy()


def drop_repeated_rows(events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(events without the rows equal in every column, absolute time included, to an earlier
    row; how many were dropped). Such a row is one impression logged twice: counted twice it
    would weigh double in the FM, the histories and the VM. Data without absolute times keeps
    every row: two impressions of one item to one user cannot be told from one logged twice."""
    if "_time_us" not in events or events["_time_us"].isna().any():
        return events, 0
    repeated = events.duplicated().to_numpy()
    return events[~repeated].reset_index(drop=True), int(repeated.sum())


def canonical(events: pd.DataFrame, rule: VerticalRule, days: int = 10) -> tuple[dict[str, pd.DataFrame], Span]:
    """Source impressions -> users, items, impressions and the id maps, plus the data's span.

    A row with a preset `_vertical` (e.g. Taobao's behaviour log) keeps it and is never in the
    VM's vertical; every other row is `target` if the rule matches it, else `other`. Repeated
    rows are dropped (`drop_repeated_rows`), counted in the span."""
    events, duplicates = drop_repeated_rows(events.reset_index(drop=True))
    target = rule.matches(events)
    preset = events["_vertical"] if "_vertical" in events else pd.Series(None, index=events.index, dtype=object)
    target &= preset.isna().to_numpy()
    if not target.any():
        common = rule.cells(events).value_counts().index[:8]
        raise DataFormatError(f"--vertical {rule}: no impression matches; common values of {rule.column!r}, as "
                              f"--vertical takes them: {', '.join(_quoted(v) for v in common)}")  # fmt: skip
    vertical = preset.where(preset.notna(), np.where(target, TARGET, OTHER))

    time_us = _times(events, days)
    order = np.argsort(time_us, kind="stable")
    ev = events[[c for c in events.columns if c.startswith("_")]].iloc[order].reset_index(drop=True)  # the rule is done
    time_us, vertical, target = time_us[order], vertical.to_numpy()[order], target[order]
    user_id, item_id = _codes(ev["_user"]), _codes(ev["_item"])

    first_item = ~pd.Series(item_id).duplicated().to_numpy()
    item_rows = ev[first_item]
    is_target_item = pd.Series(target).groupby(item_id).any()
    items = pd.DataFrame(
        {
            "item_id": item_id[first_item],
            "vertical": np.where(is_target_item.loc[item_id[first_item]].to_numpy(), TARGET, vertical[first_item]),
            "category": _codes(item_rows["_category"]) if "_category" in ev else 0,
            "brand": _codes(item_rows["_brand"]) if "_brand" in ev else 0,
            "price": item_rows["_price"].to_numpy(np.float32) if "_price" in ev else np.float32("nan"),
        }
    )
    items["price_bucket"] = _price_buckets(items["price"])
    first_user = ~pd.Series(user_id).duplicated().to_numpy()
    user_rows = ev[first_user]
    age = user_rows["_age_bucket"].fillna(0).to_numpy(np.int64) if "_age_bucket" in ev else 0
    gender = _gender_codes(user_rows["_gender"]) if "_gender" in ev else 0
    users = pd.DataFrame({"user_id": user_id[first_user], "age_bucket": age, "gender": gender})

    timestamps = pd.to_datetime(time_us, unit="us", utc=True).astype("datetime64[us, UTC]")
    impressions = pd.DataFrame(
        {
            "impression_id": np.arange(len(ev), dtype=np.int64),
            "user_id": user_id,
            "item_id": item_id,
            "vertical": vertical.astype(str),
            "event_timestamp": timestamps,
            "hour": (time_us % US_PER_DAY) // US_PER_HOUR,
            "label": ev["_label"].to_numpy(np.int64),
        }
    )
    tables = {
        "users": users.sort_values("user_id", ignore_index=True),
        "items": items.sort_values("item_id", ignore_index=True),
        "impressions": impressions,
        "user_ids": id_map(USER_KEY, user_id[first_user], source_ids(ev["_user"][first_user])),
        "item_ids": id_map(ITEM_KEY, item_id[first_item], source_ids(ev["_item"][first_item])),
    }
    start = timestamps[0].normalize()
    shares = impressions["vertical"].value_counts(normalize=True).sort_index()
    span = Span(
        start_date=start.strftime("%Y-%m-%d"),
        n_days=int((time_us[-1] - start.value // 1000) // US_PER_DAY) + 1,
        verticals=tuple(shares.index),
        vertical_mix=tuple(float(s) for s in shares),
        duplicates=duplicates,
    )
    return tables, span
