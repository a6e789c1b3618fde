"""Where a served benchmark run's CPU time goes: per process (read from /proc) and, inside the
engine replica, per part of fleetlm (py-spy samples of its Python threads).

    fleetlm serve configs/bench-cpu.yaml &          # any running `fleetlm serve` on this host
    python benchmarks/profile_serve.py --out benchmarks/results/profile-c32 -- \\
        --base-url http://127.0.0.1:8000 --workload random --input-len 256 --output-len 128 \\
        --num-prompts 64 --max-concurrency 32 --continuous-usage \\
        --tokenizer smollm2-135m-instruct

Everything after `--` goes to `python -m fleetlm.bench serve` (its results land in OUT/bench).
While that client runs, py-spy samples the engine replica (`--nonblocking`: the replica is
never paused). Writes OUT/profile.md: CPU seconds per process group over the client's run, the
machine's busy share, and the replica's py-spy samples by part of the code (each sample goes
to the innermost fleetlm frame of its stack, so a matrix product counts where the layer calls
it). The raw collapsed stacks are kept in OUT/replica.txt (flamegraph.pl or speedscope read
them).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Process groups by command line, first match wins.
PROCESS_GROUPS = (
    ("ray::ServeReplica:", "LLMServer", "engine replica"),
    ("ray::ServeReplica:", "Ingress", "ingress (FastAPI)"),
    ("ray::ProxyActor", "", "HTTP proxy"),
    ("ray::ServeController", "", "Serve controller"),
    ("fleetlm.bench serve", "", "bench client"),
    ("fleetlm serve", "", "fleetlm serve driver"),
    ("py-spy", "", "py-spy"),
    ("ray", "", "Ray daemons (GCS, raylet, dashboard, agents)"),
)
# Parts of the code, by the file of the innermost fleetlm frame; first match wins.
CODE_PARTS = (
    ("fleetlm/parallel/layers.py", "linear layers (GEMM)"),
    ("fleetlm/kernels/cpu_linear.py", "linear layers (GEMM)"),
    ("fleetlm/kernels/gguf_linear.py", "linear layers (GEMM)"),
    ("fleetlm/kernels/int8_linear.py", "linear layers (GEMM)"),
    ("fleetlm/kernels/fp8_linear.py", "linear layers (GEMM)"),
    ("fleetlm/kernels/fused_ops.py", "norms, RoPE, SiLU"),
    ("fleetlm/kernels/", "attention kernel"),
    ("fleetlm/executor/attention.py", "attention wrapper (metadata, KV writes)"),
    ("fleetlm/executor/models/ops.py", "norms, RoPE, SiLU"),
    ("fleetlm/executor/models/", "model (other)"),
    ("fleetlm/executor/sampler.py", "sampler"),
    ("fleetlm/executor/sampling_metadata.py", "sampler"),
    ("fleetlm/executor/model_runner.py", "model runner (inputs, outputs)"),
    ("fleetlm/executor/input_batch.py", "model runner (inputs, outputs)"),
    ("fleetlm/executor/detokenizer.py", "detokenize, request outputs"),
    ("fleetlm/executor/output_processor.py", "detokenize, request outputs"),
    ("fleetlm/executor/scheduler.py", "scheduler, KV blocks"),
    ("fleetlm/executor/scheduled_batch.py", "scheduler, KV blocks"),
    ("fleetlm/executor/kv_cache_manager.py", "scheduler, KV blocks"),
    ("fleetlm/executor/block_pool.py", "scheduler, KV blocks"),
    ("fleetlm/executor/", "engine (other)"),
    ("fleetlm/cluster/", "fleetlm serving code (replica side)"),
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def process_group(cmdline: str) -> str | None:
    for marker, also, group in PROCESS_GROUPS:
        if marker in cmdline and also in cmdline:
            return group
    return None


def code_part(stack: Sequence[str]) -> str:
    """The part of the code a sample belongs to: by its innermost fleetlm frame, else by
    whether Ray or asyncio code is on the stack."""
    files = []
    for frame in stack:
        match = _FRAME.match(frame)
        files.append(match["file"] if match else frame)
    for file in reversed(files):
        for prefix, part in CODE_PARTS:
            if prefix in file:
                return part
    if any("ray/serve" in f for f in files):
        return "Ray Serve (replica side)"
    if any("/ray/" in f or f.startswith("ray/") for f in files):
        return "Ray core (replica side)"
    if any("asyncio" in f for f in files):
        return "asyncio"
    return "other"


def parts_from_collapsed(lines: Iterable[str]) -> Counter:
    """Samples per code part from py-spy's raw output (`frame;frame;... count`, outermost
    first; with `--threads` the first frame names the thread and is ignored here)."""
    parts: Counter = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        parts[code_part(stack.split(";"))] += int(count)
    return parts


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of one process (all its threads) so far, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def processes() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                found[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _snapshot() -> dict[int, tuple[str, float]]:
    result = {}
    for pid, cmdline in processes().items():
        seconds = cpu_seconds(pid)
        if seconds is not None:
            result[pid] = (cmdline, seconds)
    return result


def group_cpu(before: Mapping[int, tuple[str, float]],
              after: Mapping[int, tuple[str, float]]) -> Counter:
    """CPU seconds spent between two snapshots, summed per process group (unknown ones as
    "other processes"; a process that started in between counts from zero)."""
    groups: Counter = Counter()
    for pid, (cmdline, seconds) in after.items():
        spent = seconds - before.get(pid, (cmdline, 0.0))[1]
        if spent > 0:
            groups[process_group(cmdline) or "other processes"] += spent
    return groups


def find_replica(procs: Mapping[int, str]) -> int:
    pids = [pid for pid, cmd in procs.items() if process_group(cmd) == "engine replica"]
    if len(pids) != 1:
        raise SystemExit(f"profile_serve: want exactly one engine replica process, found {pids}")
    return pids[0]


def _table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(wall_s: float, num_cpus: int, busy_s: float, groups: Counter, parts: Counter,
           client_argv: Sequence[str]) -> str:
    cpu_rows = [(name, f"{seconds:.1f}", f"{100 * seconds / (wall_s * num_cpus):.1f}%")
                for name, seconds in groups.most_common()]
    total = sum(parts.values()) or 1
    part_rows = [(name, str(count), f"{100 * count / total:.1f}%")
                 for name, count in parts.most_common()]
    return "\n\n".join([
        "# Where the CPU time of a served run goes",
        f"Client: `python -m fleetlm.bench serve {' '.join(client_argv)}`",
        f"Client run: {wall_s:.1f} s wall on {num_cpus} CPUs; the machine was busy "
        f"{busy_s:.1f} CPU-s of {wall_s * num_cpus:.1f} ({100 * busy_s / (wall_s * num_cpus):.0f}%).",
        "## CPU seconds per process group (share of all CPUs over the run)",
        _table(cpu_rows, ("process group", "CPU s", "share")),
        "## Engine replica: py-spy samples of its Python threads, by part of the code",
        ("Samples of on-CPU Python threads only: a torch op counts where fleetlm calls it; "
         "time in OpenMP worker threads is not sampled."),
        _table(part_rows, ("part", "samples", "share")),
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, client = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", type=int, default=25,
                        help="py-spy samples per second (100 took 10%% of a core here)")
    args = parser.parse_args(own)
    args.out.mkdir(parents=True, exist_ok=True)
    if "--result-dir" not in client:
        client += ["--result-dir", str(args.out / "bench")]
    replica = find_replica(processes())
    raw = args.out / "replica.txt"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([py_spy, "record", "--pid", str(replica), "--rate", str(args.rate),
                            "--nonblocking", "--threads", "--format", "raw", "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before, (busy0, _) = _snapshot(), machine_busy_ticks()
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "fleetlm.bench", "serve", *client])
    wall_s = time.perf_counter() - start
    after, (busy1, _) = _snapshot(), machine_busy_ticks()
    spy.send_signal(signal.SIGINT)
    _, spy_err = spy.communicate(timeout=60)
    if not raw.is_file():
        raise SystemExit(f"profile_serve: py-spy wrote nothing: {spy_err.decode()[-2000:]}")
    text = render(wall_s, os.cpu_count() or 1, (busy1 - busy0) / _TICKS_PER_S,
                  group_cpu(before, after), parts_from_collapsed(raw.open()), client)
    (args.out / "profile.md").write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
