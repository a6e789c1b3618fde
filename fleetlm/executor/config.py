"""The engine's view of its settings: small frozen dataclasses, each handed only to the parts
that need it, built from the validated settings (`fleetlm.executor.settings`), whose defaults
they share: a default is written once, there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fleetlm.executor.settings import (
    EngineArgs,
    EngineSection,
    KVTransferSection,
    ModelSection,
    ParallelSection,
    SpeculativeSection,
)

# Each setting's default, read from its definition.
_MODEL, _ENGINE, _PARALLEL, _SPECULATIVE, _KV_TRANSFER = (
    ModelSection(), EngineSection(), ParallelSection(), SpeculativeSection(), KVTransferSection())


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and in which precision."""

    model: str = _MODEL.name  # built-in name, HF directory or .gguf file
    dtype: str = _MODEL.dtype
    max_model_len: int | None = _MODEL.max_model_len  # None: the model's
    device: str = _MODEL.device
    seed: int = _MODEL.seed
    random_weights: bool = _MODEL.random_weights
    tokenizer: str | None = _MODEL.tokenizer  # None: the model folder's
    quantization: str | None = _MODEL.quantization  # "gguf": keep a GGUF file's blocks

    @classmethod
    def from_section(cls, section: ModelSection) -> ModelConfig:
        return cls(model=section.name, dtype=section.dtype, max_model_len=section.max_model_len,
                   device=section.device, seed=section.seed,
                   random_weights=section.random_weights, tokenizer=section.tokenizer,
                   quantization=section.quantization)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache and prefix caching."""

    block_size: int = _ENGINE.block_size
    kv_cache_memory_bytes: int = int(_ENGINE.kv_cache_memory_bytes)
    num_blocks: int | None = _ENGINE.num_blocks  # overrides the bytes
    enable_prefix_caching: bool = _ENGINE.enable_prefix_caching
    hash_seed: int = 0  # separate pools with the same seed compute the same block hashes
    enable_kv_events: bool = _ENGINE.enable_kv_events
    kv_cache_dtype: str = _ENGINE.kv_cache_dtype  # "auto": the model's; "int8" (CPU); "fp8" (CUDA)

    @classmethod
    def from_section(cls, section: EngineSection) -> CacheConfig:
        return cls(block_size=section.block_size,
                   kv_cache_memory_bytes=int(section.kv_cache_memory_bytes),
                   num_blocks=section.num_blocks,
                   enable_prefix_caching=section.enable_prefix_caching,
                   enable_kv_events=section.enable_kv_events,
                   kv_cache_dtype=section.kv_cache_dtype)


@dataclass(frozen=True)
class SchedulerConfig:
    """The token-budget rule's limits."""

    max_num_seqs: int = _ENGINE.max_num_seqs
    max_num_batched_tokens: int = _ENGINE.max_num_batched_tokens
    max_model_len: int = 8192  # set from the model by the engine
    policy: Literal["fcfs", "priority"] = "fcfs"
    max_num_waiting: int | None = _ENGINE.max_num_waiting  # None: unbounded
    # Steps in flight at once (pipeline stages): each step takes at most its share of the
    # requests, so that consecutive steps hold different requests. Set by the engine.
    num_micro_batches: int = 1

    @classmethod
    def from_section(cls, section: EngineSection) -> SchedulerConfig:
        return cls(max_num_seqs=section.max_num_seqs,
                   max_num_batched_tokens=section.max_num_batched_tokens,
                   max_num_waiting=section.max_num_waiting)



