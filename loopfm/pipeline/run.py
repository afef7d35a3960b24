"""`loopfm run`: import data a user has on disk, then every training stage on it (the same
stages as `loopfm demo`, see pipeline.train_stages); only the first stage differs."""

from __future__ import annotations

import time
from pathlib import Path

from loopfm.core.config import RunConfig
from loopfm.core.rundir import RunPaths
from loopfm.data.importers import ImportOptions, configure, import_data, write_imported
from loopfm.pipeline.stages import clear_built_stages, stage, train_stages


def import_run(run_dir: Path, cfg: RunConfig, data: Path, opts: ImportOptions, explicit: set[str]) -> RunConfig:
    """Check and convert everything, then remove the stages built on the run's old data
    (clear_built_stages, said on the console) and write `data/` and `config.json` (nothing
    written or removed on failure)."""
    imported = import_data(data, opts)
    cfg = configure(cfg, imported, explicit)
    clear_built_stages(run_dir)
    write_imported(run_dir, imported, cfg)
    n = {name: len(df) for name, df in imported.tables.items() if name in ("users", "items", "impressions")}
    target = int((imported.tables["impressions"]["vertical"] == cfg.vm.target_vertical).sum())
    s = imported.span
    print(f"  {n}; vertical {opts.rule}: {target} impressions; {s.n_days} days from {s.start_date}; "
          f"FM warm-up {cfg.fm.warmup_days} days, held-out window {cfg.vm.eval_days} days; {s.duplicates} repeated "
          "rows dropped (every column equal to an earlier row's)")  # fmt: skip
    return cfg


def run_on_data(run_dir: Path, cfg: RunConfig, data: Path, opts: ImportOptions, explicit: set[str]) -> dict:
    from loopfm.pipeline.services import redis_url_or_local

    started, total = time.perf_counter(), 6
    with stage(1, total, f"import {data} ({opts.fmt})"):
        cfg = import_run(run_dir, cfg, data, opts, explicit)
    with redis_url_or_local() as redis_url:
        rows = train_stages(run_dir, cfg, redis_url, first=2, total=total)
    print(f"finished in {time.perf_counter() - started:.0f} s; table in {RunPaths(run_dir).results / 'quality.md'}")
    return rows
