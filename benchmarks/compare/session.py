"""One server session: start a system, warm it up, run the benchmark client for some points,
sample its memory, stop it.

Results land in `OUT/raw/SYSTEM/repeat-R/POINT/results.json` only when the client succeeded (a
failed point is kept as `POINT.failed/` and is run again next time), so an interrupted
comparison resumes where it stopped. The session's own record (start-up time, memory, the
command, errors) is `OUT/raw/SYSTEM/repeat-R/session-KEY.json`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.compare.plan import (
    ClientTarget,
    PlanConfig,
    Point,
    client_argv,
    point_seed,
    warmup_point,
    warmup_seed,
)
from benchmarks.compare.server import MemorySample, ServerProcess, free_port
from benchmarks.compare.systems import Launch, System

CLIENT_TIMEOUT_S = 3600.0
RESULTS_FILE = "results.json"
FAILED_SUFFIX = ".failed"


@dataclass
class SessionRecord:
    system: str
    repeat: int
    key: str
    points: list[str]
    variant: str | None = None
    argv: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    startup_s: float | None = None  # launch -> first GET /v1/models listing a model
    memory_after_warmup: dict | None = None
    memory_end: dict | None = None
    is_port_freed: bool | None = None
    failed_variants: list[str] = field(default_factory=list)
    failed_points: list[str] = field(default_factory=list)
    error: str | None = None


def repeat_dir(out_dir: Path, system: str, repeat: int) -> Path:
    return out_dir / "raw" / system / f"repeat-{repeat}"


def result_path(out_dir: Path, system: str, repeat: int, point: Point) -> Path:
    return repeat_dir(out_dir, system, repeat) / point.key / RESULTS_FILE


def run_client(target: ClientTarget, point: Point, seed: int, result_dir: Path,
               log_path: Path) -> bool:
    """Run `fleetlm bench serve` for `point` into `result_dir`; True if it exited 0 and wrote
    its results (else they are kept in `result_dir.failed`)."""
    staging = result_dir.with_name(result_dir.name + ".running")
    shutil.rmtree(staging, ignore_errors=True)
    argv = client_argv(target, point, seed, str(staging))
    with open(log_path, "a") as log:
        log.write(f"$ python -m fleetlm.bench {' '.join(argv)}\n")
        log.flush()
        try:
            code = subprocess.call([sys.executable, "-m", "fleetlm.bench", *argv], stdout=log,
                                   stderr=subprocess.STDOUT, timeout=CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = -1
    is_success = code == 0 and (staging / RESULTS_FILE).is_file()
    target = result_dir if is_success else result_dir.with_name(result_dir.name + FAILED_SUFFIX)
    shutil.rmtree(target, ignore_errors=True)
    if staging.exists():
        staging.rename(target)
    return is_success


class SessionRunner:
    """Runs sessions of one system; remembers which launch variant worked (e.g. the dtype)."""

    def __init__(self, system: System, plan: PlanConfig, out_dir: Path, base_seed: int) -> None:
        self.system = system
        self.plan = plan
        self.out_dir = out_dir
        self.base_seed = base_seed
        self._first_variant = 0

    def run(self, repeat: int, key: str,
            indexed_points: Sequence[tuple[int, Point]]) -> SessionRecord:
        """Start, warm up, run `indexed_points` (plan index, point), stop; never raises for a
        server that fails: the record says what happened."""
        record = SessionRecord(self.system.name, repeat, key, [p.key for _, p in indexed_points])
        host = self.system.ctx.host
        port = free_port(host)
        variants = self.system.launch_variants(port, indexed_points[0][1].workload)
        server = self._start(record, variants, host, port)
        if server is None:
            return record
        try:
            self._measure(server, record, repeat, indexed_points)
        except RuntimeError as exc:
            record.error = str(exc)
        finally:
            record.is_port_freed = server.stop()
        return record

    def _log(self, repeat: int, key: str) -> Path:
        return self.system.log_dir / f"{self.system.name}-repeat{repeat}-{key}.log"

    def _start(self, record: SessionRecord, variants: list[Launch], host: str, port: int):
        for index in range(self._first_variant, len(variants)):
            launch = variants[index]
            server = ServerProcess(launch.argv, launch.env, self._log(record.repeat, record.key),
                                   host, port, cwd=launch.cwd)
            try:
                record.startup_s = server.wait_ready(self.system.start_timeout_s)
            except RuntimeError as exc:
                record.failed_variants.append(f"{launch.variant}: {str(exc)[-1500:]}")
                server.stop()
                continue
            self._first_variant = index
            record.variant, record.argv = launch.variant, list(launch.argv)
            record.settings = list(launch.settings)
            return server
        record.error = f"no launch variant came up ({len(record.failed_variants)} tried)"
        return None

    def _target(self, server: ServerProcess) -> ClientTarget:
        ctx = self.system.ctx
        return ClientTarget(server.base_url, ctx.model_name, str(ctx.hf_dir),
                            tuple(self.system.client_extra_args))

    def _measure(self, server: ServerProcess, record: SessionRecord, repeat: int,
                 indexed_points: Sequence[tuple[int, Point]]) -> None:
        target, folder = self._target(server), repeat_dir(self.out_dir, self.system.name, repeat)
        log = self._log(repeat, record.key).with_suffix(".client.log")
        warmed = set()
        for index, point in indexed_points:
            if point.workload not in warmed:
                warm = warmup_point(self.plan, point)
                seed = warmup_seed(self.base_seed, repeat, index)
                if not run_client(target, warm, seed, folder / f"warmup-{point.key}", log):
                    raise RuntimeError(f"warm-up for {point.key} failed; see {log}")
                warmed.add(point.workload)
                record.memory_after_warmup = record.memory_after_warmup or _as_dict(server.memory())
            seed = point_seed(self.base_seed, repeat, index)
            if not run_client(target, point, seed, folder / point.key, log):
                record.failed_points.append(point.key)
        record.memory_end = _as_dict(server.memory())


def _as_dict(sample: MemorySample) -> dict:
    return dataclasses.asdict(sample)


def save_record(out_dir: Path, record: SessionRecord) -> Path:
    path = repeat_dir(out_dir, record.system, record.repeat) / f"session-{record.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(record), indent=1) + "\n")
    return path
