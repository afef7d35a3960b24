"""`loopfm bench serving` (make bench-serving): the four serving paths in one run.

(a) loopfm   /score over HTTP (uvicorn, uvloop, httptools, item cache, one Redis round trip)
(b) feast_sdk  a FastAPI handler calling FeatureStore.get_online_features + the same ONNX model
(c) floor    in-process: the same Scorer (Redis read + tensorize + ONNX), no HTTP
(d) noop     GET /healthz on loopfm's server stack

Every HTTP path is driven open loop at the same offered rate, latency measured from the
scheduled send time; each path is warmed up first. Then the issue's goals (200 req/s at 100
candidates, 50 req/s at 1,000) and a rate sweep for p99 <= 10 ms at 100 candidates.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
import redis.asyncio
import uvloop

from loopfm.config import RunConfig
from loopfm.io import RunPaths, read_parquet, write_text
from loopfm.bench.loadtest import LoadSpec, RequestPool, format_ms, request_bodies, run_load, sweep, timed, warm_up, write_report

CANDIDATES = (10, 100, 1000)
PATHS = ("loopfm", "feast_sdk", "floor", "noop")
TABLE_RATE = {10: 20.0, 100: 20.0, 1000: 5.0}  # low, so (a), (c), (d) show service time, not queueing
TABLE_SECONDS = 20.0
SWEEP_RATES = [100, 200, 300, 400, 600, 800, 1000, 1200, 1500]


def request_pool(run_dir: Path) -> RequestPool:
    paths, cfg = RunPaths(run_dir), RunConfig.load(run_dir)
    known = read_parquet(paths.features / "vm_eval_entities.parquet", columns=["user_id"])["user_id"].unique()
    items = read_parquet(paths.features / "item_features.parquet", columns=["item_id"])["item_id"].to_numpy()  # source ids
    return RequestPool(known_users=np.sort(known), all_users=cfg.world.n_users, items=items)


def floor_latency(scorer, redis_url: str, pool: RequestPool, candidates: int, n: int) -> dict:
    """The server's own Scorer, called in process on an event loop, one request at a time."""
    rng = np.random.default_rng(1)
    spec = LoadSpec(rate=1, duration_s=n, candidates=candidates)
    bodies = iter([json.loads(b) for b in request_bodies(spec, pool, n + 20, rng)])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        client = redis.asyncio.Redis.from_url(redis_url)

        def one() -> None:
            b = next(bodies)
            runner.run(scorer.score(client, b["user_id"], b["candidate_item_ids"], b["context"]["hour"]))

        result = timed(one, n=n, warmup=20)
        runner.run(client.aclose())
    return result


