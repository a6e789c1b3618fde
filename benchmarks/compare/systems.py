"""The systems under comparison: what each one needs to be installed, started and benchmarked.

A `System` installs itself (idempotently, into the work dir), says how to start its server for a
workload (`launch_variants`: alternatives tried in order, e.g. bfloat16 then float32 for vLLM),
which workloads can share one server start (`session_key`), and which extra client options it
needs. The orchestration (compare.py) is the same for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Context:
    """What every system needs to know about this comparison."""

    repo_root: Path
    work_dir: Path  # installs and builds (default ~/.cache/fleetlm/compare)
    out_dir: Path  # results and logs of this comparison
    host: str
    model_name: str  # the name every server serves the model under
    hf_dir: Path  # the built-in GGUF converted to a bf16 Hugging Face folder
    gguf_path: Path  # the built-in Q4_1 GGUF
    python: str  # base interpreter for new virtual environments
    num_threads: int
    max_concurrency: int  # the largest concurrency of the plan (slots, sequences)
    eos_token_ids: tuple[int, ...]  # end-of-generation ids, banned for servers that need it


@dataclass(frozen=True)
class Launch:
    """One way to start a server: the command, its environment and a name for the record."""

    argv: tuple[str, ...]
    env: dict[str, str]
    variant: str  # e.g. "bfloat16"
    cwd: Path | None = None
    settings: tuple[str, ...] = field(default=())  # human-readable settings for the report


class System(ABC):
    name: str
    start_timeout_s: float
    client_extra_args: tuple[str, ...] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @property
    def log_dir(self) -> Path:
        path = self.ctx.out_dir / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def install_log(self) -> Path:
        return self.log_dir / f"{self.name}-install.log"

    @abstractmethod
    def install(self) -> None:
        """Make the system runnable; skip what is already done. RuntimeError on failure."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions worth recording (package, build, torch ...)."""

    @abstractmethod
    def launch_variants(self, port: int, workload: str) -> list[Launch]:
        """Ways to start the server for `workload` on `port`, best first."""

    def session_key(self, workload: str) -> str:
        """Workloads with equal keys are run on one server start."""
        return "all"