@dataclass(frozen=True)
class ParallelConfig:
    """How one engine replica's model is split over a worker group, and how it is driven.

    World size 1 runs in-process (`LocalExecutor`) unless `executor_backend` is "ray"; larger
    worlds run one Ray actor per rank (`RayExecutor`). Field meanings: `ParallelSection`.
    """

    tensor_parallel_size: int = _PARALLEL.tensor_parallel_size
    pipeline_parallel_size: int = _PARALLEL.pipeline_parallel_size
    backend: str = _PARALLEL.backend
    placement_strategy: str = _PARALLEL.placement_strategy
    pipeline_layer_partition: tuple[int, ...] | None = None  # layers per stage; None: even
    max_batches_in_flight: int | None = _PARALLEL.max_batches_in_flight
    control_plane: str = _PARALLEL.control_plane
    worker_num_cpus: float = _PARALLEL.worker_num_cpus
    worker_num_gpus: float | None = _PARALLEL.worker_num_gpus
    executor_backend: str = _PARALLEL.executor_backend
    step_timeout_s: float = _PARALLEL.step_timeout_s
    # Mixture-of-experts layers: with expert parallelism each rank of the EP group (the TP
    # ranks of a stage: TP x DP with DP = 1) holds whole experts instead of a slice of each.
    enable_expert_parallel: bool = _PARALLEL.enable_expert_parallel
    expert_placement_strategy: str = _PARALLEL.expert_placement_strategy
    all2all_backend: str = _PARALLEL.all2all_backend

    @classmethod
    def from_section(cls, section: ParallelSection) -> ParallelConfig:
        values = section.model_dump(include=set(ParallelSection.model_fields))
        partition = values.pop("pipeline_layer_partition")
        return cls(**values,
                   pipeline_layer_partition=None if partition is None else tuple(partition))
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
        self._check_mlp_fits(hf_config)
        from fleetlm.parallel.pipeline import stage_layer_counts

        stage_layer_counts(hf_config.num_hidden_layers, self.pipeline_parallel_size,
                           self.pipeline_layer_partition)


    def _check_mlp_fits(self, hf_config) -> None:
        tp = self.tensor_parallel_size
        num_experts = (getattr(hf_config, "num_experts", None)
                       or getattr(hf_config, "num_local_experts", None))
        if self.enable_expert_parallel and not num_experts:
            raise ValueError("enable_expert_parallel needs a mixture-of-experts model; "
                             f"{(hf_config.architectures or ['this model'])[0]} has no experts")
        # Mixtral's experts are intermediate_size wide; the Qwen MoE models' dense layers are.
        sizes = {"intermediate_size": hf_config.intermediate_size}
        if num_experts:
            expert_size = getattr(hf_config, "moe_intermediate_size", None)
            if expert_size is None:
                sizes = {}  # every layer is an MoE layer of intermediate_size experts
            if self.enable_expert_parallel and tp > num_experts:
                raise ValueError(f"expert parallelism over tensor_parallel_size {tp} ranks "
                                 f"needs at least {tp} experts; the model has {num_experts}")
            if not self.enable_expert_parallel:
                sizes["moe_intermediate_size"] = expert_size or hf_config.intermediate_size
        for key, size in sizes.items():
            if size % tp:
                raise ValueError(f"tensor_parallel_size {tp} does not divide {key} {size}"
                                 + (" (or set enable_expert_parallel)"
                                    if key == "moe_intermediate_size" else ""))


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding. Field meanings: `SpeculativeSection`."""

    method: str = _SPECULATIVE.method  # ngram (prompt lookup) | draft_model
    num_speculative_tokens: int = _SPECULATIVE.num_speculative_tokens  # drafts per step (k)
    prompt_lookup_max: int = _SPECULATIVE.prompt_lookup_max
    prompt_lookup_min: int = _SPECULATIVE.prompt_lookup_min
    model: str | None = _SPECULATIVE.model
    random_weights: bool = _SPECULATIVE.random_weights
    # Adaptivity: a request whose drafts are accepted less often than this stops speculating
    # (an exponential average over its steps), tries one draft again every `probe_interval`
    # steps (twice as long after each rejected try, up to 8x), and no request speculates
    # while `disable_by_batch_size` or more run.
    min_acceptance_rate: float = _SPECULATIVE.min_acceptance_rate
    probe_interval: int = _SPECULATIVE.probe_interval
    disable_by_batch_size: int | None = _SPECULATIVE.disable_by_batch_size

    @classmethod
    def from_section(cls, section: SpeculativeSection) -> SpeculativeConfig:
        return cls(**section.model_dump())


@dataclass(frozen=True)
class KVTransferConfig:
    """Disaggregated prefill/decode. Field meanings: `KVTransferSection`."""

    role: str = _KV_TRANSFER.role
    transport: str = _KV_TRANSFER.transport
    host: str = _KV_TRANSFER.host
    port: int = _KV_TRANSFER.port
    engine_id: str | None = _KV_TRANSFER.engine_id
    lease_timeout_s: float = _KV_TRANSFER.lease_timeout_s
    transfer_timeout_s: float = _KV_TRANSFER.transfer_timeout_s
    chunk_bytes: int = int(_KV_TRANSFER.chunk_bytes)
    failure_policy: str = _KV_TRANSFER.failure_policy

    @classmethod
    def from_section(cls, section: KVTransferSection) -> KVTransferConfig:
        return cls(**{**section.model_dump(), "chunk_bytes": int(section.chunk_bytes)})


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = None
    kv_transfer: KVTransferConfig | None = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> EngineConfig:
        """The engine's view of validated settings (a deployment's or `LLM(...)`'s)."""
        return cls(
            model=ModelConfig.from_section(args.model),
            cache=CacheConfig.from_section(args.engine),
            scheduler=SchedulerConfig.from_section(args.engine),
            parallel=ParallelConfig.from_section(args.parallel),
            speculative=None if args.speculative is None else
            SpeculativeConfig.from_section(args.speculative),
            kv_transfer=None if args.kv_transfer is None else
            KVTransferConfig.from_section(args.kv_transfer),
        )
