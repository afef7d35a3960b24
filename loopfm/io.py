"""Run-directory layout, atomic file writes, how a file's name gives its layout, and time units
shared by every stage (times are unix microseconds, UTC, everywhere inside the project)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd


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


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file and rename, so a killed stage never leaves half a table.

    Timestamps are stored as microseconds UTC: DuckDB (Feast's offline store) cannot cast
    nanosecond time-zone-aware columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for col in df.columns:
        if isinstance(df[col].dtype, pd.DatetimeTZDtype):
            df = df.assign(**{col: df[col].dt.tz_convert("UTC").astype("datetime64[us, UTC]")})
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


# A write refused by the file system itself: full, over quota, mounted read-only.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temporary file of a unique name beside `path`, then one rename onto
    `path`: readers see the old file or the new one, two writers never share a temporary file,
    and a write that fails or is interrupted leaves no temporary file behind. The file's mode
    comes from the umask, as any file's (mkstemp's 0600 hid models from a container's user).
    Raises OSError naming `path` (its `filename`) when the file system refuses (NO_ROOM):
    writers such as pyarrow and torch name no file in theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 & ~umask
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_ROOM:
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """A text file written atomically (atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")  # pandas reads these compressed by their name
SEPARATORS = {".csv": ",", ".tsv": "\t"}


def text_separator(path: Path) -> str | None:
    """The column separator that a delimited text file's name gives, read from the suffix
    before any compression suffix, in any case: "," for .csv, a tab for .tsv (events.tsv.gz:
    a tab); None for any other name (parquet, or a format's own files)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    return SEPARATORS.get(suffixes[-1]) if suffixes else None


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

    from loopfm.children import held_by_workers

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


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder to fill with a stage's outputs. When the block succeeds, `target`
    (a symlink to its current version folder) is switched to the new folder by one atomic
    rename and the old version removed; a stage killed or failing inside the block leaves
    `target` exactly as it was, so readers see the whole old result or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    new = target.with_name(f".{target.name}.v{time.time_ns()}.{os.getpid()}")
    new.mkdir()  # mode from the umask, as any folder (mkdtemp's 0700 hid it from a container's user)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = target.resolve() if target.is_symlink() else None
    if target.exists() and old is None:  # a run written before versioned folders: a one-time move
        old = target.rename(target.with_name(f".{target.name}.legacy"))
    atomic_write(target, lambda link: (link.unlink(), link.symlink_to(new.name)))  # relative: the run can be moved
    if old is not None and old != new:
        shutil.rmtree(old, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.v*"):  # left by earlier killed runs
        if stale != new:
            shutil.rmtree(stale, ignore_errors=True)


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return pd.read_parquet(path, columns=columns)


US_PER_HOUR = 3_600 * 1_000_000
US_PER_DAY = 24 * US_PER_HOUR


def unix_us(timestamps: pd.Series) -> pd.Series:
    """UTC timestamps (any unit) -> int64 microseconds since the epoch (the project's time unit;
    rounding to seconds would let a sub-second event into its own history)."""
    return timestamps.dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype("int64")


def from_unix_us(us) -> pd.Series:
    return pd.Series(pd.to_datetime(us, unit="us", utc=True)).astype("datetime64[us, UTC]")
