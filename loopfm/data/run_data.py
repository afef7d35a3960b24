"""The run's `data/` folder written whole: the canonical tables and their vocab.json."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd

from loopfm.core.files import write_parquet
from loopfm.core.rundir import RunPaths
from loopfm.data.vocab import Vocab


def replace_data(run_dir: Path, tables: dict[str, pd.DataFrame], vocab: Vocab) -> None:
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
