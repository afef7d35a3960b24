"""Atomic writes, so a killed stage never leaves half a file: a file written under a temporary
name and renamed into place, a stage's output folder switched by one rename (`staged_dir`);
reading a table back; and what a file's name says of its layout (`text_separator`)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd


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


def remove_staged(target: Path) -> None:
    """Remove what staged_dir wrote at `target`: every version folder (the current one and any a
    killed run left), then the link. `shutil.rmtree` on the link itself removes nothing: it
    refuses a symbolic link, and `ignore_errors` hides the refusal."""
    for version in target.parent.glob(f".{target.name}.v*"):
        shutil.rmtree(version, ignore_errors=True)
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return pd.read_parquet(path, columns=columns)


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
