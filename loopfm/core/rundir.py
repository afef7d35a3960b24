"""A run directory: where each stage keeps its artifacts (`RunPaths`) and the lock one writing
command holds on it (`run_dir_lock`), refused early when this user cannot write there."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loopfm.core.files import write_text


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of one run keeps its artifacts."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def fm(self) -> Path:
        return self.root / "fm"

    @property
    def fm_log(self) -> Path:
        """The embedding log: one row per event with its int4 code and FM logit."""
        return self.fm / "fm_event_embeddings.parquet"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def vm(self) -> Path:
        return self.root / "vm"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def table(self, name: str) -> Path:
        return self.data / f"{name}.parquet"


HOLDER_WAIT_S = 2.0  # how long a refused process waits for the holder to write its name


class RunDirBusy(RuntimeError):
    """Another loopfm process is writing the same run directory; the message names it."""


def lock_path(run_dir: Path) -> Path:
    """The lock of a run directory: a hidden file beside it (`runs/.demo.lock` for
    `runs/demo`), so the run directory holds only its artifacts and a copy carries no lock."""
    run_dir = run_dir.resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def unwritable(folder: Path) -> Path | None:
    """The folder this user cannot write that stops `folder` from being written (itself, or
    the nearest existing folder above it when it does not exist yet), or None."""
    path = folder.resolve()
    while not path.exists():
        path = path.parent
    return None if os.access(path, os.W_OK) else path


class RunDirReadOnly(RuntimeError):
    """A writing command was given a run directory (or lock folder) this user cannot write."""


def require_writable(run_dir: Path, command: str, fix: str = "") -> None:
    """Raise RunDirReadOnly, naming the path and the fix, unless this user can write both
    `run_dir` (its nearest existing ancestor when it does not exist yet) and the folder of its
    lock. Checked before a writing command starts, so a read-only run (a `:ro` mount, a
    `chmod -R a-w` copy, another user's files) is refused before any work, not midway."""
    for folder in (run_dir, lock_path(run_dir).parent):
        path = unwritable(folder)
        if path is not None:
            raise RunDirReadOnly(
                f"`{command}` writes {run_dir} and its lock {lock_path(run_dir)}, but {path} is not writable "
                f"by this user (uid {os.getuid()}): make it writable (chown or chmod u+w), or run this on a "
                f"writable copy of the run{fix}"
            )


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, command: str, fix: str = "") -> Iterator[None]:
    """Hold `run_dir` for one writing command, or raise RunDirBusy at once naming the holder
    (RunDirReadOnly first, naming the path and `fix`, if this user cannot write there).

    An OS file lock (filelock: flock on POSIX), so a holder that dies, even by SIGKILL,
    releases it. `<lock>.holder` says who holds it (pid, command, since when); the holder
    writes it just after taking the lock, so a refused process waits up to HOLDER_WAIT_S
    seconds for it (taking the lock instead if it is released meanwhile)."""
    from filelock import FileLock, Timeout

    from loopfm.core.children import held_by_workers

    require_writable(run_dir, command, fix)
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(path), path.with_name(path.name + ".holder")
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except Timeout:
            pass
        try:
            who = holder.read_text()
        except OSError:  # the holder has the lock but has not written its name yet, or is releasing it
            who = ""
        if who or time.monotonic() >= deadline:
            ended = who.startswith("pid ") and Path("/proc/self").exists() and not Path(f"/proc/{who.split()[1]}").exists()
            raise RunDirBusy(f"{run_dir} is being written by {who.strip() or 'another loopfm process'}"
                             f"{', which has ended; the processes it started hold the run until they exit' if ended else ''}; "
                             "wait for it to finish or stop it, then run this again")  # fmt: skip
        time.sleep(0.02)
    try:
        write_text(holder, f"pid {os.getpid()} (`{command}`, since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})")
        with held_by_workers(lock._context.lock_file_fd):  # a killed holder's workers keep it until they exit
            yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
