"""The wire format of the loop's messages, and their validation.

A message is a flat map of text fields (a Redis Streams entry). Two kinds:

- `impression` (the default): impression_id (int64), user_id and item_id (source ids of the
  run's entity types), vertical (one of the run's verticals), event_timestamp (unix µs,
  integer), label (0 or 1);
- `item`: a catalog upsert, item_id plus category, brand and price_bucket (integers inside
  the FM's vocabularies).

`parse` turns one entry into an `Impression` or an `ItemUpsert`, or raises `BadMessage` with
the reason the worker files it under in the dead-letter stream.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from loopfm.contract.names import ID_INT64, N_PRICE_BUCKETS
from loopfm.data.event_files import EVENT_COLUMNS, ITEM_COLUMNS

IMPRESSION_FIELDS, ITEM_FIELDS = EVENT_COLUMNS, ITEM_COLUMNS  # a message holds a file row's columns
KINDS = ("impression", "item")
_INTEGER = re.compile(r"[+-]?\d+")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class BadMessage(ValueError):
    """A message the loop cannot apply; str() is the reason."""


@dataclass(frozen=True)
class Impression:
    impression_id: int
    user: int | str  # source id
    item: int | str  # source id
    vertical: str
    time_us: int  # event time, unix µs
    label: int


@dataclass(frozen=True)
class ItemUpsert:
    item: int | str  # source id
    category: int
    brand: int
    price_bucket: int


@dataclass(frozen=True)
class Schema:
    """What a valid message holds in one run: entity id types (ID_INT64 | ID_STRING), the
    verticals, the FM's category and brand vocabulary sizes, and how far into the future (µs)
    an event timestamp may lie."""

    user_type: str
    item_type: str
    verticals: tuple[str, ...]
    n_categories: int
    n_brands: int
    future_skew_us: int


def _text(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name)
    if value is None or value == "":
        raise BadMessage(f"missing field {name!r}")
    return value


def _integer(fields: Mapping[str, str], name: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    text = _text(fields, name).strip()
    if not _INTEGER.fullmatch(text):
        try:
            number = float(text)
        except ValueError:
            raise BadMessage(f"field {name!r} is not an integer: {text[:40]!r}") from None
        if not math.isfinite(number):
            raise BadMessage(f"field {name!r} is not a finite number: {text[:40]!r}")
        raise BadMessage(f"field {name!r} is not an integer: {text[:40]!r}")
    value = int(text)
    if not low <= value <= high:
        raise BadMessage(f"field {name!r} = {value} lies outside [{low}, {high}]")
    return value


def _source_id(fields: Mapping[str, str], name: str, id_type: str) -> int | str:
    return _integer(fields, name) if id_type == ID_INT64 else _text(fields, name)


def parse(fields: Mapping[str, str], schema: Schema, now_us: int) -> Impression | ItemUpsert:
    """One message's fields -> its record. Raises BadMessage naming the field and the problem:
    a missing or wrongly typed field, a non-finite number, an unknown kind or vertical, a label
    other than 0/1, an event timestamp more than `schema.future_skew_us` after `now_us`."""
    kind = fields.get("kind") or "impression"
    if kind == "item":
        return ItemUpsert(
            item=_source_id(fields, "item_id", schema.item_type),
            category=_integer(fields, "category", 0, schema.n_categories - 1),
            brand=_integer(fields, "brand", 0, schema.n_brands - 1),
            price_bucket=_integer(fields, "price_bucket", 0, N_PRICE_BUCKETS - 1),
        )
    if kind != "impression":
        raise BadMessage(f"unknown kind {kind[:40]!r}; expected one of {KINDS}")
    vertical = _text(fields, "vertical")
    if vertical not in schema.verticals:
        raise BadMessage(f"vertical {vertical[:40]!r} is not one of {list(schema.verticals)}")
    time_us = _integer(fields, "event_timestamp", 0)
    if time_us > now_us + schema.future_skew_us:
        raise BadMessage(f"event_timestamp {time_us} lies {(time_us - now_us) / 1e6:.0f} s in the future "
                         f"(stream.future_skew_s allows {schema.future_skew_us / 1e6:.0f} s)")  # fmt: skip
    return Impression(
        impression_id=_integer(fields, "impression_id"),
        user=_source_id(fields, "user_id", schema.user_type),
        item=_source_id(fields, "item_id", schema.item_type),
        vertical=vertical,
        time_us=time_us,
        label=_integer(fields, "label", 0, 1),
    )
