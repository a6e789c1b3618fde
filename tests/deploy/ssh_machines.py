"""Two SSH "machines" and a "laptop" on this host, for a real `ray up` (tests/deploy).

    with TwoNodeNetwork.create() as net, SshMachines(net, base_dir, cache_dir) as machines:
        machines.run_on_laptop(["ray", "up", "-y", "cluster.yaml"], timeout=600)

Each machine is a network namespace of `net` (joined to the other by the veth pair) holding
a PID and mount namespace of its own, whose init (`machine_init.py`) gives it a private
/root, /tmp, /run and /dev/shm and runs Debian's sshd on the machine's address. The laptop
is a third PID and mount namespace in the head's network namespace: it reaches the head's
sshd and HTTP port as a machine on the head's LAN would. Root logs in with one key pair,
made here (the laptop's ~/.ssh/id_ed25519).

Nothing escapes: `ray stop`, which `ray up` and `ray down` run on the machines, kills Ray
processes by name but sees only its own machine's /proc; each machine's processes end with
its init, and `stop` checks that none is left in the namespaces. Needs root, iproute2,
util-linux's unshare and openssh-server (scripts/test installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from netns_cluster import MultihostSetupError, Namespace, TwoNodeNetwork, stop_processes

INIT = Path(__file__).with_name("machine_init.py")
SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
SSHD_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 40.0
# The laptop's environment: what a login shell would have, nothing of this test session's
# Ray cluster (RAY_ADDRESS, tokens) or of pytest.
LAPTOP_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TERM")

SSHD_CONFIG = """\
ListenAddress {ip}:{port}
HostKey {root}/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
# `ray up` opens many connections at once (rsync, commands, the autoscaler's updaters)
MaxStartups 100
MaxSessions 100
"""


def check_prerequisites() -> None:
    """Raise `MultihostSetupError` naming what is missing (never skip silently)."""
    needs = {"openssh-server": Path(SSHD).exists(), "openssh-client": shutil.which("ssh-keygen"),
             "rsync": shutil.which("rsync"), "util-linux": shutil.which("unshare")}
    missing = [package for package, found in needs.items() if not found]
    if missing:
        raise MultihostSetupError(f"the `ray up` test needs Debian's {', '.join(missing)} "
                                  f"(scripts/test installs them)")


@dataclass
class Machine:
    name: str
    ns: Namespace
    root: Path  # home/, tmp/, sshd_config, host key, init.log
    proc: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"


class SshMachines:
    """`head` and `worker` run sshd; `run_on_laptop` runs commands beside the head."""

    def __init__(self, net: TwoNodeNetwork, base_dir: Path, cache_dir: Path | None) -> None:
        check_prerequisites()
        self.net = net
        self.base_dir = base_dir
        self.head = Machine("head", net.head, base_dir / "head")
        self.worker = Machine("worker", net.worker, base_dir / "worker")
        self.laptop = Machine("laptop", net.head, base_dir / "laptop")
        self.machines = (self.head, self.worker)
        self.cache_dir = cache_dir
        self.key = self.laptop.home / ".ssh" / "id_ed25519"

    def __enter__(self) -> SshMachines:
        try:
            self._make_files()
            for machine in self.machines:
                self._start(machine)
            for machine in self.machines:
                self._wait_for_sshd(machine)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _make_files(self) -> None:
        for machine in (*self.machines, self.laptop):
            (machine.home / ".ssh").mkdir(parents=True, mode=0o700)
            (machine.root / "tmp").mkdir(mode=0o1777)
            (machine.root / "tmp").chmod(0o1777)
            (machine.home / ".bashrc").write_text("")  # `ray up` sources it before each command
            (machine.root / "shared-paths").write_text("\n".join(map(str, self._shared_paths())))
        _keygen(self.key)
        authorized_keys = self.base_dir / "authorized_keys"
        shutil.copy(self.key.with_suffix(".pub"), authorized_keys)
        for machine in self.machines:
            _keygen(machine.root / "ssh_host_ed25519_key")
            (machine.root / "sshd_config").write_text(SSHD_CONFIG.format(
                ip=machine.ns.ip, port=SSH_PORT, root=machine.root,
                authorized_keys=authorized_keys))

    def _shared_paths(self) -> list[Path]:
        """What the machines must see of the real /root: Python (pyenv lives there) and the
        model cache (so no machine converts the built-in model again)."""
        home = Path("/root")
        paths = [Path(sys.base_prefix).resolve()]
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            paths.append(self.cache_dir.resolve())
        return [p for p in paths if p.is_relative_to(home) and p != home]

    def _start(self, machine: Machine) -> None:
        log = open(machine.root / "init.log", "wb")
        machine.proc = subprocess.Popen(
            [*_machine_prefix(machine), "serve"], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=_clean_env())
        log.close()

    def _wait_for_sshd(self, machine: Machine) -> None:
        deadline = time.monotonic() + SSHD_START_TIMEOUT_S
        probe = (f"import socket; socket.create_connection(('{machine.ns.ip}', {SSH_PORT}), 1)")
        while time.monotonic() < deadline:
            if machine.proc.poll() is not None:
                break
            result = self.net.run_in(machine.ns, [sys.executable, "-c", probe], _clean_env(), 10)
            if result.returncode == 0:
                return
            time.sleep(0.2)
        raise MultihostSetupError(f"sshd of {machine.name} did not start:\n"
                                  f"{(machine.root / 'init.log').read_text()[-3000:]}")

    def run_on_laptop(self, argv: Sequence[str], timeout: float,
                      env: dict[str, str] | None = None, cwd: str | None = None
                      ) -> subprocess.CompletedProcess:
        """Run argv on the laptop (HOME=/root is the laptop's own); raises TimeoutExpired."""
        full_env = _clean_env() | (env or {})
        return subprocess.run([*_machine_prefix(self.laptop), "run", *argv], env=full_env,
                              cwd=cwd, timeout=timeout, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """End both machines (their init signals everything in them), then make sure no
        process is left in their network namespaces."""
        for machine in self.machines:
            if machine.proc is not None and machine.proc.poll() is None:
                init = _child_of(machine.proc.pid)
                os.kill(init or machine.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for machine in self.machines:
            if machine.proc is not None:
                try:
                    machine.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    machine.proc.kill()  # --kill-child: its init gets SIGKILL, and so all
                    machine.proc.wait(10)
        stuck = stop_processes([self.net.head, self.net.worker])
        if stuck:
            raise MultihostSetupError(f"processes survived the machines' stop: {stuck}")

    def ray_processes(self, machine: Machine) -> list[str]:
        """Names of the Ray processes running on `machine` (its network namespace)."""
        names = []
        for pid in machine.ns.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            text = cmdline.decode(errors="replace")
            if any(word in text for word in RAY_PROCESS_WORDS):
                names.append(f"{pid}: {text[:150]}")
        return names


# What `ray stop` looks for, among others: enough to tell whether Ray still runs somewhere.
RAY_PROCESS_WORDS = ("raylet", "gcs_server", "monitor.py", "dashboard", "log_monitor",
                     "ray::", "default_worker.py", "runtime_env/agent")


def _machine_prefix(machine: Machine) -> list[str]:
    return [*machine.ns.exec_prefix(), "unshare", "--pid", "--fork", "--mount-proc",
            "--kill-child", sys.executable, str(INIT), str(machine.root)]


def _clean_env() -> dict[str, str]:
    env = {key: os.environ[key] for key in LAPTOP_ENV_KEEP if key in os.environ}
    env.update(HOME="/root", USER="root", LOGNAME="root", SHELL="/bin/bash")
    return env


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetlm-test",
                    "-f", str(path)], check=True, capture_output=True, timeout=30)


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None
