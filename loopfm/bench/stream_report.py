"""docs/benchmarks-stream.md and the freshness plot, rendered from the summary `loopfm bench
stream` writes (loopfm/bench/stream.py)."""

from __future__ import annotations

from pathlib import Path

from loopfm.bench.loadtest import format_ms


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({p["workers"] for p in summary["points"]}):
        rows = [p for p in summary["points"] if p["workers"] == n]
        offered = [p["offered_eps"] for p in rows]
        for q, style in (("p50", "o-"), ("p99", "s--")):
            left.plot(offered, [p["freshness_ms"][q] for p in rows], style, label=f"{n} worker(s), {q}")
        right.plot(offered, [p["achieved_eps"] for p in rows], "o-", label=f"{n} worker(s)")
    top = max((p["offered_eps"] for p in summary["points"]), default=1)
    right.plot([0, top], [0, top], ":", color="grey", label="achieved = offered")
    left.axhline(1000, color="grey", linestyle=":", label="1 s")
    left.set(xscale="log", yscale="log", xlabel="offered events/s", ylabel="freshness, ms (XADD -> visible)",
             title="Freshness")  # fmt: skip
    right.set(xlabel="offered events/s", ylabel="achieved events/s", title="Throughput")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(summary: dict) -> str:
    """benchmarks-stream.md: the tables of one run, with the cores each process had."""
    h, bs = summary["history_cost"], summary["beside_serving"]
    lines = [
        "# Live loop benchmark",
        "",
        f"`{summary['command']}` on {summary['machine']['cores']} cores ({summary['machine']['platform']}), "
        f"{summary['seconds'] / 60:.0f} min. Method: loopfm/bench/stream.py's docstring. Freshness is XADD to the "
        "value being visible to a reader of the user's hash (polled every ms), over about 200 sampled events a second.",
        "",
        "## Freshness and throughput",
        "",
        "| workers (cores) | offered events/s | achieved events/s | freshness p50 / p90 / p99 / max ms | lag max | drain s "
        "| dead letters | worker µs CPU/event | Valkey µs CPU/event |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["points"]:
        f = p["freshness_ms"]
        lines.append(f"| {p['workers']} ({p['cores']['workers']}) | {p['offered_eps']:.0f} | {p['achieved_eps']:.0f} | "
                     f"{format_ms(f['p50'])} / {format_ms(f['p90'])} / {format_ms(f['p99'])} / {format_ms(f['max'])} | "
                     f"{p['lag_max']} | {p['drain_s']} | {p['dead_letters']} | {p['worker_cpu_us_per_event']:.0f} | "
                     f"{p['store_cpu_us_per_event']:.0f} |")  # fmt: skip
    for n in sorted({p["workers"] for p in summary["points"]}):
        held = [p["achieved_eps"] for p in summary["points"] if p["workers"] == n and p["freshness_ms"]["p99"] is not None
                and p["freshness_ms"]["p99"] <= 1000 and p["achieved_eps"] >= 0.95 * p["offered_eps"]]  # fmt: skip
        top = max(summary["points"], key=lambda p: p["achieved_eps"] if p["workers"] == n else -1)
        lines.append(f"\n{n} worker(s): the highest rate held at p99 <= 1 s was {max(held, default=0):.0f} events/s; the most "
                     f"applied in overload, {top['achieved_eps']:.0f} events/s (worker + Valkey "
                     f"{top['worker_cpu_us_per_event'] + top['store_cpu_us_per_event']:.0f} µs CPU per event there).")  # fmt: skip
    lines += [
        "",
        f"Valkey and the producer ran on core {summary['points'][0]['cores']['store'] if summary['points'] else '?'}; "
        f"with 2 workers the second worker shares that core. {summary['spec']['duration_s']:g} s per point; events "
        f"drawn uniformly over the grown store's users, {summary['spec']['new_entity_share']:.1%} from new users "
        "and for new items.",
        "",
        "![freshness](benchmarks-stream/freshness.png)",
        "",
        "## Cost per event against the stored history",
        "",
        "| stored events | users | worker µs CPU/event | Valkey µs CPU/event | freshness p99 ms |",
        "|---|---|---|---|---|",
    ]
    for i, n in enumerate(h["stored_events"]):
        lines.append(f"| {n:,} | {h['users'][i]:,} | {h['cpu_us_per_event'][i]:.0f} | {h['store_cpu_us_per_event'][i]:.0f} | "
                     f"{format_ms(h['freshness_ms_p99'][i])} |")  # fmt: skip
    ratio = h["cpu_us_per_event"][1] / h["cpu_us_per_event"][0] if h["cpu_us_per_event"][0] else float("nan")
    lines += [
        "",
        f"One worker, {h['offered_eps']:g} events/s for {h['duration_s']:g} s each. The grown store: {h['how']}. "
        f"Ratio grown / world: {ratio:.2f}.",
        "",
        "## /score beside a worker",
        "",
        "| /score at | candidates | p50 ms alone | p99 ms alone | p50 ms streaming | p99 ms streaming | stream events/s | "
        "stream freshness p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| {bs['rate']:g} req/s | {bs['candidates']} | {format_ms(bs['score_p50_ms_alone'])} | {format_ms(bs['score_p99_ms_alone'])} | "
        f"{format_ms(bs['score_p50_ms_streaming'])} | {format_ms(bs['score_p99_ms_streaming'])} | {bs['stream_eps']:g} | "
        f"{format_ms(bs['stream_freshness_ms_p99'])} |",
        "",
        f"Cores: {bs['cores']}. /score p99 rose by {bs['score_p99_ms_streaming'] - bs['score_p99_ms_alone']:.2f} ms "
        f"(p50 by {bs['score_p50_ms_streaming'] - bs['score_p50_ms_alone']:.2f} ms) with the worker running.",
        "",
    ]
    return "\n".join(lines)
