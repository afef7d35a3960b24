"""`loopfm run`: import data a user has on disk, then every training stage on it: FM stream
training, logging, structuring, Feast apply + materialize, the VM variants and their table.
The same stage functions as `loopfm demo`; only the first stage differs."""

from __future__ import annotations

import time
from pathlib import Path

from loopfm.config import VARIANTS, RunConfig
from loopfm.data.importers import ImportOptions, configure, import_data, write_imported
from loopfm.demo import stage
from loopfm.io import RunPaths


def import_run(run_dir: Path, cfg: RunConfig, data: Path, opts: ImportOptions, explicit: set[str]) -> RunConfig:
    """Check and convert everything, then write `data/` and `config.json` (nothing on failure)."""
    imported = import_data(data, opts)
    cfg = configure(cfg, imported, explicit)
    write_imported(run_dir, imported, cfg)
    n = {name: len(df) for name, df in imported.tables.items() if name in ("users", "items", "impressions")}
    target = int((imported.tables["impressions"]["vertical"] == cfg.vm.target_vertical).sum())
    s = imported.span
    print(f"  {n}; vertical {opts.rule}: {target} impressions; {s.n_days} days from {s.start_date}; "
          f"FM warm-up {cfg.fm.warmup_days} days, held-out window {cfg.vm.eval_days} days")  # fmt: skip
    return cfg


def run_on_data(run_dir: Path, cfg: RunConfig, data: Path, opts: ImportOptions, explicit: set[str]) -> dict:
    from loopfm.features.build import build_feature_tables
    from loopfm.fm.stream import log_embeddings, train_fm
    from loopfm.pipeline import materialize, train_variants
    from loopfm.redis_server import redis_url_or_local

    started, paths, total = time.perf_counter(), RunPaths(run_dir), 6
    with stage(1, total, f"import {data} ({opts.fmt})"):
        cfg = import_run(run_dir, cfg, data, opts, explicit)
    with stage(2, total, "stream-train the FM day by day"):
        train_fm(paths, cfg)
    with stage(3, total, f"log FM codes ({cfg.fm.checkpoint_scheme} checkpoint, int4 x {cfg.fm.code_dim})"):
        log_embeddings(paths, cfg)
    with stage(4, total, "structure histories into Feast sources"):
        print(f"  {build_feature_tables(paths, cfg)}")
    with redis_url_or_local() as redis_url:
        with stage(5, total, f"feast apply + materialize into {redis_url}"):
            materialize(run_dir, redis_url)
    with stage(6, total, "train and evaluate the VM variants"):
        rows = train_variants(run_dir, list(VARIANTS))
    print(f"finished in {time.perf_counter() - started:.0f} s; table in {paths.results / 'quality.md'}")
    return rows
