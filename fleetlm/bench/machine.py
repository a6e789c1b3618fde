"""The machine a benchmark ran on, for its report: `docs/benchmarks.md` names the CPU of
every figure, since figures from different machines must never be compared."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """`lscpu`'s model name (e.g. "AMD EPYC"), else what Python's platform module says."""
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    except OSError:
        out = ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), platform.processor() or platform.machine())
