"""Where converted models live, how a cache entry is named, and how one is published atomically.

Layout: `<cache root>/models/<name>-<key>/`, the cache root being `$FLEETLM_CACHE_DIR` or
`~/.cache/fleetlm`. The key covers the source file's identity (absolute path, size, mtime) and
the converter version, so an edited file or a newer converter gets a fresh entry. An entry is
built in a hidden temporary folder next to it and renamed into place: the final folder either
does not exist or is complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_DIR_ENV = "FLEETLM_CACHE_DIR"
KEY_LENGTH = 16  # hex digits of the sha256 kept in a folder name
ENTRY_MODE = 0o755
FILE_MODE = 0o644

logger = logging.getLogger("fleetlm.weights")


def default_cache_dir() -> Path:
    """The folder holding converted models: `$FLEETLM_CACHE_DIR/models` or
    `~/.cache/fleetlm/models`."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fleetlm"
    return base / "models"


def cache_key(source: Path, converter_version: int) -> str:
    """A short hash of the source file's identity and the converter version."""
    stat = source.stat()
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{converter_version}"
    return hashlib.sha256(identity.encode()).hexdigest()[:KEY_LENGTH]


def get_or_create(entry: Path, build: Callable[[Path], None]) -> Path:
    """Return `entry`, first calling `build(tmp_dir)` and renaming tmp_dir to `entry` if it is
    missing. A failed build leaves nothing behind; when two processes build at once, the
    first rename wins and the other discards its copy."""
    if entry.is_dir():
        logger.info("Using cached model %s", entry)
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        build(tmp_dir)
        _make_readable(tmp_dir)
        return publish(tmp_dir, entry)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp (and safetensors) create private files; a cache entry is readable by all."""
    folder.chmod(ENTRY_MODE)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(FILE_MODE)


def publish(tmp_dir: Path, entry: Path) -> Path:
    """Atomically rename a complete `tmp_dir` to `entry`, or keep an `entry` that another
    process published first (the caller removes `tmp_dir` then)."""
    try:
        os.rename(tmp_dir, entry)
    except OSError:
        if not entry.is_dir():
            raise
        logger.info("Another process converted %s first; using it", entry)
    return entry
