"""`loopfm experiment`: run the plan, then write docs/results.json, docs/results.md and plots."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from loopfm.experiments.plan import BENCH, EXPERIMENTS, ON_BENCH, Overrides, build_experiments
from loopfm.experiments.report import build_results
from loopfm.experiments.render import render
from loopfm.experiments.runner import Progress, run_config, run_plan
from loopfm.core.files import write_text

NOTES = {
    "goals": (
        "Met means: the mean over seeds reaches the threshold and both tests give p < 0.01 (two-sided). "
        "t-test = paired t-test over seeds on the per-seed metrics (world, FM and VM initialisation all "
        "redrawn; seeds - 1 degrees of freedom). Bootstrap = paired bootstrap over the eval window's "
        "impressions, resampled within each seed, the same draw for both models, the difference averaged "
        "over seeds (1,000 draws here, 200 in the other sections; p resolution 1/draws). TR goal: "
        "TR(LoopFM+KD) - 2 TR(KD) per seed (t-test) and 2 NE(KD) - NE(LoopFM+KD) - NE(base) (bootstrap). "
        "FM goal: on the mean over seeds. L goal: no step to the next longer L lowers VM + LoopFM + KD's "
        "AUC or NE with p < 0.05 on both tests (the worst step by AUC is shown, p as AUC / NE; every step "
        "is a claim of the L section). Every mean and std in results.json also lists its per-seed values."
    ),
    "gap": (
        "`world.fm_signal_noise` is the noise on the FM-only daily intent signal: 0.2 = the FM knows the "
        "user's current interest almost exactly, 8.0 = that signal is nearly useless and the FM's edge is "
        "only its cross-vertical view. Every point retrains the FM (same seed: impressions and labels are "
        "identical across points, only the FM's input changes). TR is against that point's own FM: it divides by "
        "the FM's NE gain over the base VM, so where the FM is hardly better (or worse) than the base VM, TR "
        "is meaningless and its std explodes; read the AUC and NE columns there."
    ),
    "length": (
        "L is the history length of both the VM's own click history and the FM history (the same L for "
        "VM + KD and VM + LoopFM + KD, so the gain is the FM codes'). L < 50 truncates the L = 50 snapshots "
        "at training time (identical to snapshots built with that L); L = 100 rebuilds them. L = 0 is VM + KD "
        "by construction (no FM history), i.e. a gain of 0."
    ),
    "encoder": (
        "Latency: ONNX Runtime, one intra-op thread, one user whose FM history is full, scoring 100 or "
        "1,000 candidates in one call (the serving graph: history encoded once per request), p50 over 200 "
        "calls after a warm-up, measured after all training finished. The encoder pools both the VM's own "
        "history and the FM history. Other agents shared the 2 cores, so latencies carry that noise."
    ),
    "compression": (
        "One compressor per seed, trained with a Matryoshka loss (reconstruction from the full code and "
        "from its first 8 and 16 dims, `fm.matryoshka_dims`), so the 8- and 16-dim prefixes are codes of "
        "their own. Each point re-logs from the same FM checkpoint: fp32 stores the tanh code as float32, "
        "int4 as round(8z) packed two per byte; prefixes store only the first dims. Bytes per code are "
        "measured on the logged rows; 'bytes/user at full L' = L x that; the stored mean (max) is the "
        "measured size of each user's newest `fm_codes` value in the Feast source, i.e. what "
        "materialize writes to Redis (users with fewer than L logged events store fewer codes)."
    ),
    "freshness": (
        "Logging delay: a code becomes available `delay` after its event (the default: 60 s and rolling checkpoints). "
        "Frozen: every code and KD label comes from the checkpoint after the warm-up days; rolling: each "
        "day is logged with the checkpoint trained up to that day (KD labels too, so VM + KD changes as well)."
    ),
    "layer": (
        "Which FM activation the compressor encodes: the concatenated embedding layer or the first hidden "
        "layer (the paper found shallow layers transfer best). Each point retrains FM + compressor with the same seed; VM + KD is the sweep "
        "world's default (its KD label does not depend on the extracted layer)."
    ),
    "vm_size": (
        "small: embedding 4, MLP (16); default: embedding 8, MLP (64, 32); large: embedding 16, MLP (256, 128)."
    ),
}


def run_experiments(out: Path, docs: Path, seeds: int, jobs: int, names: tuple[str, ...], overrides: Overrides,
                    command: str) -> dict:  # fmt: skip
    """Run (or resume) every cell, then write results.json / results.md / plots into `docs`."""
    unknown = set(names) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"--experiments: unknown {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    if "main" not in names:
        raise ValueError("--experiments must include main: every other table is read against its base VM")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if seeds < 2:
        raise ValueError(f"--seeds must be at least 2 (a standard deviation needs two), got {seeds}")
    base = (*BENCH, *overrides)
    cfg = run_config(base, 0)  # validates the overrides before anything runs
    started = time.time()
    log = Progress(started)
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    experiments = build_experiments(names, cfg.vm.history_length, cfg.world.n_users)
    run_plan(out, experiments, seeds, base, jobs, log)
    log("computing statistics")
    results = build_results(out, experiments, seeds)
    invocations = _record_invocation(out, {"command": command, "wall_time_s": time.time() - started, "from_scratch": fresh})
    first = invocations[0]
    results["run"] = {
        "command": first["command"],
        "wall_time_s": first["wall_time_s"],  # the run that started from an empty directory, if any
        "from_scratch": first["from_scratch"],
        "invocations": invocations,
        "jobs": jobs,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "base_overrides": [f"{k}={json.dumps(v)}" for k, v in dict(base).items()],
    }
    docs.mkdir(parents=True, exist_ok=True)
    write_text(docs / "results.json", json.dumps(results, indent=2))
    # a later invocation resumes what is cached and computes the rest (cells removed since, or a
    # finished run only re-rendered): say how long each took
    rerun = "".join(f"; then `{i['command']}`, {i['wall_time_s'] / 60:.1f} min, resuming what was cached" for i in invocations[1:])
    header = (
        "# LoopFM experiment results\n\n"
        f"Generated by `{first['command']}` ({'from scratch' if first['from_scratch'] else 'resuming cached cells'}, "
        f"{first['wall_time_s'] / 60:.1f} min wall time on {results['run']['machine']} shared with other work{rerun}); "
        f"the same numbers are in `results.json` beside this file. Synthetic world: {results['impressions']:,} impressions "
        f"(smallest of {seeds} seeds; VM = the `{cfg.vm.target_vertical}` vertical, "
        f"{min(results['per_seed_rows']['train_rows']):,}+ training and {min(results['per_seed_rows']['eval_rows']):,}+ "
        f"held-out impressions per seed, the held-out window being the last {cfg.vm.eval_days} days). Every number "
        f"is mean ± std over {seeds} seeds; a seed redraws the world, the FM and the VM. Config: defaults plus "
        f"{', '.join(results['run']['base_overrides'])}. Each world's features are read once through Feast "
        "`get_historical_features` (service `vm_loopfm_kd`, a superset of every variant's features; base and "
        "KD drop the FM history column) and shared by the VMs trained on that world."
        + "".join(f" {_sweep_sentence(w)}" for w in results["sweep_worlds"])
    )
    notes = {k: (f"{SWEEP_MARK} {v}" if k not in ON_BENCH and results["sweep_worlds"] and k != "goals" else v) for k, v in NOTES.items()}
    write_text(docs / "results.md", render(results, docs, notes, header))
    log(f"wrote {docs / 'results.md'}, {docs / 'results.json'} and {docs / 'results'}/*.png")
    return results


SWEEP_MARK = "*On the sweep world* (the header says its size; its own base VM and FM)."


def _sweep_sentence(w: dict) -> str:
    b, f = w["base"], w["fm"]
    return (
        f"The main table and the L sweep run on that bench world; the sections marked *on the sweep world* run on a "
        f"smaller one, {', '.join(w['overrides'])} ({w['impressions']:,} impressions, the smallest of the seeds; "
        f"{min(w['per_seed_rows']['train_rows']):,}+ training and {min(w['per_seed_rows']['eval_rows']):,}+ held-out "
        f"impressions per seed), with its own base VM (AUC {b['auc']['mean']:.4f}, NE {b['ne']['mean']:.4f}) and FM "
        f"(AUC {f['auc']['mean']:.4f}, NE {f['ne']['mean']:.4f}), against which its TR and gains are computed: a "
        "sweep point costs about half a bench one."
    )


def _record_invocation(out: Path, entry: dict) -> list[dict]:
    """Append this invocation to out/invocations.json, so a later re-render still knows how
    long the from-scratch run took."""
    path = out / "invocations.json"
    entries = [*(json.loads(path.read_text()) if path.exists() else []), entry]
    write_text(path, json.dumps(entries, indent=2))
    return entries
