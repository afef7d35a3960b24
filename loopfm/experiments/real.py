"""`loopfm experiment-real`: the main table on a dataset a user has on disk, several seeds.

For each named vertical rule and each seed: import, FM (warm-up fit + stream), embedding
log, structuring, `feast apply`, one `get_historical_features` retrieval, the four VM
variants and the baselines (loopfm/eval/baselines.py) on the same rows. A seed redraws
the FM's and the VM's initialisation and shuffles (real data is what it is). Each seed's
eval predictions are kept in `OUT/<name>/seed<k>/predictions.npz`; a finished seed is not
redone, so an interrupted run resumes. The report (docs/results-real.md|json + PNG) is
computed from those files: mean and std over seeds, paired t-test over seeds and paired
bootstrap over eval impressions for each claim.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from loopfm.core.config import VARIANTS, RunConfig, variant_named
from loopfm.data.importers import ImportOptions, VerticalRule
from loopfm.eval.baselines import BASELINES
from loopfm.eval.metrics import quality
from loopfm.eval.results import reference_predictions
from loopfm.experiments.render import ROW_NAMES
from loopfm.experiments.stats import paired_bootstrap, paired_ttest, summary
from loopfm.core.files import atomic_write, read_parquet, write_text
from loopfm.core.rundir import RunPaths

MODELS = ("fm", *VARIANTS)
# (A, B): A beats B; base vs lr_rates says whether the VM's loss to the strongest baseline is more than noise
CLAIMS = (("loopfm_kd", "kd"), ("loopfm", "base"), ("kd", "base"), ("loopfm_kd", "base"), ("base", "lr_rates"))
GOAL_REL_AUC = 0.01  # issue 15: VM + LoopFM + KD beats VM + KD by >= +1% relative AUC
ALPHA = 0.05


def run_seed(out: Path, data: Path, opts: ImportOptions, seed: int, overrides: list[str], redis_url: str, log) -> Path:
    """Every stage of one (vertical, seed) in `out/seed<k>`; returns its predictions file."""
    from loopfm.features.build import build_feature_tables
    from loopfm.features.store import feast_cli, historical_features, open_store
    from loopfm.fm.log import log_embeddings
    from loopfm.fm.train import train_fm
    from loopfm.pipeline.run import import_run
    from loopfm.vm.train import fit_variant, tensor_spec, variant_frame
    from loopfm.data.vocab import Vocab

    run = out / f"seed{seed}"
    done = run / "predictions.npz"
    if done.exists():
        lacking = sorted(set((*MODELS, *BASELINES)) - set(np.load(done).files))
        if lacking:
            raise ValueError(f"{done} has no predictions of {lacking} (made before they existed): "
                             f"remove {run} to compute the seed again")  # fmt: skip
        return done
    started = time.perf_counter()
    cfg = RunConfig()
    for assignment in (*overrides, f"world.seed={seed}", f"vm.seed={seed}"):
        cfg.override(assignment)
    explicit = {a.partition("=")[0] for a in overrides}
    cfg = import_run(run, cfg, data, opts, explicit)
    paths = RunPaths(run)
    train_fm(paths, cfg, progress=False)
    log_embeddings(paths, cfg, progress=False)
    build_feature_tables(paths, cfg, progress=lambda _: None)
    feast_cli(["apply"], run, redis_url)
    store = open_store(run, redis_url)
    train_e, eval_e = (read_parquet(paths.features / f"vm_{p}_entities.parquet") for p in ("train", "eval"))
    train_df, eval_df = (historical_features(store, e, "vm_loopfm_kd") for e in (train_e, eval_e))
    spec = tensor_spec(cfg, Vocab.load(paths))
    pred = reference_predictions(paths, cfg, eval_e, train_e)  # fm and the baselines: real data has no truth
    epochs = {}
    for variant in VARIANTS:
        a, b = (variant_frame(df, variant_named(variant)) for df in (train_df, eval_df))
        _, pred[variant], fit = fit_variant(cfg, spec, variant, a, b, log=lambda _: None)
        epochs[variant] = fit["best_epoch"]
    write_text(run / "epochs.json", json.dumps(epochs))

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, label=eval_e["label"].to_numpy(), **pred)

    atomic_write(done, save)  # last: its presence marks the seed finished
    q = {k: round(quality(eval_e["label"].to_numpy(), p)["auc"], 4) for k, p in pred.items()}
    log(f"{out.name} seed {seed}: AUC {q} ({time.perf_counter() - started:.0f} s)")
    return done


def report(results: dict[str, list[dict[str, np.ndarray]]], reps: int = 1000) -> dict:
    """Per dataset: every model's AUC / NE (mean, std over seeds), the baselines, and the
    claims (relative improvement, paired t-test over seeds, paired bootstrap over impressions).
    A baseline's predictions are the same for every seed (real data is fixed), so its t-test
    pairs seed-varying VM scores against a constant."""
    out: dict = {"datasets": {}, "seeds": min(len(v) for v in results.values())}
    for name, seeds in results.items():
        ys = [s["label"] for s in seeds]
        q = {m: [quality(s["label"], s[m]) for s in seeds] for m in (*MODELS, *BASELINES)}
        table = {m: {k: summary([r[k] for r in rows]) for k in ("auc", "ne")} for m, rows in q.items()}
        claims = {}
        for better, worse in CLAIMS:
            entry = {}
            for metric, sign in (("auc", 1), ("ne", -1)):
                a, b = [r[metric] for r in q[better]], [r[metric] for r in q[worse]]
                boot = paired_bootstrap(ys, [(sign, [s[better] for s in seeds]), (-sign, [s[worse] for s in seeds])], metric, reps)
                entry[metric] = {"relative": summary([sign * (x - z) / z for x, z in zip(a, b)]),
                                 "p_ttest": paired_ttest(a, b), "p_bootstrap": boot["p"]}  # fmt: skip
            claims[f"{better}_vs_{worse}"] = entry
        best_lr = max(("lr_item", "lr_user_item"), key=lambda m: table[m]["auc"]["mean"])
        goal = claims["loopfm_kd_vs_kd"]["auc"]
        out["datasets"][name] = {
            "main": {m: table[m] for m in MODELS},
            "baselines": {m: table[m] for m in BASELINES},
            "claims": claims,
            "goals": {
                "base_auc_ge_best_lr": bool(table["base"]["auc"]["mean"] >= table[best_lr]["auc"]["mean"]),
                "base_auc_ge_lr_rates": bool(table["base"]["auc"]["mean"] >= table["lr_rates"]["auc"]["mean"]),
                "every_variant_ne_lt_1": bool(all(table[v]["ne"]["mean"] < 1 for v in VARIANTS)),
                "loopfm_not_below_base": bool(table["loopfm"]["auc"]["mean"] >= table["base"]["auc"]["mean"]),
                "loopfm_kd_beats_kd_by_1pct": bool(goal["relative"]["mean"] >= GOAL_REL_AUC
                                                   and max(goal["p_ttest"], goal["p_bootstrap"]) < ALPHA),
            },  # fmt: skip
            "eval_rows": int(len(ys[0])),
        }
    return out


def markdown(summary_: dict, command: str) -> str:
    lines = [f"# Results on real data (MovieLens-100K development half)\n\nMade by `{command}`: {summary_['seeds']} seeds, "
             "every number mean ± std over seeds on the held-out window; baselines fitted on the VM's training rows.\n"]  # fmt: skip
    for name, d in summary_["datasets"].items():
        lines.append(f"## {name} ({d['eval_rows']} held-out impressions)\n\n| model | AUC | NE |\n|---|---|---|")
        for m, row in {**d["baselines"], **d["main"]}.items():
            lines.append(f"| {ROW_NAMES[m]} | {row['auc']['mean']:.4f} ± {row['auc']['std']:.4f} | {row['ne']['mean']:.4f} ± {row['ne']['std']:.4f} |")
        lines.append("\n| claim | rel. AUC | p (t-test / bootstrap) | rel. NE | p (t-test / bootstrap) |\n|---|---|---|---|---|")
        for claim, c in d["claims"].items():
            a, n = c["auc"], c["ne"]
            lines.append(f"| {claim.replace('_vs_', ' vs ')} | {a['relative']['mean']:+.2%} ± {a['relative']['std']:.2%} | "
                         f"{a['p_ttest']:.3f} / {a['p_bootstrap']:.3f} | {n['relative']['mean']:+.2%} ± {n['relative']['std']:.2%} | "
                         f"{n['p_ttest']:.3f} / {n['p_bootstrap']:.3f} |")  # fmt: skip
        lines.append("\nGoals: " + ", ".join(f"{k} **{'met' if v else 'not met'}**" for k, v in d["goals"].items()) + f"\n\n![{name}](results-real/{name}.png)\n")
    return "\n".join(lines)


def plot(summary_: dict, folder: Path) -> None:
    from loopfm.eval.plots import plot_quality

    for name, d in summary_["datasets"].items():
        rows = {m: {"auc": r["auc"]["mean"], "ne": r["ne"]["mean"]} for m, r in {**d["baselines"], **d["main"]}.items()}
        plot_quality(rows, folder / f"{name}.png", title=f"{name}: held-out window, mean of {summary_['seeds']} seeds")


def run_real(data: Path, fmt: str, datasets: dict[str, str], seeds: int, out: Path, docs: Path, overrides: list[str], log=print) -> dict:
    """All (dataset, seed) runs, then docs/results-real.md|json and docs/results-real/*.png."""
    from loopfm.pipeline.services import redis_url_or_local

    started = time.perf_counter()
    results: dict[str, list[dict[str, np.ndarray]]] = {}
    with redis_url_or_local() as redis_url:  # feast apply needs a reachable online store in the config only
        for name, rule in datasets.items():
            opts = ImportOptions(fmt, VerticalRule.parse(rule))
            results[name] = []
            for seed in range(seeds):
                done = run_seed(out / name, data, opts, seed, overrides,
                                redis_url, lambda m: log(f"[{time.perf_counter() - started:6.0f} s] {m}"))  # fmt: skip
                results[name].append(dict(np.load(done)))
    summary_ = report(results)
    command = (f"loopfm experiment-real --data {data} --format {fmt} " + " ".join(f"--dataset {k}={v}" for k, v in datasets.items())
               + f" --seeds {seeds}" + "".join(f" --set {o}" for o in overrides))  # fmt: skip
    docs.mkdir(parents=True, exist_ok=True)
    write_text(docs / "results-real.json", json.dumps({**summary_, "command": command}, indent=2))
    write_text(docs / "results-real.md", markdown(summary_, command))
    plot(summary_, docs / "results-real")
    log(f"wrote {docs / 'results-real.md'} in {time.perf_counter() - started:.0f} s")
    return summary_
