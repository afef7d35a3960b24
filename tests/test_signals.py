"""Long-running commands stop on the signal process managers send (SIGTERM: systemd,
`docker stop`, Kubernetes) and on Ctrl-C (SIGINT) within seconds, with their children."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LOOPFM
from loopfm.pipeline.services import descendants, free_port


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_left(proc: subprocess.Popen, pids: set[int]) -> None:
    """Kill the command and what this test saw it start, should the command have left it."""
    if proc.poll() is None:
        proc.kill()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def started_serve(trained_run: Path, tmp_path: Path, store: list[str]) -> tuple[subprocess.Popen, set[int]]:
    """`loopfm serve` on a private copy of the run (it only reads it), once it says it serves,
    and its children then (Valkey unless `store` names a Redis URL, and uvicorn)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen([LOOPFM, "serve", "--run-dir", str(run), "--port", str(free_port()), *store],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("serving"):
            break
    return proc, descendants(proc.pid)


@pytest.mark.parametrize("sig, own_valkey", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_serve_stops_within_seconds_on_a_stop_signal_and_takes_its_valkey_and_uvicorn_along(
    trained_run, redis_url, tmp_path, sig, own_valkey
):
    """Without a Redis URL serve starts its own Valkey (and materializes into it) and uvicorn;
    with one, uvicorn only."""
    proc, children = started_serve(trained_run, tmp_path, [] if own_valkey else ["--redis-url", redis_url])
    try:
        assert len(children) >= 1 + own_valkey, (children, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(sig)
        started = time.perf_counter()
        code = proc.wait(timeout=30)
        assert time.perf_counter() - started < 5.0
        assert code == 128 + sig and "Traceback" not in proc.stderr.read()
        deadline = time.monotonic() + 2
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if alive(p)]
    finally:
        kill_left(proc, children)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""  # gone meanwhile


def wait_until_gone(pids: set[int], within_s: float = 5.0) -> list[int]:
    """Poll until none of `pids` is alive or `within_s` passed; the ones still alive."""
    deadline = time.monotonic() + within_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_a_serve_killed_by_sigkill_takes_its_valkey_and_uvicorn_along(trained_run, tmp_path):
    """SIGKILL runs no clean-up: the children go because the kernel signals them when their
    parent dies (loopfm.core.children), so none keeps the port."""
    proc, children = started_serve(trained_run, tmp_path, [])
    try:
        assert len(children) >= 2, children  # Valkey and uvicorn
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until_gone(children) == []
    finally:
        kill_left(proc, children)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="vm train uses worker processes only with two cores or more")
def test_a_vm_train_killed_by_sigkill_leaves_no_worker_writing_and_its_lock_free_once_they_are_gone(trained_run, tmp_path):
    from loopfm.core.rundir import run_dir_lock

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    for variant in ("base", "loopfm"):
        shutil.rmtree(run / "vm" / variant)
    proc = subprocess.Popen([LOOPFM, "vm", "train", "--run-dir", str(run), "--variant", "base", "--variant", "loopfm"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    workers: set[int] = set()
    try:
        for line in proc.stdout:  # a worker's first validation line: it is training
            if ": epoch " in line:
                break
        workers = {p for p in descendants(proc.pid) if "spawn_main" in command_line(p)}
        assert len(workers) == 2, workers
        assert all(holds_lock(p, run) for p in workers)  # so the kernel frees it only once the last of them exits
        proc.kill()
        proc.wait(timeout=10)
        assert locked_until_gone(run, workers) is not None
        assert not (run / "vm" / "base" / "model.pt").exists() and not (run / "vm" / "loopfm" / "model.pt").exists()
        with run_dir_lock(run, "a second training"):
            pass
    finally:
        kill_left(proc, workers)


def holds_lock(pid: int, run: Path) -> bool:
    """Whether process `pid` has the run's lock file open (and with it the lock's flock)."""
    from loopfm.core.rundir import lock_path

    folder = Path(f"/proc/{pid}/fd")
    return str(lock_path(run)) in {os.readlink(folder / fd) for fd in os.listdir(folder)}


def outlives(pids: set[int], grace_s: float) -> bool:
    """Whether one of `pids` is still alive `grace_s` from now: a process closes its files on
    its way out before it turns zombie, so one seen alive just after its lock came free may be
    exiting."""
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)
    return False


def locked_until_gone(run: Path, pids: set[int], within_s: float = 60.0) -> list[str] | None:
    """Try to lock `run` until it succeeds (within `within_s`): the refusals met on the way,
    or None if the lock was taken while one of `pids` still ran (or never). Who lives is read
    once the lock is held: read before, a process could end between the look and the lock."""
    from loopfm.core.rundir import RunDirBusy, run_dir_lock

    refusals, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with run_dir_lock(run, "a second training"):
                return None if outlives(pids, grace_s=0.5) else refusals
        except RunDirBusy as busy:
            refusals.append(str(busy))
            time.sleep(0.02)
    return None


def test_an_fm_train_on_two_ranks_killed_by_sigkill_keeps_its_run_locked_until_its_ranks_are_gone(copy_of_run):
    """torchrun gets SIGTERM when `loopfm fm train --nproc 2` dies, stops its ranks, and holds
    the run's lock until then: no second training starts beside ranks still writing."""
    run = copy_of_run
    shutil.rmtree(run / "fm")
    proc = subprocess.Popen([LOOPFM, "fm", "train", "--run-dir", str(run), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(ranks := {p for p in descendants(proc.pid) if "loopfm.distributed.fm_train" in command_line(p)}) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "torchrun and two ranks did not start"
            time.sleep(0.1)
        started = set(descendants(proc.pid))
        torchrun = {p for p in ranks if "torch.distributed.run" in command_line(p)}
        assert len(torchrun) == 1 and holds_lock(next(iter(torchrun)), run)
        time.sleep(2.0)  # the ranks have begun to train
        proc.kill()
        proc.wait(timeout=10)
        refusals = locked_until_gone(run, started)
        assert refusals is not None
        assert all("which has ended; the processes it started hold the run until they exit" in r for r in refusals), refusals
        written = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
        time.sleep(1.0)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()) == written  # no rank writes on
    finally:
        kill_left(proc, started)