def run_serving_bench(run_dir: Path, variant: str, out_dir: Path, log=print) -> dict:
    from loopfm.pipeline.stages import materialize
    from loopfm.redis_server import redis_url_or_local
    from loopfm.server_process import start_server, stop_server
    from serving.item_cache import ItemCache
    from serving.scorer import Scorer

    model_dir = RunPaths(run_dir).vm / variant / "onnx"
    pool = request_pool(run_dir)
    results: dict = {p: {} for p in PATHS}
    started = time.perf_counter()
    with redis_url_or_local() as url:
        log(f"materializing {run_dir} into {url}")
        materialize(run_dir, url)
        logs = RunPaths(run_dir).root / "bench_logs"
        loopfm_proc, loopfm_url = start_server(model_dir, url, logs / "loopfm.log")
        sdk_proc, sdk_url = start_server(
            model_dir, url, logs / "feast_sdk.log", app="loopfm.bench.feast_sdk_app:create_app",
            env={"LOOPFM_RUN_DIR": str(run_dir.resolve())},
        )  # fmt: skip
        scorer = Scorer(model_dir, threads=1, item_cache=ItemCache(100_000, 300))
        try:
            for c in CANDIDATES:
                spec = LoadSpec(rate=TABLE_RATE[c], duration_s=TABLE_SECONDS, candidates=c)
                for name, base, body_pool, path in (
                    ("loopfm", loopfm_url, pool, "/score"),
                    ("feast_sdk", sdk_url, pool, "/score"),
                    ("noop", loopfm_url, None, "/healthz"),
                ):
                    warm_up(base, body_pool, path, candidates=c, rate=spec.rate)
                    report, _ = run_load(base, spec, body_pool, path)
                    results[name][c] = _row(report)
                    log(f"  {name:>9} {c:>5} candidates: p50 {format_ms(report['p50_ms'])}, p99 {format_ms(report['p99_ms'])}, "
                        f"errors {report['errors']}")  # fmt: skip
                floor = floor_latency(scorer, url, pool, c, n=300)
                results["floor"][c] = floor
                log(f"  {'floor':>9} {c:>5} candidates: p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms")
            stop_server(sdk_proc)

            goals = {}
            for c, rate in ((100, 200.0), (1000, 50.0)):
                spec = LoadSpec(rate=rate, duration_s=30.0, candidates=c)
                warm_up(loopfm_url, pool, candidates=c, rate=rate)
                report, records = run_load(loopfm_url, spec, pool)
                write_report(report, records, out_dir / "benchmarks" / f"goal_{c}",
                             f"loopfm /score, {c} candidates, {rate:.0f} req/s open loop")  # fmt: skip
                goals[f"{c}_candidates_at_{rate:.0f}_rps"] = _row(report) | {"p999_ms": report["p999_ms"]}
                log(f"  goal {c} candidates at {rate:.0f} req/s: p99 {format_ms(report['p99_ms'])}")
            sweep_result = sweep(loopfm_url, LoadSpec(rate=1, duration_s=10.0, candidates=100), pool, SWEEP_RATES, 10.0, log)
            scraped = _cache_hit_rate(loopfm_url)
        finally:
            stop_server(loopfm_proc)
            if sdk_proc.poll() is None:
                stop_server(sdk_proc)

    summary = {
        "serving": {p: {str(c): v for c, v in rows.items()} for p, rows in results.items()},
        "ratios": {
            str(c): {
                "loopfm_over_feast_sdk_p50": _ratio(results["loopfm"][c]["p50_ms"], results["feast_sdk"][c]["p50_ms"]),
                "loopfm_over_feast_sdk_p99": _ratio(results["loopfm"][c]["p99_ms"], results["feast_sdk"][c]["p99_ms"]),
                "loopfm_over_floor_plus_noop_p50": _ratio(
                    results["loopfm"][c]["p50_ms"], results["floor"][c]["p50_ms"] + (results["noop"][c]["p50_ms"] or 0)
                ),
            }
            for c in CANDIDATES
        },
        "goals": goals,
        "sweep_p99_le_10ms_100_candidates": {k: v for k, v in sweep_result.items() if k != "runs"}
        | {"runs": [_row(r) | {"offered": r["offered_rate"]} for r in sweep_result["runs"]]},
        "item_cache_hit_ratio": scraped,
        "table_rates": {str(c): r for c, r in TABLE_RATE.items()},
        "table_seconds": TABLE_SECONDS,
        "variant": variant,
        "model": _model_description(model_dir),
        "machine": {"cores": _cores(), "python": platform.python_version(), "platform": platform.platform()},
        "command": "make bench-serving",
        "seconds": time.perf_counter() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "benchmarks.json", json.dumps(summary, indent=2))
    return summary


