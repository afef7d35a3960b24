"""Source ids (the ids of the user's own logs) and the dense indices the models embed.

The FM, its log, the structured histories (packed item ids) and the VM's embedding tables work
on dense indices 0..n-1. Feast's entity join keys, `POST /score` and `loopfm ingest` take the
source ids. Each run keeps the map per entity as `data/user_ids.parquet` and
`data/item_ids.parquet`: the dense index (`user_id` / `item_id`) and `source_id`, an int64
column or a string column (an importer decides per entity with loopfm.data.parse.source_ids; the
synthetic world's ids are their own source ids). `features build` writes the Feast sources keyed
by the source ids, records each entity's type in `features/entity_types.json` for the Feast
definitions, and stores each item's dense index as the `item_index` feature, so the server reads
it with the item's other features in one round trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from loopfm.contract.names import ENTITY_TYPES_FILE, ID_INT64, ID_STRING, ITEM_KEY, USER_KEY
from loopfm.core.files import read_parquet, write_parquet, write_text
from loopfm.core.rundir import RunPaths

SOURCE_ID = "source_id"


def id_map(key: str, dense: Sequence[int], source: pd.Series | np.ndarray) -> pd.DataFrame:
    """The table of one entity's map: `key` (dense index, int64) and `source_id`."""
    return pd.DataFrame({key: np.asarray(dense, dtype=np.int64), SOURCE_ID: pd.Series(source).to_numpy()})


def id_map_path(paths: RunPaths, key: str) -> Path:
    """data/user_ids.parquet for user_id, data/item_ids.parquet for item_id."""
    return paths.table(f"{key}s")


@dataclass(frozen=True)
class IdMap:
    """One entity's source ids, position = dense index."""

    key: str
    source: pd.Series

    @classmethod
    def load(cls, paths: RunPaths, key: str) -> "IdMap":
        """Raises FileNotFoundError (a run written before source ids: write its data again) or
        ValueError when the dense indices are not 0..n-1."""
        path = id_map_path(paths, key)
        table = read_parquet(path).sort_values(key, kind="stable")
        if not np.array_equal(table[key].to_numpy(), np.arange(len(table))):
            raise ValueError(f"{path}: column {key!r} must hold each dense index 0..n-1 once")
        if table[SOURCE_ID].duplicated().any():
            raise ValueError(f"{path}: column {SOURCE_ID!r} names one id twice")
        return cls(key, table[SOURCE_ID].reset_index(drop=True))

    @property
    def id_type(self) -> str:
        """ID_INT64 or ID_STRING (loopfm/contract/names.py)."""
        return ID_INT64 if pd.api.types.is_integer_dtype(self.source.dtype) else ID_STRING

    def to_source(self, dense: Sequence[int] | np.ndarray) -> np.ndarray:
        """Source ids [n] (int64, or str objects) of dense indices [n]."""
        return self.source.take(np.asarray(dense, dtype=np.int64)).to_numpy()

    def to_dense(self, source: pd.Series) -> np.ndarray:
        """Dense indices [n] of source ids [n] of this entity's type; -1 where unknown."""
        return pd.Index(self.source).get_indexer(source)


def write_entity_types(folder: Path, maps: Sequence[IdMap]) -> dict[str, str]:
    """{join key: ID_INT64 | ID_STRING} into folder/entity_types.json (read by feature_repo/)."""
    types = {m.key: m.id_type for m in maps}
    write_text(folder / ENTITY_TYPES_FILE, json.dumps(types, indent=2))
    return types


def extend_id_map(paths: RunPaths, current: IdMap, dense: np.ndarray, source: pd.Series) -> IdMap:
    """`current` grown append-only by new (dense [n], source [n]) pairs, which must be its next
    indices n0..n0+n-1 (any order) for source ids it lacks; written to the map's file when
    anything is new. Raises ValueError naming the gap or the clash."""
    if len(dense) == 0:
        return current
    order = np.argsort(dense, kind="stable")
    dense, source = np.asarray(dense)[order], pd.Series(source).iloc[order].reset_index(drop=True)
    path = id_map_path(paths, current.key)
    expected = np.arange(len(current.source), len(current.source) + len(dense))
    if not np.array_equal(dense, expected):
        missing = sorted(set(expected.tolist()) - set(dense.tolist()))[:10]
        raise ValueError(f"{path}: the stream's new {current.key} values must continue 0..{len(current.source) - 1} "
                         f"without gaps; missing {missing}")  # fmt: skip
    known = pd.Index(current.source).get_indexer(source) >= 0
    if known.any():
        raise ValueError(f"{path}: source id {source[known].iloc[0]!r} already has a dense index, yet the stream gave it "
                         f"{int(dense[known][0])}")  # fmt: skip
    grown = pd.concat([current.source, source.astype(current.source.dtype)], ignore_index=True)
    write_parquet(id_map(current.key, np.arange(len(grown)), grown), path)
    return IdMap(current.key, grown)


def load_id_maps(paths: RunPaths) -> tuple[IdMap, IdMap]:
    """The run's user and item maps."""
    return IdMap.load(paths, USER_KEY), IdMap.load(paths, ITEM_KEY)
