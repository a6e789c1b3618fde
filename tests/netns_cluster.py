"""A two-node Ray cluster on one machine: each node in its own network namespace, the two
joined by a veth pair, so everything between them crosses a "network" link.

    with TwoNodeNetwork.create() as net, RayNodes(net, temp_dir, num_cpus_per_node=2) as nodes:
        net.run_in(net.head, [nodes.python, "driver.py", nodes.address], nodes.env, timeout)

Needs root and iproute2's `ip`. Nothing here touches the root namespace's network or its
Ray processes: the veth pair is made inside the namespaces, every Ray port is bound inside
them, and teardown signals only processes that live in our namespaces. (`ray stop` is no
use here: it kills every Ray process on the machine, whatever namespace it runs in.)

Reusable outside pytest (e.g. for a `ray up` test): errors are `MultihostSetupError`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_PREFIX = "10.213.0"  # private; lives only inside our two namespaces
PREFIX_LENGTH = 24
IP_TIMEOUT_S = 30.0
RAY_START_TIMEOUT_S = 180.0  # a cold start on 2 busy cores
STOP_GRACE_S = 15.0
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB
NAME_PREFIX = "fleetlm-mh"


class MultihostSetupError(RuntimeError):
    """The namespaces or the Ray nodes could not be made; the message says which step."""


def check_prerequisites() -> None:
    """Raise `MultihostSetupError` naming what is missing (never skip silently)."""
    if shutil.which("ip") is None:
        raise MultihostSetupError(
            "multi-host tests need iproute2's `ip` command (Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        raise MultihostSetupError("multi-host tests make network namespaces: run them as root")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if result.returncode:
        raise MultihostSetupError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Namespace:
    name: str
    interface: str
    ip: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        result = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                                text=True, timeout=IP_TIMEOUT_S)
        return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


@dataclass
class TwoNodeNetwork:
    """Namespaces `head` and `worker` with `lo` up and a veth pair between them."""

    head: Namespace
    worker: Namespace
    _made: list[str] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def create(cls) -> Iterator[TwoNodeNetwork]:
        check_prerequisites()
        tag = f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        net = cls(Namespace(f"{tag}-head", "veth-head", f"{SUBNET_PREFIX}.1"),
                  Namespace(f"{tag}-worker", "veth-worker", f"{SUBNET_PREFIX}.2"))
        try:
            net._build()
            yield net
        finally:
            net.remove()

    def _build(self) -> None:
        for ns in (self.head, self.worker):
            _ip("netns", "add", ns.name)
            self._made.append(ns.name)
        # Made inside the head namespace with its peer inside the worker one: the interface
        # names never appear in (or collide with anything in) the root namespace.
        _ip("-n", self.head.name, "link", "add", self.head.interface, "type", "veth",
            "peer", "name", self.worker.interface, "netns", self.worker.name)
        for ns in (self.head, self.worker):
            _ip("-n", ns.name, "addr", "add", f"{ns.ip}/{PREFIX_LENGTH}", "dev", ns.interface)
            _ip("-n", ns.name, "link", "set", ns.interface, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")

    def add_default_routes(self) -> None:
        """Route everything through the veth, as a LAN machine routes through its gateway.

        Ray finds a node's own address by asking the kernel which source address a UDP
        socket "connected" to 8.8.8.8 would use (no packet is sent); without a default route
        that fails and `ray start` falls back to the hostname's address. The namespaces have
        no link to anything but each other, so nothing can leave them either way."""
        for ns in (self.head, self.worker):
            _ip("-n", ns.name, "route", "add", "default", "dev", ns.interface)

    def remove(self) -> None:
        """Stop whatever still runs in the namespaces, then delete them (the veth pair goes
        with them). Safe to call twice and after a half-made set-up."""
        stop_processes([self.head, self.worker][:len(self._made)])
        errors = []
        while self._made:
            name = self._made.pop()
            result = subprocess.run(["ip", "netns", "del", name], capture_output=True,
                                    text=True, timeout=IP_TIMEOUT_S)
            if result.returncode:
                errors.append(f"{name}: {result.stderr.strip()}")
        if errors:
            raise MultihostSetupError(f"could not delete network namespaces: {errors}")

    def run_in(self, ns: Namespace, argv: Sequence[str], env: dict[str, str],
               timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*ns.exec_prefix(), *argv], env=env, cwd=cwd, timeout=timeout,
                              capture_output=True, text=True)


def stop_processes(namespaces: Sequence[Namespace], grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM the processes in `namespaces` in `ray stop`'s order (raylets, so they end
    their workers; then the rest; the GCS last: agents that lose it first linger), SIGKILL
    what is left. Returns the pids still alive at the end (none, unless a process is stuck
    in the kernel)."""

    def alive() -> list[int]:
        return [pid for ns in namespaces for pid in ns.pids() if pid != os.getpid()]

    def named(is_in: bool, *names: str) -> list[int]:
        return [pid for pid in alive() if (_process_name(pid) in names) == is_in]

    for bucket in ((True, "raylet"), (False, "gcs_server"), (True, "gcs_server")):
        pids = named(*bucket)
        _signal_all(pids, signal.SIGTERM)
        _wait_gone(pids, grace_s / 3)
    _signal_all(alive(), signal.SIGKILL)
    _wait_gone(alive(), 5.0)
    return alive()


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_is_running(pid) for pid in pids):
            return
        time.sleep(0.1)


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and _is_running(int(entry.name)):
            found.append((int(entry.name), cmdline.strip()))
    return found


