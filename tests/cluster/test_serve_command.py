"""`fleetlm serve` as a user runs it: a real process that starts its own Ray cluster, serves the
built-in model, and on SIGTERM stops Serve and every Ray process it started, then exits 0.

The Ray processes are found by parentage (what `fleetlm serve` started), never by name: other
Ray clusters may run on the same machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow  # a Ray cluster and the built-in model: ~30 s on 2 cores

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
READY_LINE = "fleetlm is serving"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0  # Serve stops its replicas gracefully, then Ray stops
GONE_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> dict[int, str]:
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


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listener(port: int, pids) -> int | None:
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


@pytest.fixture(params=["separate", "in_replica"])
def serve_config(request, tmp_path) -> tuple[Path, int, str]:
    """configs/default.yaml on a free port, with a small KV cache, with the routes in an
    ingress of their own (behind Serve's proxy) or in the engine replica."""
    data = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    port = _free_port()
    data["http"]["port"] = port
    data["http"]["ingress"] = request.param
    data["engine"]["kv_cache_memory_bytes"] = "16MiB"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, port, request.param


def _start(config: Path) -> tuple[subprocess.Popen, list[str]]:
    # Its own cluster, started as a user would without scripts/setup.sh's environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetlm.cli", "serve", str(config)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or proc.poll() is not None:
        proc.kill()
        pytest.fail("fleetlm serve did not come up:\n" + "".join(lines[-40:]))
    return proc, lines


def test_sigterm_stops_serve_and_every_ray_process_it_started(serve_config):
    config, port, ingress = serve_config
    proc, lines = _start(config)
    try:
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert health.status_code == 200
        # Ray listens on loopback only, not on the machine's network address.
        assert any("Ray cluster: 127.0.0.1:" in line for line in lines), lines[-10:]
        started = _descendants(proc.pid)
        assert any("raylet" in cmd for cmd in started.values()), started
        # Serve's proxy owns the port; with the routes in the engine replica, the replica
        # itself does (Serve's direct ingress), and answers there.
        owner = started.get(_listener(port, started), "")
        expected = "ServeReplica" if ingress == "in_replica" else "ProxyActor"
        assert expected in owner, (owner, started)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines[-40:])
    assert returncode == 0, f"exit status {returncode}:\n{log}"
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while (left := {p: c for p, c in started.items() if _is_running(p)}) and (
            time.monotonic() < deadline):
        time.sleep(0.2)
    assert not left, f"still running after fleetlm serve exited: {left}"
