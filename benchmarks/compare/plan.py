"""What a comparison runs: workload points, seeds, the system order of each repeat, client argv.

Pure functions over plain data (no processes, no I/O), so they are tested without servers.

Seeds: every (repeat, workload point) pair gets its own seed, the same for every system, so all
systems see exactly the same prompts in the same repeat, and no point replays the prompts of an
earlier one on the same server (a replay would hit the prefix cache of fleetlm and llama.cpp and
flatter them). The warm-up uses seeds of its own for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SEEDS_PER_REPEAT = 100  # more than the points of one repeat, so seeds never collide
WARMUP_SEED_OFFSET = 10_000
WORKLOADS = ("random", "shared-prefix")


@dataclass(frozen=True)
class Point:
    """One client run: a workload at one concurrency."""

    workload: str  # random | shared-prefix
    max_concurrency: int
    num_prompts: int
    input_len: int
    output_len: int
    prefix_len: int = 0  # shared-prefix only
    num_groups: int = 0  # shared-prefix only

    @property
    def key(self) -> str:
        """A stable name: `random-c8`, `shared-prefix-c8`."""
        return f"{self.workload}-c{self.max_concurrency}"


@dataclass(frozen=True)
class PlanConfig:
    """The sizes of a comparison; defaults are the issue's reference run."""

    concurrencies: tuple[int, ...] = (1, 8, 32)
    num_prompts: int = 64
    input_len: int = 256
    output_len: int = 128
    workloads: tuple[str, ...] = WORKLOADS
    shared_prefix_concurrencies: tuple[int, ...] = (8,)
    shared_prefix_len: int = 1024
    shared_prefix_groups: int = 4
    shared_prefix_input_len: int = 64
    num_warmup_prompts: int = 8
    warmup_output_len: int = 16

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
        if not self.workloads:
            raise ValueError("choose at least one workload")
        for name in ("num_prompts", "input_len", "output_len", "shared_prefix_len",
                     "shared_prefix_groups", "shared_prefix_input_len", "num_warmup_prompts",
                     "warmup_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for values in (self.concurrencies, self.shared_prefix_concurrencies):
            if not values or min(values) < 1:
                raise ValueError(f"concurrencies must be positive integers, got {values}")

    @property
    def max_concurrency(self) -> int:
        return max((*self.concurrencies, *self.shared_prefix_concurrencies))


QUICK = PlanConfig(concurrencies=(1, 2), num_prompts=4, output_len=16,
                   shared_prefix_concurrencies=(2,), shared_prefix_len=128,
                   shared_prefix_input_len=32, num_warmup_prompts=2, warmup_output_len=4)


def points(config: PlanConfig) -> list[Point]:
    """Every workload point of one repeat, in run order."""
    result = []
    if "random" in config.workloads:
        result += [Point("random", c, config.num_prompts, config.input_len, config.output_len)
                   for c in config.concurrencies]
    if "shared-prefix" in config.workloads:
        result += [Point("shared-prefix", c, config.num_prompts, config.shared_prefix_input_len,
                         config.output_len, config.shared_prefix_len, config.shared_prefix_groups)
                   for c in config.shared_prefix_concurrencies]
    return result


def warmup_point(config: PlanConfig, point: Point) -> Point:
    """A short run shaped like `point` (same prompt lengths, all at once) to warm a server up."""
    return Point(point.workload, min(config.num_warmup_prompts, config.max_concurrency),
                 config.num_warmup_prompts, point.input_len, config.warmup_output_len,
                 point.prefix_len, point.num_groups)


def point_seed(base_seed: int, repeat_index: int, point_index: int) -> int:
    assert 0 <= point_index < SEEDS_PER_REPEAT, "too many points for the seed scheme"
    return base_seed + repeat_index * SEEDS_PER_REPEAT + point_index


def warmup_seed(base_seed: int, repeat_index: int, point_index: int) -> int:
    return WARMUP_SEED_OFFSET + point_seed(base_seed, repeat_index, point_index)


def system_order(systems: Sequence[str], repeat_index: int) -> list[str]:
    """The systems of repeat `repeat_index`, rotated by one per repeat (interleaving)."""
    shift = repeat_index % len(systems)
    return list(systems[shift:]) + list(systems[:shift])


@dataclass(frozen=True)
class ClientTarget:
    """Where and how the benchmark client talks to one system."""

    base_url: str
    model: str
    tokenizer: str  # HF folder: exact prompts and the token count check
    extra_args: tuple[str, ...] = ()  # e.g. ("--ban-eos", "--eos-token-ids", "0,2")


def client_argv(target: ClientTarget, point: Point, seed: int, result_dir: str) -> list[str]:
    """Arguments of `python -m fleetlm.bench` for one point (completions endpoint, streaming)."""
    argv = ["serve", "--base-url", target.base_url, "--model", target.model,
            "--endpoint", "completions", "--workload", point.workload,
            "--num-prompts", str(point.num_prompts), "--input-len", str(point.input_len),
            "--output-len", str(point.output_len), "--max-concurrency", str(point.max_concurrency),
            "--seed", str(seed), "--tokenizer", target.tokenizer, "--result-dir", result_dir,
            "--disable-tqdm"]
    if point.workload == "shared-prefix":
        argv += ["--prefix-len", str(point.prefix_len), "--num-groups", str(point.num_groups)]
    return argv + list(target.extra_args)
