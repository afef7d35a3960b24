"""`loopfm demo`: every stage end to end on the embedded defaults, in one run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np

from loopfm.config import RunConfig
from loopfm.contract.names import ITEM_KEY
from loopfm.data.ids import IdMap
from loopfm.io import RunPaths, read_parquet, write_text
from loopfm.pipeline.stages import stage

SERVED_VARIANT = "loopfm_kd"


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


def run_demo(run_dir: Path, cfg: RunConfig, requests: int = 300) -> dict:
    from loopfm.data.synth import write_world
    from loopfm.features.store import open_store
    from loopfm.pipeline.stages import train_stages
    from loopfm.redis_server import redis_url_or_local
    from loopfm.server_process import start_server, stop_server
    from loopfm.vm.export import export_variant

    started = time.perf_counter()
    paths, total = RunPaths(run_dir), 8
    cfg.save(run_dir)
    with stage(1, total, "synthesize the world"):
        print(f"  {write_world(cfg.world, paths)}")
    with redis_url_or_local() as redis_url:
        quality = train_stages(run_dir, cfg, redis_url, first=2, total=total)
        with stage(7, total, f"export {SERVED_VARIANT} to ONNX"):
            meta = export_variant(paths, cfg, open_store(run_dir), SERVED_VARIANT)
            print(f"  {meta['model_version']}: parity on {meta['parity']['requests']} requests and {meta['parity']['candidates']} candidates, "
                  f"max |ONNX - torch| = {meta['parity']['max_abs_diff']:.2e}")  # fmt: skip
        with stage(8, total, f"serve and send {requests} requests over HTTP"):
            proc, base_url = start_server(paths.vm / SERVED_VARIANT / "onnx", redis_url, paths.root / "server.log")
            try:
                latency = latency_sample(base_url, paths, cfg, requests)
            finally:
                stop_server(proc)
    summary = {
        "wall_time_s": time.perf_counter() - started,
        "world": {"users": cfg.world.n_users, "days": cfg.world.n_days, "verticals": list(cfg.world.verticals)},
        "quality": quality,
        "latency": latency,
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
