"""Stages that span modules: materialize a run, train and evaluate variants, serve a run."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import pandas as pd

from loopfm.config import VARIANTS, RunConfig
from loopfm.engine import LOCAL, Engine
from loopfm.io import RunPaths


@contextlib.contextmanager
def stage(n: int, total: int, title: str):
    print(f"[{n}/{total}] {title} ...", flush=True)
    started = time.perf_counter()
    yield
    print(f"[{n}/{total}] {title}: done in {time.perf_counter() - started:.1f} s", flush=True)


def engine_named(name: str) -> Engine:
    """The engine an `--engine` flag names: local, or ray (Ray is imported only then)."""
    if name == "ray":
        from loopfm.distributed.ray_jobs import RAY

        return RAY
    return LOCAL


def train_stages(run_dir: Path, cfg: RunConfig, redis_url: str, first: int, total: int) -> dict[str, dict]:
    """From the canonical tables to the quality table, one stage after the other (numbered from
    `first`): FM, its log, structuring, Feast apply + materialize, the VM variants. Shared by
    `loopfm demo` (synthetic data) and `loopfm run` (imported data)."""
    from loopfm.features.build import build_feature_tables
    from loopfm.fm.stream import log_embeddings, train_fm

    paths = RunPaths(run_dir)
    with stage(first, total, "stream-train the FM day by day"):
        train_fm(paths, cfg)
    with stage(first + 1, total, f"log FM codes ({cfg.fm.checkpoint_scheme} checkpoint, int4 x {cfg.fm.code_dim})"):
        log_embeddings(paths, cfg)
    with stage(first + 2, total, "structure histories into Feast sources"):
        print(f"  {build_feature_tables(paths, cfg)}")
    with stage(first + 3, total, f"feast apply + materialize into {redis_url}"):
        materialize(run_dir, redis_url)
    with stage(first + 4, total, "train and evaluate the VM variants"):
        return train_variants(run_dir, list(VARIANTS))


def materialize(run_dir: Path, redis_url: str) -> None:
    """`feast apply` + `feast materialize` over the whole world's time span."""
    from loopfm.features.store import apply_and_materialize

    w = RunConfig.load(run_dir).world
    start = pd.Timestamp(w.start_date, tz="UTC")
    apply_and_materialize(run_dir, redis_url, start - pd.Timedelta(days=2), start + pd.Timedelta(days=w.n_days + 1))


def train_variants(run_dir: Path, variants: list[str], log=print) -> dict[str, dict]:
    """Train each variant through its feature service, then write the quality table and plot."""
    from loopfm.eval.metrics import markdown_table
    from loopfm.eval.plots import plot_quality
    from loopfm.features.store import open_store
    from loopfm.eval.results import evaluate
    from loopfm.vm.train import train_variant

    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    store = open_store(run_dir)
    for variant in variants:
        info = train_variant(paths, cfg, store, variant, log=log)
        log(f"  vm {variant}: {info['train_rows']} train / {info['eval_rows']} eval rows, {info['seconds']:.1f} s")
    rows = evaluate(paths, cfg)
    plot_quality(rows, paths.results / "quality.png")
    log(markdown_table(rows, "Held-out window (target vertical)"))
    return rows


@contextlib.contextmanager
def running_server(
    run_dir: Path, variant: str, url: str | None, redis_url: str | None, port: int | None = None, workers: int = 1
) -> Iterator[str]:
    """Yield `url` if given; otherwise serve the run's exported variant on loopback with
    `workers` processes. Without a Redis URL a local Valkey is started and the run
    materialized into it first."""
    if url:
        yield url
        return
    from loopfm.redis_server import redis_url_or_local
    from loopfm.server_process import start_server, stop_server

    model_dir = RunPaths(run_dir).vm / variant / "onnx"
    if not (model_dir / "model.onnx").exists():
        raise FileNotFoundError(f"{model_dir / 'model.onnx'} not found: run `loopfm vm export --variant {variant}`")
    with redis_url_or_local(redis_url) as store_url:
        if not redis_url:
            from loopfm.io import run_dir_lock

            print(f"started a local Redis-protocol server at {store_url}; materializing the run into it")
            with run_dir_lock(run_dir, "loopfm serve (feast apply + materialize)"):  # rewrites registry.db
                materialize(run_dir, store_url)
        proc, base = start_server(model_dir, store_url, RunPaths(run_dir).root / "server.log", port=port, workers=workers)
        try:
            yield base
        finally:
            stop_server(proc)
