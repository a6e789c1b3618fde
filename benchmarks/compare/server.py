"""One server under test as a process tree: start it, wait until it answers, measure its memory
through /proc, stop it and check that its port is free again.

A server runs in a session of its own (its own process group). Stopping sends SIGTERM to the
top process (each system shuts down cleanly on it: fleetlm tears Ray down), waits, then SIGKILLs
the group and every descendant seen while it ran (Ray's workers are not all in the group).
Descendants are remembered with their start time so that a reused pid is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_INTERVAL_S = 0.5
HTTP_PROBE_TIMEOUT_S = 5.0
STOP_GRACE_S = 30.0
PORT_RELEASE_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 3000
_KIB = 1024


def free_port(host: str) -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])  # field 22 of stat: starttime


def _is_running(pid: int, start_time: int) -> bool:
    """False once the process has exited (gone, or a zombie waiting for its parent)."""
    fields = _stat_fields(pid)
    return fields is not None and int(fields[19]) == start_time and fields[0] != "Z"


def descendants(root_pid: int) -> list[int]:
    """`root_pid` and every live process below it (by parent pid), root first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, ()))
    return tree


@dataclass(frozen=True)
class MemorySample:
    """Memory of a process tree: RSS summed (shared pages counted in every process) and PSS
    summed (shared pages split between their users: the tree's real share of RAM)."""

    num_processes: int
    rss_bytes: int
    pss_bytes: int


def _kib_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * _KIB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def memory_of(pids: Iterable[int]) -> MemorySample:
    pids = list(pids)
    rss = sum(_kib_field(Path(f"/proc/{pid}/status"), "VmRSS") for pid in pids)
    pss = sum(_kib_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss") for pid in pids)
    return MemorySample(len(pids), rss, pss)


def _models_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/v1/models", timeout=HTTP_PROBE_TIMEOUT_S) as r:
            return r.status == 200 and bool(json.loads(r.read()).get("data"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """A server started from `argv` with its output in `log_path`."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                 host: str, port: int, cwd: Path | None = None) -> None:
        self.host, self.port = host, port
        self.base_url = f"http://{host}:{port}"
        self.log_path = log_path
        self._seen: dict[int, int] = {}  # pid -> start time, every descendant ever observed
        with open(log_path, "ab") as log:
            self.started_at = time.monotonic()
            self._process = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self._process.pid

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from launch to the first GET /v1/models that lists a model.

        RuntimeError (with the log's tail) if the process exits first or `timeout_s` passes.
        """
        deadline = self.started_at + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"server exited with code {self._process.returncode} before "
                                   f"it was ready; log {self.log_path}:\n{self.log_tail()}")
            if _models_ready(self.base_url):
                return time.monotonic() - self.started_at
            self._remember_tree()
            time.sleep(POLL_INTERVAL_S)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def memory(self) -> MemorySample:
        return memory_of(self._remember_tree())

    def _remember_tree(self) -> list[int]:
        tree = descendants(self.pid)
        for pid in tree:
            start = _start_time(pid)
            if start is not None:
                self._seen.setdefault(pid, start)
        return tree

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """Stop the whole tree; True when the port is free again afterwards."""
        self._remember_tree()
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill_leftovers()
        deadline = time.monotonic() + PORT_RELEASE_TIMEOUT_S
        while not is_port_free(self.host, self.port):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def _kill_leftovers(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        alive = [pid for pid, start in self._seen.items() if _start_time(pid) == start]
        for pid in alive:  # still the processes we saw, not reused pids
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._process.wait()
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while any(_is_running(pid, self._seen[pid]) for pid in alive):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the server at {self.base_url} survived SIGKILL")
            time.sleep(POLL_INTERVAL_S / 10)
