"""Engine configuration: small frozen dataclasses, each handed only to the parts that need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and in which precision."""

    model: str = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf file
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    max_model_len: int | None = None  # None: the model's own context length
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    random_weights: bool = False  # random init from the config: large shapes in tests/benchmarks


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache and prefix caching."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    num_blocks: int | None = None  # overrides kv_cache_memory_bytes when set
    enable_prefix_caching: bool = True
    hash_seed: int = 0  # separate pools with the same seed compute the same block hashes


@dataclass(frozen=True)
class SchedulerConfig:
    """The token-budget rule's limits."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192  # set from the model by the engine
    policy: Literal["fcfs", "priority"] = "fcfs"
    max_num_waiting: int | None = None  # None: unbounded queue


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel sizes; world size 1 until the parallelism issues land."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
