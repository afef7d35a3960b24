"""docs/benchmarks.md and the p99 plot, rendered from the summary `loopfm bench serving` writes
(loopfm/bench/serving.py)."""

from __future__ import annotations

from pathlib import Path

from loopfm.bench.decompose import markdown as decomposition_markdown
from loopfm.bench.loadtest import format_ms
from loopfm.bench.serving import CANDIDATES, CAPACITY_P99_MS, CAPACITY_RATES, PATHS, steal


def plot_summary(summary: dict, path: Path) -> None:
    """p99 against offered rate at 100 candidates (capacity sweep) per configuration, with the
    /healthz floor, and the 5 ms bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in summary["configurations"].items():
        runs = result["capacity_runs"]
        ax.plot([r["offered_rate"] for r in runs], [r["p99_ms"] for r in runs], marker="o", label=f"/score 100 candidates, {name}")
        noop = result["noop"]
        ax.plot([float(r) for r in noop], [v["p99_ms"] for v in noop.values()], ls="--", marker="x", label=f"/healthz floor, {name}")
    ax.axhline(CAPACITY_P99_MS, color="grey", lw=0.8, label=f"{CAPACITY_P99_MS:g} ms")
    ax.set(yscale="log", xlabel="offered rate (req/s, Poisson)", ylabel="client p99 (ms)", title="open loop: p99 against offered rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(row: dict | None, key: str) -> str:
    return "n/a" if row is None else format_ms(row.get(key))


def markdown(summary: dict) -> str:
    """docs/benchmarks.md from the summary of run_serving_bench."""
    lines = [
        "# Serving benchmarks",
        "",
        f"Reproduce: `{summary['command']}` (writes this file, `benchmarks.json` and `benchmarks/*.png`; "
        f"{summary['seconds'] / 60:.1f} min). Machine: {summary['machine']['cores']} cores, loopback only. "
        f"Model {summary['model']}. One run. Open loop: Poisson arrivals, {summary['duration_s']:g} s per point "
        f"({summary['duration_s'] / 3:g} s per /healthz, sweep, wrk and four-path point), latency from the scheduled "
        "send time, failures counted at the time they failed. Server, Valkey and client are pinned to cores "
        "(`os.sched_setaffinity`, inherited by what the bench starts). The client is `loopfm/bench/loadtest.py`: one "
        "epoll loop, pre-encoded requests, keep-alive connections; `client CPU` is its CPU time over the schedule, "
        "`send lag` how late it released requests; `steal` the share of the machine's CPU time the hypervisor gave "
        "to other guests during the point (`/proc/stat`): a noisy host shows there. The /healthz rows at the same rates are its floor: what the "
        "client, loopback and the HTTP stack add before any scoring. `server p50 / p99 <=` are the buckets of the "
        "server's own histogram (`loopfm_request_seconds`, ASGI middleware, every worker) that hold them.",
        "",
    ]
    for name, r in summary["configurations"].items():
        cores = r["cores"]
        lines += [f"## {name.replace('_', ' ')}: server on cores {cores['server']}, Valkey on {cores['store']}, "
                  f"client on {cores['client']}", "",
                  "| load | p50 | p99 | p99.9 | achieved | errors | server p50 / p99 <= | client CPU | send lag p99 | steal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for candidates, by_rate in r["open_loop"].items():
            for rate, row in by_rate.items():
                lines.append(f"| /score {candidates} candidates at {rate} req/s | {_ms(row, 'p50_ms')} | {_ms(row, 'p99_ms')} "
                             f"| {_ms(row, 'p999_ms')} | {row['achieved_rate']:.0f} req/s | {row['errors'] or 'none'} "
                             f"| {format_ms(row['server']['p50_le_ms'])} / {format_ms(row['server']['p99_le_ms'])} "
                             f"| {row['client']['cpu_share']:.0%} | {format_ms(row['client']['send_lag_p99_ms'])} | {steal(row)} |")  # fmt: skip
        for rate, row in r["noop"].items():
            lines.append(f"| /healthz (floor) at {rate} req/s | {_ms(row, 'p50_ms')} | {_ms(row, 'p99_ms')} | {_ms(row, 'p999_ms')} "
                         f"| {row['achieved_rate']:.0f} req/s | {row['errors'] or 'none'} | | {row['client']['cpu_share']:.0%} "
                         f"| {format_ms(row['client']['send_lag_p99_ms'])} | {steal(row)} |")  # fmt: skip
        best = r["capacity_p99_5ms"]["100"]
        held = f"{best:g} req/s" if best else f"none of the rates tried (lowest {CAPACITY_RATES[0]} req/s)"
        lines += ["", f"Capacity at 100 candidates with p99 <= {CAPACITY_P99_MS:g} ms: **{held}** "
                  f"(sweep: " + ", ".join(f"{x['offered_rate']:g} -> p99 {format_ms(x['p99_ms'])}" for x in r["capacity_runs"])
                  + f"). Item cache hit ratio: {r['item_cache_hit_ratio']}.", ""]  # fmt: skip
        wrk = r["wrk_closed_loop"]
        lines += ["`wrk`, closed loop (second opinion): " + "; ".join(
            f"{c} candidates: {v['skipped']}" if "skipped" in v else
            f"{c} candidates, {v['connections']} connection(s): p50 {format_ms(v.get('p50_ms'))} / p90 {format_ms(v.get('p90_ms'))} "
            f"/ p99 {format_ms(v.get('p99_ms'))} at {v['rate']:.0f} req/s, errors {v['errors']}"
            for c, v in wrk.items()) + ".", ""]  # fmt: skip
        if r["feast_sdk"]:
            lines += _four_paths_table(r["feast_sdk"])
        if r.get("decomposition"):
            lines += decomposition_markdown(r["decomposition"])
    lines += ["Plots: `benchmarks/serving.png` (p99 against offered rate), `benchmarks/<configuration>/score_<candidates>_<rate>/"
              "loadtest.png` (latency over time and CDF per open-loop point).", ""]  # fmt: skip
    return "\n".join(lines)


def _four_paths_table(table: dict) -> list[str]:
    lines = ["### The four paths at low rates (1 worker)", "",
             "(a) loopfm /score; (b) a FastAPI handler calling Feast's `get_online_features` for the user and every "
             "candidate, then the same tensorization and ONNX model; (c) the Scorer in process, sequential; (d) /healthz. "
             "Rates: " + ", ".join(f"{c} candidates at {rate:g} req/s" for c, rate in table["rates"].items())
             + f", {table['seconds']:g} s each.", "",
             "| candidates | (a) loopfm p50 / p99 | (b) feast_sdk p50 / p99 | (c) floor p50 / p99 | (d) noop p50 / p99 | (a)/(b) p50 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in map(str, CANDIDATES):
        cells = [f"{_ms(table[p][c], 'p50_ms')} / {_ms(table[p][c], 'p99_ms')}" for p in PATHS]
        a, b = table["loopfm"][c]["p50_ms"], table["feast_sdk"][c]["p50_ms"]
        ratio = f"{a / b:.3f}" if a and b else "n/a"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio} |")
    return lines + [""]
