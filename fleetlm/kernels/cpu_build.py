"""Compile a plain C source into a shared library at first use and load it with ctypes.

The library lands in a cache directory keyed by a hash of the source (with the `*.h` headers
beside it), the compiler and its flags, and this host's CPU features (the flags include
`-march=native`), so each build happens once per machine and a changed source never loads a
stale binary. Concurrent builders are safe: each compiles into its own temporary file and
renames it into place atomically, so a reader only ever sees a whole library.

A library may link several sources (`linked`): one that calls the kernels of the others,
as `csrc/decode_stack.c` does; all of them key its cache entry.

Cache directory: `$FLEETLM_CACHE_DIR/kernels`, else `~/.cache/fleetlm/kernels`.
Compiler: `$CC`, else `cc`, `gcc` or `clang` from PATH.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "FLEETLM_CACHE_DIR"
COMPILER_ENV = "CC"
DEFAULT_COMPILERS = ("cc", "gcc", "clang")
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """The C compiler is missing or rejected the source."""


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "fleetlm"
    return base / "kernels"


def find_compiler() -> str:
    """The C compiler to use; raises BuildError when there is none."""
    named = os.environ.get(COMPILER_ENV)
    candidates = (named,) if named else DEFAULT_COMPILERS
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(f"no C compiler found (tried {', '.join(candidates)})")


def has_cpu_flag(flag: str) -> bool:
    """Whether this host's CPU lists `flag` (as /proc/cpuinfo names it: avx512_bf16, amx_bf16)."""
    return flag in _cpu_features().split()


def _cpu_features() -> str:
    """This host's CPU flags, since `-march=native` binaries are only valid on the same CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def library_path(source: Path, compiler: str, flags: tuple[str, ...],
                 linked: tuple[Path, ...] = ()) -> Path:
    """The cache path of `source` (with the sources `linked` into it) built by `compiler`
    with `flags` on this host."""
    digest = hashlib.sha256()
    headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]
    sources = [path.read_bytes() for path in (source, *linked)]
    for part in (*sources, *headers, compiler.encode(), " ".join(flags).encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(_cpu_features().encode())
    return cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def build(source: Path, flags: tuple[str, ...] = COMPILE_FLAGS,
          linked: tuple[Path, ...] = ()) -> Path:
    """Compile `source` (with the sources `linked` into the same library, whose functions it
    calls) unless the cache already holds it; returns the library's path."""
    compiler = find_compiler()
    target = library_path(source, compiler, flags, linked)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        _compile(compiler, (source, *linked), flags, Path(tmp_name))
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    logger.info("compiled %s into %s", source.name, target)
    return target


def _compile(compiler: str, sources: tuple[Path, ...], flags: tuple[str, ...],
             output: Path) -> None:
    command = [compiler, *flags, *map(str, sources), "-o", str(output), "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{' '.join(command)} failed: {exc}") from exc
    if done.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")


def load(source: Path, flags: tuple[str, ...] = COMPILE_FLAGS,
         linked: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """Build (if needed) and load `source` (and `linked`); on any failure log a warning and
    return None.

    Callers cache the result, so the warning appears once per process and source.
    """
    try:
        return ctypes.CDLL(str(build(source, flags, linked)))
    except (BuildError, OSError) as exc:
        logger.warning("C kernels in %s unavailable, using the torch reference: %s",
                       source.name, exc)
        return None
