"""PID 1 of one test "machine": a PID and mount namespace inside a network namespace.

    ip netns exec NS unshare --pid --fork --mount-proc python machine_init.py ROOT serve
    ip netns exec NS unshare --pid --fork --mount-proc python machine_init.py ROOT run CMD...

First it gives the machine its own filesystem view, private to its mount namespace:

    /root      ROOT/home (the machine's home: ~/.ray, ~/ray_bootstrap_*, ~/.cache/fleetlm)
    /tmp       ROOT/tmp  (Ray's /tmp/ray: sessions, sockets, `ray up`'s cluster state)
    /run, /dev/shm       empty tmpfs (sshd's /run/sshd; Ray's object store files)

The paths listed in `ROOT/shared-paths` (under the real /root: the Python installation the
venv links to, the fleetlm model cache) are bound into the machine's home first, so every
machine runs the same Python and shares one model cache. Then `serve` runs sshd (`ROOT/sshd_config`) until SIGTERM,
and `run` runs CMD (the "laptop" side: `ray up`, `ray exec`, `ray down`) and exits with its
status. Either way, on the way out it signals every other process of the machine (so
`ray start`'s daemons, ssh control masters and the like end with it), reaping orphans all
along as an init must. Whatever still lives when PID 1 exits is killed by the kernel.

Because the machine has its own PID namespace and /proc, `ray stop` run here (by `ray up` or
`ray down`) sees and kills only this machine's Ray processes, never the rest of the host's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_GRACE_S = 10.0
SSHD = "/usr/sbin/sshd"


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def make_filesystem(root: Path) -> None:
    home = Path("/root")
    for line in (root / "shared-paths").read_text().split():
        shared = Path(line)  # a path under the real /root the machine must see as it is
        target = root / "home" / shared.relative_to(home)
        target.mkdir(parents=True, exist_ok=True)
        mount("--bind", str(shared), str(target))
    mount("--rbind", str(root / "home"), str(home))
    mount("--bind", str(root / "tmp"), "/tmp")
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    Path("/run/sshd").mkdir(mode=0o755)
    mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm")


def reap() -> list[tuple[int, int]]:
    """Collect every exited child (orphans re-parented to us included)."""
    exited = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited
        if pid == 0:
            return exited
        exited.append((pid, status))


def others_alive() -> bool:
    return any(p.isdigit() and p != "1" and _is_running(p) for p in os.listdir("/proc"))


def _is_running(pid: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_everything() -> None:
    """SIGTERM all other processes of the machine, then SIGKILL what is left."""
    for sig, grace_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.kill(-1, sig)  # in a PID namespace: every process of it but this one
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            reap()
            if not others_alive():
                return
            time.sleep(0.1)


def supervise(argv: list[str]) -> int:
    """Run argv as a child until it exits or we get SIGTERM; return its exit status."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    child = subprocess.Popen(argv)
    while not stopping:
        for pid, status in reap():
            if pid == child.pid:
                stop_everything()
                return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    stop_everything()
    return 128 + signal.SIGTERM


def main(root: str, mode: str, *command: str) -> int:
    root_path = Path(root)
    make_filesystem(root_path)
    if mode == "serve":
        return supervise([SSHD, "-D", "-e", "-f", str(root_path / "sshd_config")])
    if mode == "run":
        return supervise(list(command))
    raise SystemExit(f"unknown mode {mode!r}: serve or run")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
