"""Vocabulary sizes of a run's canonical tables, written beside them as `data/vocab.json`.

Whoever writes the tables (the synthetic world or an importer) writes this file too, so the
FM and the VM size their embedding tables from the data they will read, whatever produced it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loopfm.config import ConfigError, RunConfig, WorldConfig
from loopfm.io import RunPaths, write_parquet, write_text


def replace_data(run_dir: Path, tables: dict[str, pd.DataFrame], vocab: "Vocab") -> None:
    """Write `tables` and vocab.json into a fresh folder, then swap it for the run's `data/`: a
    writer that fails or is killed leaves the old tables whole, never some of the new ones
    beside some of the old."""
    paths = RunPaths(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = RunPaths(Path(tempfile.mkdtemp(prefix=".data.", dir=run_dir)))  # a unique name per writer
    try:
        for name, df in tables.items():
            write_parquet(df, staging.table(name))
        vocab.save(staging)
        if paths.data.exists():
            paths.data.rename(staging.root / "data.old")
        staging.data.rename(paths.data)
    finally:
        shutil.rmtree(staging.root, ignore_errors=True)


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


def check_vm_windows(impressions: pd.DataFrame, cfg: RunConfig, fix: str) -> None:
    """Raise ConfigError, naming the window, its days and `fix` (the settings to change),
    unless the VM's vertical (vm.target_vertical) has clicks and non-clicks among
    `impressions` in its training window (days fm.warmup_days to world.n_days - vm.eval_days,
    from world.start_date) and in its held-out window (the last vm.eval_days days): a VM
    cannot be trained or evaluated on one class."""
    start = pd.Timestamp(cfg.world.start_date, tz="UTC")
    day = ((impressions["event_timestamp"] - start) // pd.Timedelta(days=1)).to_numpy()
    target = (impressions["vertical"] == cfg.vm.target_vertical).to_numpy()
    eval_start = cfg.world.n_days - cfg.vm.eval_days
    windows = {"training": (cfg.fm.warmup_days, eval_start), "held-out": (eval_start, cfg.world.n_days)}
    for name, (lo, hi) in windows.items():
        labels = impressions["label"].to_numpy()[target & (day >= lo) & (day < hi)]
        if len(np.unique(labels)) < 2:
            raise ConfigError(f"the VM's vertical has {labels.size} impressions ({int(labels.sum())} clicks) in its {name} "
                              f"window (days {lo} to {hi - 1} of {cfg.world.n_days}): it needs clicks and non-clicks there; "
                              f"{fix}")  # fmt: skip
