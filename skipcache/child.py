"""Run a function in a fresh spawned process and get its result back: how the pipeline and the
benchmark give every measured run a peak memory of its own.

    result = run_in_child(measure, "Skip Tuning", options)   # fn(*args) runs in the child

`fn` must be importable at module level (spawn pickles it by name), and its arguments and result
picklable. Any exception in the child, and a child that dies without reporting (killed for
memory, a crash), comes back as `ChildFailed` carrying the child's message. On Linux the child
is killed when its parent dies, even by SIGKILL (`prctl(PR_SET_PDEATHSIG)`), so a killed
`skipcache run` or `skipcache bench` leaves no training process behind.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
import traceback

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ChildFailed(Exception):
    """The child raised or died; `str()` is one line, `.traceback` the child's (if any)."""

    def __init__(self, message: str, tb: str = ""):
        super().__init__(message)
        self.traceback = tb


def _die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGKILL when its parent exits (Linux); exit now if the
    parent is already gone. The kernel ties the signal to the thread that started the child:
    call `run_in_child` from a thread that lives as long as the child (the pipeline and the
    benchmark call it from the main thread)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _body(fn, args: tuple, kwargs: dict, q, parent: int) -> None:
    _die_with_parent(parent)
    try:
        q.put(("ok", fn(*args, **kwargs)))
    except BaseException as exc:  # report anything, MemoryError and KeyboardInterrupt included
        q.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def run_in_child(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a new spawned process; its return value, or `ChildFailed`."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_body, args=(fn, args, kwargs, q, os.getpid()), daemon=True)
    proc.start()
    report = None
    while report is None:
        try:
            report = q.get(timeout=1.0)
        except queue_module.Empty:
            if not proc.is_alive():
                try:
                    report = q.get(timeout=1.0)
                except queue_module.Empty:
                    report = ("error", f"the child process died with exit code {proc.exitcode} (killed for memory?)", "")
    proc.join()
    if report[0] == "ok":
        return report[1]
    raise ChildFailed(report[1], report[2])
