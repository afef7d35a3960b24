"""`wrk` (the Debian package) as a closed-loop second opinion on /score: a Lua script cycling
through request bodies, and its --latency report parsed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from loopfm.bench.loadtest import LoadSpec, RequestPool, auth_headers, request_bodies
from loopfm.core.children import dies_with_this_process


# The script names every header: wrk.format given a headers table sends only those, not -H's.
WRK_SCRIPT = """-- bodies cycled per request; written by loopfm/bench/wrk.py
local bodies = {%s}
local headers = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/score", headers, bodies[i])
end
"""


def wrk_closed_loop(url: str, pool: RequestPool, candidates: int, connections: int, seconds: float,
                    api_key: str | None = None) -> dict:  # fmt: skip
    """`wrk`, one thread, `connections` connections, closed loop, cycling through 200 request
    bodies; {"skipped": why} if wrk is not installed (Debian: apt-get install wrk)."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (Debian package wrk)"}
    bodies = request_bodies(LoadSpec(rate=1, duration_s=1, candidates=candidates, seed=7), pool, 200, np.random.default_rng(7))
    with tempfile.TemporaryDirectory(prefix="loopfm-wrk-") as folder:
        script = Path(folder) / "score.lua"
        headers = {"content-type": "application/json", **auth_headers(api_key)}
        script.write_text(WRK_SCRIPT % (", ".join(f"[[{b.decode()}]]" for b in bodies),
                                        ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())))  # fmt: skip
        command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=dies_with_this_process()).stdout
    return parse_wrk(out) | {"connections": connections, "seconds": max(1, round(seconds))}


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict:
    """wrk's --latency report -> {"p50_ms", "p90_ms", "p99_ms", "rate", "errors"}."""
    latency = {f"p{q}_ms": float(v) * _UNITS_MS[u] for q, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {**latency, "rate": float(rate.group(1)) if rate else None, "errors": errors}