def _row(report: dict) -> dict:
    keys = ("p50_ms", "p99_ms", "sent", "errors")
    return {"rate": report["achieved_rate"], **{k: report[k] for k in keys}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _model_description(model_dir: Path) -> str:
    meta = json.loads((model_dir / "model.json").read_text())
    return f"{meta['model_version']}, L = {meta['spec']['history_length']}, code dim {meta['spec']['code_dim']}"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _cache_hit_rate(url: str) -> float | None:
    import httpx

    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("loopfm_item_cache_hit_ratio"):
            return float(line.split()[-1])
    return None


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def markdown(summary: dict) -> str:
    s, r = summary["serving"], summary["ratios"]
    lines = [
        "# Serving benchmarks",
        "",
        f"Reproduce: `{summary['command']}` (writes this file and `benchmarks.json`). Machine: "
        f"{summary['machine']['cores']} cores, load generator on the same machine, loopback only. "
        f"Model {summary['model']}. One run; medians and ratios from it. Percentiles count every request, "
        "failures at the time they failed (a time-out at >= the 2 s client time-out).",
        "",
        "(a) and (c) read item features from the in-process item cache (the catalogue here has 1,200 items, so after "
        "warm-up nearly every candidate hits); (b) reads every candidate through the Feast SDK on each request, in a "
        "sync handler. So (a)/(b) measures the whole design (cache, one raw round trip, no SDK conversion), not Redis "
        "access alone.",
        "",
        "## The four paths, open loop at a low fixed rate",
        "",
        f"Rates: {', '.join(f'{c} candidates at {rate:.0f} req/s' for c, rate in summary['table_rates'].items())}, "
        f"{summary['table_seconds']:.0f} s each, after a warm-up; latency from the scheduled send time. "
        "(c) is in-process and sequential.",
        "",
        "| candidates | (a) loopfm p50 / p99 | (b) feast_sdk p50 / p99 | (c) floor p50 / p99 | (d) noop p50 / p99 "
        "| (a)/(b) p50 | (a)/(b) p99 | (a)/((c)+(d)) p50 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in map(str, CANDIDATES):
        cells = [f"{format_ms(s[p][c]['p50_ms'])} / {format_ms(s[p][c]['p99_ms'])}" for p in PATHS]
        errors = {p: s[p][c]["errors"] for p in PATHS if s[p][c].get("errors")}
        lines.append(
            f"| {c} | " + " | ".join(cells) + f" | {_x(r[c]['loopfm_over_feast_sdk_p50'])} "
            f"| {_x(r[c]['loopfm_over_feast_sdk_p99'])} | {_x(r[c]['loopfm_over_floor_plus_noop_p50'])} "
            f"| {errors or 'none'} |"
        )
    lines += ["", "## Goals (loopfm /score, open loop, Poisson arrivals, 30 s)", "",
              "| load | p50 | p99 | p99.9 | achieved rate | errors |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, g in summary["goals"].items():
        lines.append(f"| {name.replace('_', ' ')} | {format_ms(g['p50_ms'])} | {format_ms(g['p99_ms'])} | {format_ms(g['p999_ms'])} "
                     f"| {g['rate']:.0f} req/s | {g['errors'] or 'none'} |")  # fmt: skip
    sw = summary["sweep_p99_le_10ms_100_candidates"]
    best = f"{sw['best_rate']:.0f} req/s" if sw["best_rate"] else f"none of the rates tried (lowest: {SWEEP_RATES[0]} req/s)"
    lines += ["", f"## Rate sweep, 100 candidates: highest rate with p99 <= {sw['p99_bound_ms']:.0f} ms: **{best}**",
              "", "| offered | achieved | p50 | p99 | errors |", "|---|---|---|---|---|"]  # fmt: skip
    for run in sw["runs"]:
        lines.append(f"| {run['offered']:.0f} req/s | {run['rate']:.0f} req/s | {format_ms(run['p50_ms'])} | "
                     f"{format_ms(run['p99_ms'])} | {run['errors'] or 'none'} |")  # fmt: skip
    lines += ["", f"Item cache hit ratio of server (a) over the whole run, warm-ups included: "
              f"{summary['item_cache_hit_ratio']:.4f} (1,200-item catalogue).",
              "Latency plots: `benchmarks/goal_100/loadtest.png`, `benchmarks/goal_1000/loadtest.png`.", ""]  # fmt: skip
    return "\n".join(lines)
