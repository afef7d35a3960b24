"""Stages that span modules: materialize a run, train and evaluate variants, serve a run."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import pandas as pd

from loopfm.core.children import worker_pool_start
from loopfm.core.config import VARIANTS, RunConfig, variant_named
from loopfm.core.engine import LOCAL, Engine
from loopfm.core.files import remove_staged
from loopfm.core.rundir import RunPaths


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
    from loopfm.fm.log import log_embeddings
    from loopfm.fm.train import train_fm

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


def materialize(run_dir: Path, redis_url: str, registry: Path | None = None) -> None:
    """`feast apply` + `feast materialize` over the whole world's time span (the registry
    written: loopfm.features.store.registry_path)."""
    from loopfm.features.store import apply_and_materialize

    w = RunConfig.load(run_dir).world
    start = pd.Timestamp(w.start_date, tz="UTC")
    window = (start - pd.Timedelta(days=2), start + pd.Timedelta(days=w.n_days + 1))
    apply_and_materialize(run_dir, redis_url, *window, registry=registry)


def train_variants(run_dir: Path, variants: list[str], log=print, jobs: int | None = None) -> dict[str, dict]:
    """Train each variant through its feature service, then write the quality table and plot.

    `jobs` (default: one per core this process may use, at most one per variant) processes
    train variants side by side, each on one PyTorch thread, the LoopFM variants (the longest)
    first: a LoopFM epoch on one thread beside a second variant is only a little slower than on
    two threads alone, so two at once train faster than one after the other (docs/training.md,
    "Cost on the demo world, and the batch size")."""
    from loopfm.eval.metrics import markdown_table
    from loopfm.eval.plots import plot_quality
    from loopfm.eval.results import evaluate

    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    variants = list(dict.fromkeys(variants))  # a variant named twice would train twice into one folder
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, jobs or min(len(variants), cores))
    if jobs == 1:
        infos = {v: _train_one(run_dir, v, None, log) for v in variants}
    else:
        longest_first = sorted(variants, key=lambda v: (not variant_named(v).fm_history, not variant_named(v).kd))
        # spawn: no forked torch thread pools; a worker dies with this process, even when it is
        # killed by SIGKILL, and holds the run's lock until it exits (loopfm.core.children)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), **worker_pool_start()) as pool:
            futures = {v: pool.submit(_train_one, run_dir, v, 1) for v in longest_first}
            try:
                infos = {v: futures[v].result() for v in variants}
            except BaseException:  # a failed variant (or Ctrl-C): do not start the others
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    for v, info in infos.items():
        log(f"  vm {v}: {info['train_rows']} train / {info['eval_rows']} eval rows, {info['seconds']:.1f} s")
    rows = evaluate(paths, cfg)
    plot_quality(rows, paths.results / "quality.png")
    log(markdown_table(rows, "Held-out window (target vertical)"))
    return rows


def _train_one(run_dir: Path, variant: str, threads: int | None, log=None) -> dict:
    """One variant's train_variant (in a worker process of train_variants, or in this one);
    `threads`: PyTorch intra-op threads (None: leave as is); `log` defaults to a flushed print,
    so a worker's progress lines come out as they happen even into a pipe."""
    import torch

    from loopfm.features.store import open_store
    from loopfm.vm.train import train_variant

    if threads:
        torch.set_num_threads(threads)
    log = log or functools.partial(print, flush=True)
    return train_variant(RunPaths(run_dir), RunConfig.load(run_dir), open_store(run_dir), variant, log=log)


def served_model_dir(run_dir: Path, variant: str) -> Path:
    """The folder of the run's exported `variant` (model.json, model.onnx), the server's
    input; FileNotFoundError naming `loopfm vm export` if it is missing, FormatError if it is
    of another format version than this loopfm serves."""
    from loopfm.contract.version import check_format

    model_dir = RunPaths(run_dir).vm / variant / "onnx"
    export = f"loopfm vm export --variant {variant} --run-dir {run_dir}"
    for name in ("model.json", "model.onnx"):
        if not (model_dir / name).exists():
            raise FileNotFoundError(f"{model_dir / name} not found: run `{export}`")
    meta = json.loads((model_dir / "model.json").read_text())
    check_format(meta, model_dir / "model.json", f"re-export it with `{export}` (after `loopfm vm train` for a model.pt of another version)")
    return model_dir


def clear_built_stages(run_dir: Path, log=print) -> list[str]:
    """Remove what the run built on its data (the FM, the feature tables, the Feast registry,
    the VMs, the results) and the live loop's rows of it (stream/: events of the old data set,
    under its ids), before new data replaces it: every later stage would read them as built
    on the new data. Says so through `log`; returns the names of those removed."""
    from loopfm.data import streamed
    from loopfm.features.store import registry_path

    paths = RunPaths(run_dir)
    registry = registry_path(run_dir)
    built = [paths.fm, paths.features, paths.vm, paths.results, streamed.root(paths)]
    if registry.is_relative_to(run_dir.resolve()):  # one outside the run (LOOPFM_REGISTRY) may serve others
        built.append(registry)
    removed = []
    for path in built:
        if path.is_symlink() or path.is_dir():  # a staged folder (its versions and link) or a plain one
            remove_staged(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    if removed:
        log(f"  removed {', '.join(removed)} from {run_dir}: built on (or streamed into) the data being replaced; run "
            "those stages again")  # fmt: skip
    return removed


@contextlib.contextmanager
def running_server(
    run_dir: Path, variant: str, url: str | None, redis_url: str | None, port: int | None = None, workers: int = 1
) -> Iterator[str]:
    """Yield `url` if given; otherwise serve the run's exported variant on loopback with
    `workers` processes, their output on this process's. Without a Redis URL a local Valkey
    is started and the run materialized into it first, with a Feast registry of its own in a
    temporary folder: the run is only read (it may be mounted read-only)."""
    if url:
        yield url
        return
    from loopfm.pipeline.services import redis_url_or_local, start_server, stop_server

    model_dir = served_model_dir(run_dir, variant)
    with redis_url_or_local(redis_url) as store_url:
        if not redis_url:
            print(f"started a local Redis-protocol server at {store_url}; materializing the run into it")
            with tempfile.TemporaryDirectory(prefix="loopfm-serve-") as scratch:  # this store's registry: the run is only read
                materialize(run_dir, store_url, registry=Path(scratch) / "registry.db")
        proc, base = start_server(model_dir, store_url, None, port=port, workers=workers)
        try:
            yield base
        finally:
            stop_server(proc)
