"""Helpers for integration tests that start their own Ray processes with `ray start`: free
ports on 127.0.0.1, and finding/stopping exactly the processes a test launched (by the private
temp dir on their command lines), never anyone else's."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

__all__ = ["free_port", "pids_with", "stop_processes"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port, never one this process handed out before: the OS may give a just-released
    port again, and two Ray components on one port fail `ray start` ("is trying to use a port
    number ... that is used by other components")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def pids_with(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (a test cluster's private temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


def stop_processes(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes of ``pids_with(marker)``, waiting for each round."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
