"""Serving benchmark: `fleetlm bench serve` against any OpenAI-compatible server.

workloads.py / prompts.py  seeded request lists (random, shared-prefix, multi-turn)
client.py                  one streamed request -> a raw `RequestRecord`
runner.py                  arrival patterns (concurrency cap, Poisson), sweeps
metrics.py                 throughput, TTFT/TPOT/ITL/E2EL statistics, goodput, token checks
report.py / plots.py       JSON, Markdown, PNG
cli.py                     the command line (`main(argv)`)

Its HTTP client and plots need the `bench` extra (`pip install 'fleetlm[bench]'`); `run` checks
for it before anything imports them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

EXTRA_MODULES = ("aiohttp", "matplotlib")  # the `bench` extra in pyproject.toml
INSTALL_HINT = "pip install 'fleetlm[bench]'"


def missing_extra_modules() -> list[str]:
    """The `bench` extra's modules that cannot be imported here."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def run(argv: Sequence[str] | None = None) -> int:
    """`fleetlm bench ...`: the benchmark CLI, or exit status 1 naming what to install."""
    missing = missing_extra_modules()
    if missing:
        print(f"fleetlm bench needs {' and '.join(missing)}, which come with the bench extra: "
              f"{INSTALL_HINT}", file=sys.stderr)
        return 1
    from fleetlm.bench.cli import main

    return main(None if argv is None else list(argv))
