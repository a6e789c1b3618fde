"""Install steps of the reference systems: logged commands, virtual environments, stamps.

Every step is idempotent: a stamp file records what was installed (the requirement and the
steps' version); a step whose stamp matches is skipped. Installs and builds run under
`nice -n 19` so that they never take the CPU from anything else on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

NICE = ("nice", "-n", "19")
LOG_TAIL_CHARS = 4000
STAMP_FILE = ".compare-installed"


def log_line(log_path: Path, text: str) -> None:
    with open(log_path, "a") as log:
        log.write(text.rstrip("\n") + "\n")


def run_logged(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
               cwd: Path | None = None, is_niced: bool = True) -> float:
    """Run `argv` with its output appended to `log_path`; seconds taken.

    RuntimeError with the log's tail when it fails.
    """
    command = [*NICE, *argv] if is_niced else list(argv)
    log_line(log_path, f"$ {' '.join(map(str, command))}")
    start = time.monotonic()
    with open(log_path, "ab") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                               env=None if env is None else dict(env), stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    log_line(log_path, f"# exit {code} after {elapsed:.1f} s")
    if code != 0:
        tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"{argv[0]} failed with exit code {code}; log {log_path}:\n{tail}")
    return elapsed


def stamp_matches(folder: Path, want: str) -> bool:
    try:
        return (folder / STAMP_FILE).read_text() == want
    except FileNotFoundError:
        return False


def write_stamp(folder: Path, want: str) -> None:
    (folder / STAMP_FILE).write_text(want)


def make_venv(python: str, venv: Path, log_path: Path) -> Path:
    """A fresh virtual environment at `venv` (an old one is removed); its python."""
    if venv.exists():
        shutil.rmtree(venv)
    run_logged([python, "-m", "venv", str(venv)], log_path)
    return venv / "bin" / "python"


def venv_env(venv: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with `venv` activated instead of the project's one."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def find_file(root: Path, name: str) -> Path | None:
    """The first file called `name` below `root` (sorted walk, so the answer is stable)."""
    for path in sorted(root.rglob(name)):
        if path.is_file():
            return path
    return None


def ensure_debian_package(package: str, library: str, log_path: Path) -> Path:
    """The path of shared library `library`, installing Debian's `package` if it is missing."""
    found = find_library(library)
    if found is None:
        run_logged(["apt-get", "update"], log_path)
        run_logged(["apt-get", "install", "-y", "--no-install-recommends", package], log_path,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = find_library(library)
    if found is None:
        raise RuntimeError(f"{library} not found after installing {package}")
    return found


def find_library(library: str) -> Path | None:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu"):
        path = Path(folder) / library
        if path.exists():
            return path
    return None


def command_output(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """stdout+stderr of a short command (versions); empty on failure."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False,
                              env=None if env is None else dict(env))
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()
