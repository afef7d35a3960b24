"""Run an experiment plan: worlds (synth or import -> FM -> log -> structure -> feast apply),
then VM cells trained on one Feast retrieval per world, then ONNX latency of the timed cells.
The same runner serves the synthetic experiments and data on disk (a world's `data` names a
`plan.Source`).

Resumable: every stage leaves a marker or its output file in its own directory under
`out/seed<N>/`, and a finished stage or cell is never redone. Work is split into jobs, one
per (seed, FM) — everything that shares an FM's checkpoints — run by `jobs` processes.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from loopfm.core.children import worker_pool_start
from loopfm.core.config import RunConfig, variant_named
from loopfm.eval.results import reference_predictions
from loopfm.experiments.plan import Cell, Overrides, Source, World, cells_of
from loopfm.core.files import read_parquet, remove_staged, write_parquet, write_text
from loopfm.core.rundir import RunPaths

CANDIDATES = (100, 1000)


class Progress:
    """Log lines stamped with the time since the whole run started (shared by the workers)."""

    def __init__(self, started: float):
        self.started = started

    def __call__(self, message: str) -> None:
        print(f"[{time.time() - self.started:7.1f} s] {message}", flush=True)


def with_overrides(cfg: RunConfig, *overrides: Overrides) -> RunConfig:
    """`cfg` with every (SECTION.KEY, value) of `overrides` applied in order, validated."""
    for key, value in (kv for o in overrides for kv in o):
        cfg.override(f"{key}={json.dumps(value)}")
    return cfg.validate()


def run_config(base: Overrides, seed: int, *overrides: Overrides) -> RunConfig:
    """Defaults <- the plan's base overrides <- world/cell overrides; the seed drives world,
    FM and VM alike, so seeds differ in everything that is random (on data on disk: the FM
    and the VM)."""
    return with_overrides(RunConfig(), base, *overrides, (("world.seed", seed), ("vm.seed", seed)))


def _atomic_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))


def _stage(directory: Path, name: str, log: Progress, what: str, fn) -> None:
    """Run fn once: skipped when directory/.name.done exists (a finished earlier run)."""
    marker = directory / f".{name}.done"
    if marker.exists():
        return
    started = time.perf_counter()
    fn()
    marker.touch()
    log(f"{what}: {name} done in {time.perf_counter() - started:.1f} s")


def _link(target: Path, link: Path) -> None:
    """`link` -> `target` (relative), unless `link` is there already; a link whose target was
    dropped (drop_checkpoints) is there: a resumed run left it dangling and does not make it again."""
    if not link.is_symlink() and not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))


def write_data(root: Path, world: World, base: Overrides, seed: int, sources: dict[str, Source]) -> None:
    """A root world's data and config.json: the synthetic world simulated, or a source imported
    (its span and sizes then configure the world, as `loopfm run` does; `base` keys stay as set)."""
    from loopfm.data.synth import write_world
    from loopfm.pipeline.run import import_run

    cfg = run_config(base, seed, *world.overrides)
    root.mkdir(parents=True, exist_ok=True)
    if world.data:
        source = sources[world.data]
        import_run(root, cfg, source.data, source.options(), {key for key, _ in base})
    else:
        write_world(cfg.world, RunPaths(root))
        cfg.save(root)


def prepare_world(seed_dir: Path, world: World, base: Overrides, seed: int, redis_url: str, log: Progress,
                  sources: dict[str, Source]) -> None:  # fmt: skip
    """Write the data and train the FM (root worlds only), then log, structure and `feast apply`."""
    from loopfm.features.build import build_feature_tables
    from loopfm.features.store import feast_cli
    from loopfm.fm.log import log_embeddings
    from loopfm.fm.train import train_fm

    root, wdir = seed_dir / world.root.path, seed_dir / world.path
    what = f"seed {seed} {world.path}"
    if not (wdir / ".world.done").exists() and not (root / "fm" / "checkpoints").exists():
        (root / ".fm.done").unlink(missing_ok=True)  # its checkpoints were dropped (drop_checkpoints): train again
    _stage(root, "data", log, what, lambda: write_data(root, world.root, base, seed, sources))
    _stage(root, "fm", log, what, lambda: train_fm(RunPaths(root), RunConfig.load(root), progress=False))
    if world.log:
        _link(root / "data", wdir / "data")
        _link(root / "fm" / "checkpoints", wdir / "fm" / "checkpoints")
    paths = RunPaths(wdir)

    def structure() -> None:
        cfg = with_overrides(RunConfig.load(root), world.log)
        cfg.save(wdir)
        log_embeddings(paths, cfg, progress=False)
        build_feature_tables(paths, cfg, progress=lambda _: None)
        feast_cli(["apply"], wdir, redis_url)
        _write_world_summary(paths, cfg)

    _stage(wdir, "world", log, what, structure)


def drop_checkpoints(root: Path) -> None:
    """Remove a root world's FM checkpoints once every world of its job is logged: one per
    streamed day, each the size of the FM (a long data set's would fill the disk)."""
    remove_staged(root / "fm" / "checkpoints")


def _write_world_summary(paths: RunPaths, cfg: RunConfig) -> None:
    """Eval labels, the FM's own predictions (and the true p when known), and the measured
    online value size of the FM history: the newest snapshot per user is what Redis holds."""
    entities = read_parquet(paths.features / "vm_eval_entities.parquet")
    train_entities = read_parquet(paths.features / "vm_train_entities.parquet")
    eval_frame = pd.DataFrame({"impression_id": entities["impression_id"], "label": entities["label"],
                               **reference_predictions(paths, cfg, entities, train_entities)})  # fmt: skip
    write_parquet(eval_frame, paths.root / "eval.parquet")
    history = read_parquet(paths.features / "fm_history.parquet", columns=["user_id", "event_timestamp", "fm_codes"])
    newest = history.sort_values("event_timestamp").groupby("user_id").tail(1)["fm_codes"].map(len)
    code_bytes = len(read_parquet(paths.fm_log, columns=["fm_code"])["fm_code"].iloc[0])
    _atomic_json(paths.root / "world.json", {
        "impressions": int(len(read_parquet(paths.table("impressions"), columns=["impression_id"]))),
        "train_rows": int(len(read_parquet(paths.features / "vm_train_entities.parquet", columns=["label"]))),
        "eval_rows": int(len(entities)),
        "history_length": cfg.vm.history_length,
        "users_with_fm_history": int(len(newest)),
        "code_bytes": code_bytes,  # one logged code, as stored
        "fm_history_bytes_full": cfg.vm.history_length * code_bytes,  # a user with >= L codes
        "fm_history_bytes_mean": float(newest.mean()),  # the newest stored value, mean over users
        "fm_history_bytes_max": int(newest.max()),
    })  # fmt: skip


def _cell_done(cdir: Path, cell: Cell) -> bool:
    """A cell is finished when its result.json exists and, if a timed experiment needs it, its
    ONNX model too: a cell first trained for an untimed experiment (main) is trained again
    (same seed, same result) when a later run adds one that times it (encoder)."""
    return (cdir / "result.json").exists() and (not cell.latency or (cdir / "model.onnx").exists())


def train_cell(seed_dir: Path, cell: Cell, cfg: RunConfig, frames: tuple[pd.DataFrame, pd.DataFrame], log: Progress) -> None:
    """Train one VM on the world's frames; write its eval predictions, then result.json last."""
    import torch

    from loopfm.data.vocab import Vocab
    from loopfm.eval.metrics import quality
    from loopfm.vm.export import onnx_bytes
    from loopfm.vm.train import fit_variant, frame_tensors, tensor_spec, variant_frame

    cdir = seed_dir / cell.path
    if _cell_done(cdir, cell):
        return
    cdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_df, eval_df = (variant_frame(df, variant_named(cell.variant)) for df in frames)
    spec = tensor_spec(cfg, Vocab.load(RunPaths(seed_dir / cell.world.path)))
    model, p, fit = fit_variant(cfg, spec, cell.variant, train_df, eval_df, log=lambda _: None)
    np.save(cdir / "pred.npy", p.astype(np.float32))
    if cell.latency:
        tensors = frame_tensors(eval_df, spec)
        (cdir / "model.onnx").write_bytes(onnx_bytes(model, tensors))
        user = int(tensors["fm_mask"].sum(1).argmax()) if "fm_mask" in tensors else 0  # a full history
        request = {k: v[user : user + 1] for k, v in tensors.items() if k not in ("candidates", "candidate_user")}
        candidates = np.resize(tensors["candidates"], (max(CANDIDATES), tensors["candidates"].shape[1]))  # repeats rows if few
        np.savez(cdir / "request.npz", candidates=candidates, **request)
    q = quality(eval_df["label"].to_numpy(), p)
    seconds = time.perf_counter() - started
    _atomic_json(cdir / "result.json", {"quality": q, "seconds": seconds, "training": fit, "config": asdict(cfg), "threads": torch.get_num_threads()})
    log(f"seed {cfg.world.seed} {cell.path}: AUC {q['auc']:.4f} NE {q['ne']:.4f} ({seconds:.0f} s)")


def run_job(out: str, seed: int, worlds: list[World], cells: list[Cell], base: Overrides, redis_url: str,
            started: float, threads: int, sources: dict[str, Source]) -> None:  # fmt: skip
    """Everything that shares one (seed, FM): its worlds in order, each world's cells on one
    Feast retrieval (service vm_loopfm_kd, a superset of every variant's features)."""
    import torch

    from loopfm.features.store import historical_features, open_store

    torch.set_num_threads(threads)
    log = Progress(started)
    seed_dir = Path(out) / f"seed{seed}"
    for world in worlds:
        prepare_world(seed_dir, world, base, seed, redis_url, log, sources)
        todo = [c for c in cells if c.world == world and not _cell_done(seed_dir / c.path, c)]
        if not todo:
            continue
        t0 = time.perf_counter()
        paths = RunPaths(seed_dir / world.path)
        store = open_store(paths.root, redis_url)
        frames = tuple(
            historical_features(store, read_parquet(paths.features / f"vm_{part}_entities.parquet"), "vm_loopfm_kd")
            for part in ("train", "eval")
        )
        log(f"seed {seed} {world.path}: Feast get_historical_features in {time.perf_counter() - t0:.1f} s")
        for cell in todo:
            train_cell(seed_dir, cell, with_overrides(RunConfig.load(paths.root), cell.vm), frames, log)
    drop_checkpoints(seed_dir / worlds[0].root.path)  # every world of a job shares one FM


def measure_latency(seed_dir: Path, cell: Cell, repeats: int = 200) -> dict:
    """ONNX Runtime (one thread) scoring one user with a full history against 100 and 1,000
    candidates, as the server calls it; p50/p99 over `repeats` runs after a warm-up."""
    import onnxruntime as ort

    cdir = seed_dir / cell.path
    cached = cdir / "latency.json"
    if cached.exists():
        return json.loads(cached.read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(cdir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    request = dict(np.load(cdir / "request.npz"))
    names = {i.name for i in session.get_inputs()}
    result = {}
    for n in CANDIDATES:
        feeds = {k: v for k, v in {**request, "candidates": request["candidates"][:n]}.items() if k in names}
        for _ in range(20):
            session.run(None, feeds)
        ms = []
        for _ in range(repeats):
            t = time.perf_counter()
            session.run(None, feeds)
            ms.append((time.perf_counter() - t) * 1000)
        result[str(n)] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    _atomic_json(cached, result)
    return result


def run_plan(out: Path, experiments: list, seeds: int, base: Overrides, jobs: int, log: Progress,
             sources: dict[str, Source] | None = None) -> None:  # fmt: skip
    """All worlds and cells of `experiments` for seeds 0..seeds-1 (worlds of data on disk read
    `sources`), then the latency of timed cells."""
    from loopfm.pipeline.services import local_redis

    cells = cells_of(experiments)
    worlds = list(dict.fromkeys(c.world for c in cells))
    by_fm: dict[World, list[World]] = {}
    for w in sorted(worlds, key=lambda w: len(w.log)):  # a root world before its derived worlds
        by_fm.setdefault(w.root, []).append(w)
    units = [(seed, ws) for ws in by_fm.values() for seed in range(seeds)]
    # seed by seed (a report over the first seeds can be made while later ones run), in each the
    # longest jobs first: bench world, then most worlds
    units.sort(key=lambda u: (u[0], bool(u[1][0].scale), -len(u[1])))
    log(f"{len(cells)} cells in {len(worlds)} worlds x {seeds} seeds; {len(units)} jobs on {jobs} process(es)")
    threads = 1 if jobs > 1 else max(1, os.cpu_count() or 1)
    # feast apply talks to the online store; a private Valkey keeps any other Redis untouched.
    with local_redis() as redis_url:
        args = [(str(out), s, ws, cells, base, redis_url, log.started, threads, sources or {}) for s, ws in units]
        if jobs == 1:
            for a in args:
                run_job(*a)
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), **worker_pool_start()) as pool:  # none outlives this process
                for future in [pool.submit(run_job, *a) for a in args]:
                    future.result()
    timed = [c for c in cells if c.latency]
    for seed in range(seeds):
        for cell in timed:
            measure_latency(out / f"seed{seed}", cell)
    log(f"latency measured for {len(timed)} cells x {seeds} seeds")
