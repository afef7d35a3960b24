"""`python -m loopfm.bench.offline_stores --run-dir R [--rows 100000 1000000]`: the cost of
one point-in-time retrieval (`vm_loopfm_kd`) on each offline profile (DuckDB, and the exact
Ray store in local mode), the figures behind docs/scaling.md.

Entity rows are the run's impressions of every vertical (entity time 1 µs before the
impression, as `features build` stamps them), drawn with seed 0: without replacement up to
the impression count, with replacement (duplicates) beyond it. Each (profile, rows) runs
in a child process of its own, so that peaks do not mix; the child reports the retrieval's
wall seconds (Ray's start-up timed apart, on a 10-row retrieval first), rows/s, the peak
PSS in MB of itself and every descendant (Ray's GCS, raylet, workers and the object-store
pages they map), sampled every 0.2 s, and a digest of the frame, so that equal digests
say both profiles returned the same rows. Writes JSON to stdout. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

from loopfm.core.files import read_parquet
from loopfm.core.rundir import RunPaths
from loopfm.features.build import ENTITY_OFFSET

PROFILES = ("duckdb", "ray")


def entity_rows(run_dir: Path, rows: int) -> pd.DataFrame:
    """`rows` entity rows drawn from the run's impressions (seed 0), columns as the VM's."""
    imp = read_parquet(RunPaths(run_dir).table("impressions"))
    frame = pd.DataFrame(
        {
            "impression_id": imp["impression_id"],
            "user_id": imp["user_id"],
            "item_id": imp["item_id"],
            "vertical": imp["vertical"],
            "event_timestamp": imp["event_timestamp"] - ENTITY_OFFSET,
        }
    )
    return frame.sample(rows, replace=rows > len(frame), random_state=0).reset_index(drop=True)


class PeakPss:
    """Peak summed PSS (bytes) of this process and its descendants, sampled every `every` s."""

    def __init__(self, every: float = 0.2):
        self.peak, self._every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass  # a worker that ended between listing and reading
            self.peak = max(self.peak, total)
            self._stop.wait(self._every)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure_one(run_dir: Path, profile: str, rows: int) -> dict:
    """One retrieval of `rows` entity rows on `profile`, in this process (the child's part)."""
    os.environ["LOOPFM_OFFLINE_STORE"] = profile
    from loopfm.features.store import historical_features, open_store

    entities = entity_rows(run_dir, rows)
    with PeakPss() as peak:
        started = time.perf_counter()
        store = open_store(run_dir)
        historical_features(store, entities.head(10), "vm_loopfm_kd")  # Ray's start-up; DuckDB's first connection
        warm = time.perf_counter()
        frame = historical_features(store, entities, "vm_loopfm_kd")
        done = time.perf_counter()
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()[:16]
    return {
        "profile": profile,
        "rows": rows,
        "startup_s": round(warm - started, 2),
        "seconds": round(done - warm, 2),
        "rows_per_s": round(rows / (done - warm)),
        "peak_pss_mb": round(peak.peak / 2**20),
        "history_rows": int(frame["fm_codes"].notna().sum()),
        "digest": digest,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.run_dir, args.profiles[0], args.rows[0])))
        return
    load = os.getloadavg()
    results = []
    for rows in args.rows:
        for profile in args.profiles:
            child = subprocess.run(
                [sys.executable, "-m", "loopfm.bench.offline_stores", "--one", "--run-dir", str(args.run_dir),
                 "--rows", str(rows), "--profiles", profile],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"cores": os.cpu_count(), "load_before": load, "load_after": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
