"""Vocabulary sizes of a run's canonical tables, written beside them as `data/vocab.json`.

Whoever writes the tables (the synthetic world or an importer) writes this file too, so the
FM and the VM size their embedding tables from the data they will read, whatever produced it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pandas as pd

from loopfm.config import WorldConfig
from loopfm.io import RunPaths, write_text


@dataclass(frozen=True)
class Vocab:
    """Ids in the canonical tables are dense: 0 .. n-1."""

    n_users: int
    n_items: int
    n_categories: int
    n_brands: int

    @classmethod
    def from_world(cls, w: WorldConfig) -> "Vocab":
        return cls(w.n_users, w.n_items_per_vertical * len(w.verticals), w.n_categories, w.n_brands)

    @classmethod
    def from_tables(cls, users: pd.DataFrame, items: pd.DataFrame) -> "Vocab":
        def size(s: pd.Series) -> int:
            return int(s.max()) + 1 if len(s) else 1

        return cls(size(users["user_id"]), size(items["item_id"]), size(items["category"]), size(items["brand"]))

    def save(self, paths: RunPaths) -> None:
        paths.data.mkdir(parents=True, exist_ok=True)
        write_text(paths.data / "vocab.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, paths: RunPaths) -> "Vocab":
        path = paths.data / "vocab.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: write the data first (`loopfm data synth` or `loopfm data import`)")
        return cls(**json.loads(path.read_text()))
