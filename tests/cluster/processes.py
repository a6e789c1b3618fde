"""The processes a `fleetlm serve` started, found by parentage (never by name: other Ray
clusters may run on the same machine), and which of them listens on a port."""

from __future__ import annotations

import os
import time
from pathlib import Path

GONE_TIMEOUT_S = 15.0


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid` (children of all its threads)."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            for child in map(int, children.read_text().split()):
                if child not in found:
                    found[child] = _cmdline(child)
                    todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return ""


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listener(port: int, pids) -> int | None:
    """Which of `pids` listens on 127.0.0.1:`port` (by the socket's inode in /proc)."""
    local = f"0100007F:{port:04X}"
    inodes = {fields[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
              if (fields := line.split())[1] == local and fields[3] == "0A"}  # 0A: LISTEN
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone, or not ours to read
            continue
        if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
            return pid
    return None


def assert_all_gone(started: dict[int, str]) -> None:
    """Every process of `started` ends within GONE_TIMEOUT_S."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while (left := {p: c for p, c in started.items() if is_running(p)}) and (
            time.monotonic() < deadline):
        time.sleep(0.2)
    assert not left, f"still running after fleetlm serve exited: {left}"
