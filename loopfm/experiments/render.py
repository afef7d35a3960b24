"""docs/results.md, docs/results-real.md and their PNG plots, from the results dicts that
report.build_results and report.real_report make."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loopfm.experiments.plan import Experiment  # noqa: E402
from loopfm.experiments.report import REAL_GOALS  # noqa: E402

ROW_NAMES = {"base": "base VM", "kd": "VM + KD", "loopfm": "VM + LoopFM", "loopfm_kd": "VM + LoopFM + KD", "fm": "FM",
             "popularity": "popularity (item CTR)", "lr_item": "LR on item id", "lr_user_item": "LR on user + item id",
             "lr_rates": "LR on user and item click rates so far",
             "lr_rates_all": "LR on click rates so far (+ user overall)",
             "gbdt": "GBDT on click rates so far (+ user overall)"}  # fmt: skip
SWEEP_MARK = "*On the sweep world* (the header says its size; its own base VM and FM)."
COLORS = {"kd": "#c84", "loopfm_kd": "#3a7", "base": "#888", "loopfm": "#48c", "fm": "#555"}


def ms(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def pct(s: dict) -> str:
    return f"{100 * s['mean']:+.2f}% ± {100 * s['std']:.2f}"


def pval(p: float) -> str:
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_main(results: dict, path: Path) -> None:
    """AUC and NE of the main table's models and (grey) the baselines, mean ± std over seeds."""
    rows = {**results["main"], **results.get("baselines", {})}
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, metric in zip(axes, ("auc", "ne")):
        means = [rows[n][metric]["mean"] for n in names]
        stds = [rows[n][metric]["std"] for n in names]
        ax.bar([ROW_NAMES[n] for n in names], means, yerr=stds, capsize=3, color=[COLORS.get(n, "#bbb") for n in names])
        ax.set_ylim(min(means) * 0.98, max(means) * 1.01)
        ax.set_title(f"{metric.upper()} (mean ± std over {results['seeds']} seeds)")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        plt.setp(ax.get_xticklabels(), ha="right")
    _save(fig, path)


