"""`loopfm demo`: every stage end to end on the embedded defaults, in one run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np

from loopfm.contract.names import ITEM_KEY
from loopfm.core.config import SERVED_VARIANT, RunConfig
from loopfm.core.files import read_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.data.ids import IdMap
from loopfm.pipeline.stages import clear_built_stages, stage


def new_world(run_dir: Path, cfg: RunConfig) -> dict[str, int]:
    """The demo's first stage: the world simulated anew into `run_dir`, after removing what an
    earlier demo there built on its world (clear_built_stages), the live burst's streamed events
    above all: read with the new world, they are impressions it has no truth for. Row counts."""
    from loopfm.data.synth import write_world

    clear_built_stages(run_dir)
    return write_world(cfg.world, RunPaths(run_dir))


def latency_sample(base_url: str, paths: RunPaths, cfg: RunConfig, requests: int, candidates: int = 100) -> dict:
    """Closed-loop sample over real HTTP: known users from the eval window plus 10% unknown users."""
    rng = np.random.default_rng(0)
    users = read_parquet(paths.features / "vm_eval_entities.parquet", columns=["user_id"])["user_id"].unique()
    items = read_parquet(paths.table("items"))
    pool = IdMap.load(paths, ITEM_KEY).to_source(items.loc[items["vertical"] == cfg.vm.target_vertical, ITEM_KEY])
    latencies, unknown_users = [], 0
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for i in range(requests):
            unknown = rng.random() < 0.1
            user = int(cfg.world.n_users + i) if unknown else int(rng.choice(users))
            body = {
                "user_id": user,
                "candidate_item_ids": rng.choice(pool, candidates, replace=False).tolist(),
                "context": {"hour": int(rng.integers(0, 24))},
            }
            started = time.perf_counter()
            r = client.post("/score", json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            r.raise_for_status()
            payload = r.json()
            assert len(payload["scores"]) == candidates
            unknown_users += not payload["user_known"]
    ms = np.asarray(latencies[min(20, requests // 10) :])  # drop warm-up requests
    return {
        "requests": requests,
        "candidates_per_request": candidates,
        "unknown_users_answered": unknown_users,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "note": "closed loop, one connection, client on the same 2-core machine: the tail is a lower bound",
        "example_request": body,
        "example_response": payload,
    }


def live_burst(paths: RunPaths, cfg: RunConfig, redis_url: str, base_url: str, events: int = 3000, rate: float = 1000.0) -> dict:
    """The loop live beside the server: a `loopfm stream` worker applies a burst of `events`
    impressions sent open loop at `rate` a second (loopfm/stream/openloop.py measures freshness,
    XADD to visible), among them clicks of a brand-new user on a brand-new item of the target
    vertical; then /score answers for that user from the fresh history."""
    from loopfm.contract.names import PROJECT
    from loopfm.data.ids import load_id_maps
    from loopfm.features.store import sync_client
    from loopfm.stream.keys import StreamKeys
    from loopfm.stream.openloop import send
    from loopfm.stream.worker import start_worker_process, wait_for_leases

    rng = np.random.default_rng(1)
    users, items = load_id_maps(paths)
    new_user, new_item = int(users.source.max()) + 1, int(items.source.max()) + 1
    known = users.source.to_numpy()
    catalog = items.source.to_numpy()
    first = int(read_parquet(paths.table("impressions"), columns=["impression_id"])["impression_id"].max()) + 1
    messages = [{"impression_id": first + j, "user_id": int(rng.choice(known)), "item_id": int(rng.choice(catalog)),
                 "vertical": str(rng.choice(cfg.world.verticals)), "label": int(rng.random() < 0.1)} for j in range(events)]  # fmt: skip
    for j in np.linspace(0, events - 1, 5).astype(int):  # the new user clicks five times, first on the new item
        messages[j] |= {"user_id": new_user, "vertical": cfg.vm.target_vertical, "label": 1}
    messages[0]["item_id"] = new_item
    keys, client = StreamKeys(PROJECT, cfg.stream.partitions), sync_client(redis_url)
    worker = start_worker_process(paths.root, redis_url, "demo", paths.root / "stream.log")
    try:
        wait_for_leases(client, keys, ["demo"], [worker])
        report = send(redis_url, cfg.stream.partitions, cfg.stream.max_len, messages, rate, wait_s=30.0)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.close()
    candidates = [new_item, *rng.choice(catalog, 9, replace=False).tolist()]
    body = {"user_id": new_user, "candidate_item_ids": candidates, "context": {"hour": 12}}
    answer = httpx.post(f"{base_url}/score", json=body, timeout=10).json()
    fresh = np.asarray(report["freshness_ms"])
    return {"events": report["sent"], "offered_eps": report["sent"] / report["schedule_s"],
            "freshness_p50_ms": float(np.percentile(fresh, 50)), "freshness_p99_ms": float(np.percentile(fresh, 99)),
            "samples": int(fresh.size), "new_user": new_user, "new_item": new_item, "score_request": body,
            "score_response": answer}  # fmt: skip


def run_demo(run_dir: Path, cfg: RunConfig, requests: int = 300) -> dict:
    from loopfm.features.store import open_store
    from loopfm.pipeline.services import redis_url_or_local, start_server, stop_server
    from loopfm.pipeline.stages import train_stages
    from loopfm.vm.export import export_variant

    started = time.perf_counter()
    paths, total = RunPaths(run_dir), 9
    cfg.save(run_dir)
    with stage(1, total, "synthesize the world"):
        print(f"  {new_world(run_dir, cfg)}")
    with redis_url_or_local() as redis_url:
        quality = train_stages(run_dir, cfg, redis_url, first=2, total=total)
        with stage(7, total, f"export {SERVED_VARIANT} to ONNX"):
            meta = export_variant(paths, cfg, open_store(run_dir), SERVED_VARIANT)
            print(f"  {meta['model_version']}: parity on {meta['parity']['requests']} requests and {meta['parity']['candidates']} candidates, "
                  f"max |ONNX - torch| = {meta['parity']['max_abs_diff']:.2e}")  # fmt: skip
        proc, base_url = start_server(paths.vm / SERVED_VARIANT / "onnx", redis_url, paths.root / "server.log")
        try:
            with stage(8, total, f"serve and send {requests} requests over HTTP"):
                latency = latency_sample(base_url, paths, cfg, requests)
            with stage(9, total, "the live loop: a stream worker applies a burst of events while the server answers"):
                live = live_burst(paths, cfg, redis_url, base_url)
                print(f"  {live['events']} events at {live['offered_eps']:.0f}/s: freshness (XADD -> visible) p50 "
                      f"{live['freshness_p50_ms']:.0f} ms, p99 {live['freshness_p99_ms']:.0f} ms ({live['samples']} samples)")
                print(f"  new user {live['new_user']}: /score user_known={live['score_response']['user_known']}, "
                      f"new item {live['new_item']} scored {live['score_response']['scores'][0]:.4f}")  # fmt: skip
        finally:
            stop_server(proc)
    summary = {
        "wall_time_s": time.perf_counter() - started,
        "world": {"users": cfg.world.n_users, "days": cfg.world.n_days, "verticals": list(cfg.world.verticals)},
        "quality": quality,
        "latency": latency,
        "live_loop": live,
        "model_version": meta["model_version"],
    }
    write_text(paths.results / "demo_summary.json", json.dumps(summary, indent=2))
    print((paths.results / "quality.md").read_text())
    print(f"latency over HTTP, {latency['candidates_per_request']} candidates: p50 {latency['p50_ms']:.2f} ms, "
          f"p90 {latency['p90_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms ({latency['note']})")  # fmt: skip
    print(f"demo finished in {summary['wall_time_s']:.0f} s; artifacts in {paths.root}/")
    print(f"serve it: loopfm serve --run-dir {run_dir}   then:")
    example = json.dumps({**latency["example_request"], "candidate_item_ids": latency["example_request"]["candidate_item_ids"][:3]})
    print(f"  curl -s localhost:8000/score -H 'content-type: application/json' -d '{example}'")
    return summary
