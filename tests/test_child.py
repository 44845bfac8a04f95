"""`skipcache.child.run_in_child`: results, errors, and a child that does not outlive its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from skipcache.child import ChildFailed, run_in_child


def _add(a, b):
    return a + b


def _fail():
    raise ValueError("bad value in the child")


def test_the_childs_result_and_its_error_come_back():
    assert run_in_child(_add, 2, b=3) == 5
    with pytest.raises(ChildFailed, match="ValueError: bad value in the child") as info:
        run_in_child(_fail)
    assert "_fail" in info.value.traceback


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_child_dies_with_its_parent_killed_by_sigkill(tmp_path):
    """`skipcache run` killed with SIGKILL used to leave its tuning child running to the end."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from skipcache.child import run_in_child
        from tests.test_child import _write_pid_then_sleep
        run_in_child(_write_pid_then_sleep, {str(pid_file)!r})
    """)], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the child outlived its parent"


def _write_pid_then_sleep(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)