def ray_environment(base: dict[str, str], token_path: Path) -> dict[str, str]:
    """`base` without anything that points at another Ray cluster, plus token authentication
    with our own token file (Ray 2.60's default for new clusters is token auth; a `ray start`
    only turns it on when it finds a token, so name it explicitly for every process)."""
    env = {k: v for k, v in base.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "RAY_TMPDIR"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_USAGE_STATS_ENABLED="0",
               # The project's scripts and tests set it to 0 to keep local clusters on
               # 127.0.0.1; at 0 Ray also refuses `ray start --address` (a second node).
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    return env


class RayNodes:
    """A Ray head in `net.head` and a Ray worker node in `net.worker`, sharing `temp_dir`.

    `address` is the GCS address for `ray.init(address=...)`; `env` the environment every
    process of this cluster (drivers included) must run with."""

    def __init__(self, net: TwoNodeNetwork, temp_dir: Path, num_cpus_per_node: int,
                 gcs_port: int = 6379, base_env: dict[str, str] | None = None) -> None:
        self.net = net
        self.temp_dir = temp_dir
        self.address = f"{net.head.ip}:{gcs_port}"
        self.python = sys.executable  # the venv's: Ray runs its workers with the same
        token_path = temp_dir / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        self.env = ray_environment(dict(os.environ if base_env is None else base_env),
                                   token_path)
        common = ["--num-cpus", str(num_cpus_per_node), "--object-store-memory",
                  str(OBJECT_STORE_BYTES), "--temp-dir", str(temp_dir)]
        # The worker node starts together with the head: give it as long to find the GCS
        # (one try a second; Ray's default is 20) as the head may take on a busy machine.
        joining_env = dict(self.env, RAY_NUM_REDIS_GET_RETRIES=str(int(RAY_START_TIMEOUT_S)))
        self._starts = [
            (net.head, self.env, ["--head", "--node-ip-address", net.head.ip, "--port",
                                  str(gcs_port), "--include-dashboard=false",
                                  "--disable-usage-stats", *common]),
            (net.worker, joining_env, ["--address", self.address, "--node-ip-address",
                                       net.worker.ip, *common]),
        ]

    def __enter__(self) -> RayNodes:
        try:
            # Both at once: the worker node's `ray start` waits for the head's GCS itself.
            with ThreadPoolExecutor(len(self._starts)) as pool:
                starts = [pool.submit(self._start, *start) for start in self._starts]
            for start in starts:
                start.result()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _start(self, ns: Namespace, env: dict[str, str], args: list[str]) -> None:
        ray = str(Path(self.python).with_name("ray"))
        try:
            result = self.net.run_in(ns, [ray, "start", *args], env, RAY_START_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise MultihostSetupError(f"`ray start` in {ns.name} took over "
                                      f"{RAY_START_TIMEOUT_S:.0f} s") from exc
        if result.returncode:
            raise MultihostSetupError(f"`ray start {' '.join(args)}` in {ns.name} failed "
                                      f"({result.returncode}):\n{result.stdout[-3000:]}\n"
                                      f"{result.stderr[-3000:]}")

    def stop(self) -> None:
        """Stop this cluster's processes (only those in our namespaces) and check that none
        is left, here or anywhere on the machine under our temp dir."""
        stuck = stop_processes([self.net.head, self.net.worker])
        leftovers = processes_mentioning(str(self.temp_dir))
        if stuck or leftovers:
            raise MultihostSetupError(f"Ray processes survived the stop: {stuck} {leftovers}")
