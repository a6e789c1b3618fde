"""`fleetlm serve CONFIG` as a user runs it: a real process that starts its own Ray cluster,
serves the built-in model with the routes in the engine replica, and on SIGTERM stops Serve and
every Ray process it started, then exits 0 (test_serve_anywhere.py checks the same of the
default config, served without arguments).

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
from pathlib import Path

import processes
import pytest
import requests
import yaml

pytestmark = pytest.mark.slow  # a Ray cluster and the built-in model: ~30 s on 2 cores

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
READY_LINE = "fleetlm is serving"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0  # Serve stops its replicas gracefully, then Ray stops


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve_config(tmp_path) -> tuple[Path, int]:
    """configs/default.yaml on a free port, with a small KV cache, with the routes in the
    engine replica (the default, an ingress of its own behind Serve's proxy, is what
    test_serve_anywhere.py's serve without arguments checks the same way)."""
    data = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    port = _free_port()
    data["http"]["port"] = port
    data["http"]["ingress"] = "in_replica"
    data["engine"]["kv_cache_memory_bytes"] = "16MiB"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, port


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
    config, port = serve_config
    proc, lines = _start(config)
    try:
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert health.status_code == 200
        # Ray listens on loopback only, not on the machine's network address.
        assert any("Ray cluster: 127.0.0.1:" in line for line in lines), lines[-10:]
        started = processes.descendants(proc.pid)
        assert any("raylet" in cmd for cmd in started.values()), started
        # With the routes in the engine replica, the replica itself owns the port (Serve's
        # direct ingress), and answers there.
        owner = started.get(processes.listener(port, started), "")
        assert "ServeReplica" in owner, (owner, started)
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
    processes.assert_all_gone(started)
