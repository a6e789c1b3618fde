"""Engine configuration: small frozen dataclasses, each handed only to the parts that need it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
    # Steps in flight at once (pipeline stages): each step takes at most its share of the
    # requests, so that consecutive steps hold different requests. Set by the engine.
    num_micro_batches: int = 1


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
CONTROL_PLANES = ("shm", "socket", "ray")
EXECUTOR_BACKENDS = ("auto", "local", "ray")
EXPERT_PLACEMENTS = ("linear", "round_robin")
ALL2ALL_BACKENDS = ("allgather_reducescatter", "all_to_all")


@dataclass(frozen=True)
class ParallelConfig:
    """How one engine replica's model is split over a worker group, and how it is driven.

    World size 1 runs in-process (`LocalExecutor`) unless `executor_backend` is "ray"; larger
    worlds run one Ray actor per rank (`RayExecutor`).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, else gloo) | gloo | nccl
    placement_strategy: str = "PACK"  # of the workers' placement-group bundles
    pipeline_layer_partition: tuple[int, ...] | None = None  # layers per stage; None: even
    max_batches_in_flight: int | None = None  # None: pipeline_parallel_size
    control_plane: str = "socket"  # how each step reaches the workers: socket | shm | ray
    worker_num_cpus: float = 1.0  # Ray CPUs of each worker (its torch threads: at least 1)
    worker_num_gpus: float | None = None  # None: 1 on CUDA, 0 on CPU
    executor_backend: str = "auto"
    step_timeout_s: float = 600.0  # a step with no answer by then fails the worker group
    # Mixture-of-experts layers: with expert parallelism each rank of the EP group (the TP
    # ranks of a stage: TP x DP with DP = 1) holds whole experts instead of a slice of each.
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"  # linear: contiguous ranges | round_robin
    all2all_backend: str = "allgather_reducescatter"  # EP token dispatch | all_to_all

    def __post_init__(self) -> None:
        checks = [
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be at least 1"),
            ("pipeline_parallel_size", self.pipeline_parallel_size >= 1, "must be at least 1"),
            ("backend", self.backend in ("auto", "gloo", "nccl"), "must be auto, gloo or nccl"),
            ("placement_strategy", self.placement_strategy in PLACEMENT_STRATEGIES,
             f"must be one of {', '.join(PLACEMENT_STRATEGIES)}"),
            ("max_batches_in_flight",
             self.max_batches_in_flight is None or self.max_batches_in_flight >= 1,
             "must be at least 1"),
            ("control_plane", self.control_plane in CONTROL_PLANES,
             f"must be one of {', '.join(CONTROL_PLANES)}"),
            ("worker_num_cpus", self.worker_num_cpus >= 0, "must be non-negative"),
            ("executor_backend", self.executor_backend in EXECUTOR_BACKENDS,
             f"must be one of {', '.join(EXECUTOR_BACKENDS)}"),
            ("step_timeout_s", self.step_timeout_s > 0, "must be positive"),
            ("expert_placement_strategy", self.expert_placement_strategy in EXPERT_PLACEMENTS,
             f"must be one of {', '.join(EXPERT_PLACEMENTS)}"),
            ("all2all_backend", self.all2all_backend in ALL2ALL_BACKENDS,
             f"must be one of {', '.join(ALL2ALL_BACKENDS)}"),
        ]
        for name, is_ok, message in checks:
            if not is_ok:
                raise ValueError(f"{name} {message}; got {getattr(self, name)!r}")
        if self.pipeline_layer_partition is not None:
            object.__setattr__(self, "pipeline_layer_partition",
                               tuple(self.pipeline_layer_partition))
            if len(self.pipeline_layer_partition) != self.pipeline_parallel_size:
                raise ValueError(
                    f"pipeline_layer_partition {list(self.pipeline_layer_partition)} must have "
                    f"one entry per stage ({self.pipeline_parallel_size})")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def is_distributed(self) -> bool:
        return self.executor_backend == "ray" or (
            self.executor_backend == "auto" and self.world_size > 1)

    @property
    def num_batches_in_flight(self) -> int:
        return self.max_batches_in_flight or self.pipeline_parallel_size

    def check_fits(self, hf_config) -> None:
        """Raise ValueError when the model cannot be split this way."""
        tp = self.tensor_parallel_size
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        if num_heads % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide {num_heads} "
                             f"attention heads")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {tp} and {num_kv_heads} KV heads: one "
                             f"must divide the other (KV heads are split, or replicated)")
        if hf_config.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide intermediate_size "
                             f"{hf_config.intermediate_size}")
        from fleetlm.parallel.pipeline import stage_layer_counts

        stage_layer_counts(hf_config.num_hidden_layers, self.pipeline_parallel_size,
                           self.pipeline_layer_partition)


SPEC_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer suggests draft tokens that the target model verifies
    in one forward pass. Keys as vLLM's `speculative_config`."""

    method: str = "ngram"  # ngram (prompt lookup) | draft_model
    num_speculative_tokens: int = 4  # drafts per step at most (k)
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up in the request's tokens
    prompt_lookup_min: int = 2  # ngram: shortest
    model: str | None = None  # draft_model: a smaller model with the target's tokenizer
    random_weights: bool = False  # draft_model: random weights from its config (benchmarks)
    # Adaptivity: a request whose drafts are accepted less often than this stops speculating
    # (an exponential average over its steps), tries one draft again every `probe_interval`
    # steps (twice as long after each rejected try, up to 8x), and no request speculates
    # while `disable_by_batch_size` or more run.
    min_acceptance_rate: float = 0.25
    probe_interval: int = 16
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in SPEC_METHODS, f"must be one of {', '.join(SPEC_METHODS)}"),
            ("num_speculative_tokens", self.num_speculative_tokens >= 1, "must be at least 1"),
            ("prompt_lookup_min", 1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
             "must be at least 1 and at most prompt_lookup_max"),
            ("model", (self.model is not None) == (self.method == "draft_model"),
             "names the draft model, and only for method draft_model"),
            ("min_acceptance_rate", 0.0 <= self.min_acceptance_rate <= 1.0, "must be in [0, 1]"),
            ("probe_interval", self.probe_interval >= 1, "must be at least 1"),
            ("disable_by_batch_size",
             self.disable_by_batch_size is None or self.disable_by_batch_size >= 1,
             "must be at least 1"),
        ]
        for name, is_ok, message in checks:
            if not is_ok:
                raise ValueError(f"speculative {name} {message}; got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict) -> SpeculativeConfig:
        """vLLM's `speculative_config` dict: a "model" without a "method" is a draft model."""
        values = dict(values)
        if "model" in values and "method" not in values:
            values["method"] = "draft_model"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.speculative is not None and self.parallel.pipeline_parallel_size > 1:
            raise ValueError("speculative decoding with pipeline_parallel_size > 1 is not "
                             "supported; use tensor parallelism")