def plot_sweep(entry: dict, metrics: tuple[str, ...], path: Path) -> None:
    """Each metric per point (categorical x), one line per cell name, error bars = std over seeds."""
    labels = [p["label"] for p in entry["points"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for ax, metric in zip(list(axes) if len(metrics) > 1 else [axes], metrics):
        for name in entry["points"][0]["cells"]:
            m = [p["cells"][name][metric]["mean"] for p in entry["points"]]
            s = [p["cells"][name][metric]["std"] for p in entry["points"]]
            ax.errorbar(range(len(labels)), m, yerr=s, marker="o", capsize=3, label=ROW_NAMES[name], color=COLORS[name])
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_title(metric.upper())
        ax.legend(fontsize=8)
    fig.suptitle(entry["title"], fontsize=10)
    _save(fig, path)


def plot_encoder(entry: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, n in zip(axes, ("100", "1000")):
        for name in ("kd", "loopfm_kd"):
            for p in entry["points"]:
                c = p["cells"][name]
                ax.errorbar(c["latency_ms"][n]["p50_ms"]["mean"], c["auc"]["mean"], yerr=c["auc"]["std"], marker="o",
                            color=COLORS[name], capsize=3)  # fmt: skip
                ax.annotate(f"{p['label']}", (c["latency_ms"][n]["p50_ms"]["mean"], c["auc"]["mean"]), fontsize=8)
        ax.set_xlabel(f"ONNX Runtime p50 ms, 1 user x {n} candidates (1 thread)")
        ax.set_ylabel("AUC")
        ax.set_title("green: VM + LoopFM + KD, orange: VM + KD")
    _save(fig, path)


def plot_compression(entry: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for p in entry["points"]:
        c, b = p["cells"]["loopfm_kd"], p["fm_history_bytes_per_user"]["full_history"]
        ax.errorbar(b, c["auc"]["mean"], yerr=c["auc"]["std"], marker="o", color=COLORS["loopfm_kd"], capsize=3)
        ax.annotate(p["label"], (b, c["auc"]["mean"]), fontsize=8)
    kd = entry["points"][0]["cells"]["kd"]["auc"]["mean"]
    ax.axhline(kd, ls="--", color=COLORS["kd"], label="VM + KD (0 bytes)")
    ax.set_xscale("log")
    ax.set_xlabel("FM history bytes per user online (L x stored code bytes)")
    ax.set_ylabel("AUC of VM + LoopFM + KD")
    ax.legend(fontsize=8)
    _save(fig, path)


def _cells_table(entry: dict, extra) -> list[str]:
    names = list(entry["points"][0]["cells"])
    head = ["point"] + [f"{ROW_NAMES[n]} {m}" for n in names for m in ("AUC", "NE", "TR")] + list(extra(None))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in entry["points"]:
        cols = [p["label"]] + [f(p["cells"][n][m]) for n in names for m, f in (("auc", ms), ("ne", ms), ("tr", lambda s: ms(s, 3)))]
        lines.append("| " + " | ".join(cols + list(extra(p))) + " |")
    return lines


def _claims_table(claims: list[dict]) -> list[str]:
    lines = ["| claim (A beats B) | AUC gain, relative | p (t-test over seeds) | p (bootstrap) "
             "| NE gain, relative | p (t-test) | p (bootstrap) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in claims:
        a, n = c["auc"], c["ne"]
        lines.append(f"| {c['label']} | {pct(a['relative'])} | {pval(a['p_ttest'])} | {pval(a['p_bootstrap'])} "
                     f"| {pct(n['relative'])} | {pval(n['p_ttest'])} | {pval(n['p_bootstrap'])} |")  # fmt: skip
    return lines


def _fm_columns(p: dict | None) -> list[str]:
    return ["FM AUC", "FM NE"] if p is None else [ms(p["fm"]["auc"]), ms(p["fm"]["ne"])]


def _bytes_columns(p: dict | None) -> list[str]:
    if p is None:
        return ["bytes per code", "bytes/user at full L", "stored bytes/user, mean (max)"]
    b = p["fm_history_bytes_per_user"]
    return [str(b["code_bytes"]), str(b["full_history"]), f"{b['mean_stored']['mean']:.0f} ({b['max_stored']['mean']:.0f})"]


def _latency_columns(p: dict | None) -> list[str]:
    if p is None:
        return [f"{ROW_NAMES[v]} p50 ms @{n}" for v in ("kd", "loopfm_kd") for n in ("100", "1000")]
    return [ms(p["cells"][v]["latency_ms"][n]["p50_ms"], 2) for v in ("kd", "loopfm_kd") for n in ("100", "1000")]


# experiments.yaml `columns`: extra columns of a table (the header when given None, else a point's values)
COLUMNS = {"": lambda p: [], "fm": _fm_columns, "bytes": _bytes_columns, "latency": _latency_columns}
# experiments.yaml `plot`: a named plot, else a list of metrics plotted per point
PLOTS = {"latency": plot_encoder, "bytes": plot_compression}


def render(results: dict, docs: Path, experiments: list[Experiment], header: str) -> str:
    """Write the plots under docs/results/ and return the markdown of docs/results.md: the
    goals, the main table, then every other experiment with its note, table, claims and plot."""
    plots = docs / "results"
    md = [header, "", "## Goals (VM + LoopFM + KD vs VM + KD, the FM, the L sweep; bench world)", "",
          "| goal | measured (mean ± std over seeds) | p (t-test) | p (bootstrap) | met |", "|---|---|---|---|---|"]  # fmt: skip
    g = results["goals"]
    for key, label in (("relative_auc_ge_1pct", "relative AUC gain >= 1%"), ("relative_ne_ge_1pct", "relative NE gain >= 1%")):
        md.append(f"| {label} | {pct(g[key]['relative'])} | {pval(g[key]['p_ttest'])} | {pval(g[key]['p_bootstrap'])} | {'yes' if g[key]['met'] else 'no'} |")
    tr = g["tr_ge_2x_kd"]
    md.append(f"| TR >= 2 x TR(KD) | TR {ms(tr['tr_loopfm_kd'], 3)} vs KD's {ms(tr['tr_kd'], 3)} (ratio of means "
              f"{tr['ratio_of_means']:.2f}) | {pval(tr['p_ttest'])} | {pval(tr['p_bootstrap'])} | {'yes' if tr['met'] else 'no'} |")
    fm = g["fm_closes_half_bayes_gap"]
    md.append(f"| FM closes >= 50% of the base-to-Bayes NE gap | {pct(fm['closed']).replace('+', '')} | | | {'yes' if fm['met'] else 'no'} |")
    if "gain_non_decreasing_in_l" in g:
        step = g["gain_non_decreasing_in_l"]
        w = step["worst_step"]
        md.append(f"| gain non-decreasing in L | worst step {w['label']}: AUC {pct(w['auc']['relative'])}, NE {pct(w['ne']['relative'])} "
                  f"| {pval(w['auc']['p_ttest'])} / {pval(w['ne']['p_ttest'])} | {pval(w['auc']['p_bootstrap'])} / {pval(w['ne']['p_bootstrap'])} "
                  f"| {'yes' if step['met'] else 'no'} |")  # fmt: skip
    md += ["", next(e.note for e in experiments if e.name == "main"), "", "## Main table", "",
           "| model | AUC | LogLoss | NE | TR | Bayes gap closed |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in results["main"].items():
        gap = pct(row["bayes_gap_closed"]).replace("+", "") if "bayes_gap_closed" in row else "n/a"
        md.append(f"| {ROW_NAMES[name]} | {ms(row['auc'])} | {ms(row['logloss'])} | {ms(row['ne'])} | {ms(row['tr'], 3)} | {gap} |")
    for name, row in results.get("baselines", {}).items():  # fitted on the VM's training rows
        md.append(f"| {ROW_NAMES[name]} | {ms(row['auc'])} | {ms(row['logloss'])} | {ms(row['ne'])} | | |")
    if "bayes_ceiling" in results:
        b = results["bayes_ceiling"]
        md.append(f"| Bayes (true p) | {ms(b['auc'])} | {ms(b['logloss'])} | {ms(b['ne'])} | | 100% |")
    plot_main(results, plots / "main.png")
    md += ["", *_claims_table(results["main_claims"]), "", "![main](results/main.png)", ""]
    for e in (e for e in experiments if e.name != "main"):
        entry = results[e.name]
        note = f"{SWEEP_MARK} {e.note}" if e.on_sweep_world else e.note
        md += [f"## {entry['title']}", "", note, "", *_cells_table(entry, COLUMNS[e.columns]), "", *_claims_table(entry["claims"]), ""]
        if isinstance(e.plot, str):
            PLOTS[e.plot](entry, plots / f"{e.name}.png")
        else:
            plot_sweep(entry, tuple(e.plot), plots / f"{e.name}.png")
        md += [f"![{e.name}](results/{e.name}.png)", ""]
    return "\n".join(md) + "\n"


def render_real(summary_: dict, docs: Path, command: str) -> str:
    """Write docs/results-real/<source>.png and return the markdown of docs/results-real.md:
    a summary over the sources, then per source its models, claims and goals."""
    from loopfm.eval.plots import plot_quality

    datasets = summary_["datasets"]
    run = summary_.get("run", {})
    wall = f" ({run['wall_time_s'] / 60:.1f} min wall time with {run['jobs']} jobs on {run['machine']} shared with other work)" if run else ""
    md = [f"# Results on data on disk\n\nMade by `{command}`{wall}: {summary_['seeds']} seeds, every number mean ± std over "
          "seeds on the held-out window of the source's vertical; baselines fitted on the VM's training rows (the same "
          "for every seed: std 0). AUC: higher is better. NE: log loss over the entropy of the held-out click rate, "
          "lower is better, below 1 beats predicting that rate. Best baseline = the baseline with the highest mean AUC "
          "(GBDT included). A vs B: A's gain over B relative to B, mean ± std over seeds; p = paired t-test over seeds "
          "/ paired bootstrap over held-out impressions. What each model is: docs/concepts.md.\n", "## Summary (AUC)\n",
          "| source | FM | best baseline | base VM | VM + KD | VM + LoopFM | VM + LoopFM + KD | LoopFM+KD vs KD (p) |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, d in datasets.items():
        m, best, gain = d["main"], d["best_baseline"], d["claims"]["loopfm_kd_vs_kd"]["auc"]
        md.append(f"| {name} | {ms(m['fm']['auc'])} | {ROW_NAMES[best]}: {ms(d['baselines'][best]['auc'])} | "
                  + " | ".join(ms(m[v]["auc"]) for v in ("base", "kd", "loopfm", "loopfm_kd"))
                  + f" | {pct(gain['relative'])} ({pval(gain['p_ttest'])} / {pval(gain['p_bootstrap'])}) |")  # fmt: skip
    goals = list(next(iter(datasets.values()))["goals"])
    md += ["", "## Goals", "", "| goal | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    md += [f"| {REAL_GOALS.get(g, g)} | " + " | ".join("met" if d["goals"][g] else "**not met**" for d in datasets.values()) + " |" for g in goals]
    for name, d in datasets.items():
        md += ["", f"## {name} ({d['eval_rows']} held-out impressions)", "", "| model | AUC | NE |", "|---|---|---|"]
        rows = {**d["baselines"], **d["main"]}
        md += [f"| {ROW_NAMES[k]} | {ms(r['auc'])} | {ms(r['ne'])} |" for k, r in rows.items()]
        claims = [{"label": " vs ".join(ROW_NAMES[m] for m in c.split("_vs_")), **v} for c, v in d["claims"].items()]
        md += ["", *_claims_table(claims), "", f"![{name}](results-real/{name}.png)"]
        plot_quality({k: {"auc": r["auc"]["mean"], "ne": r["ne"]["mean"]} for k, r in rows.items()}, docs / "results-real" / f"{name}.png",
                     title=f"{name}: held-out window, mean of {summary_['seeds']} seeds")  # fmt: skip
    return "\n".join(md) + "\n"
