"""The deployment YAML: one pydantic schema, loaded once, turned into the engine's own config.

Every section rejects unknown keys; `load_config` reports them with the file name, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from fleetlm.executor.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)


# Each streamed message costs about a millisecond of CPU across the proxy, ingress and replica
# hops; 50 ms (Ray Serve LLM's choice too) caps that at 20 messages/s per request.
DEFAULT_STREAM_INTERVAL_MS = 50.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Ray's own resources have their own keys (num_cpus, num_gpus, ...); custom ones must differ.
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_custom_resources(key: str, resources: dict[str, float]) -> None:
    for name, amount in resources.items():
        if name in _RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{key}: {name!r} is one of Ray's own resources; use the "
                             f"num_cpus / num_gpus keys for CPU and GPU")
        if amount <= 0:
            raise ValueError(f"{key}: {name} must be above 0; got {amount:g}")


class ModelSection(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Built-in model name, Hugging Face model directory or .gguf file.",
    )
    served_model_name: str | None = Field(
        None, description="The `model` id clients send and /v1/models lists; default: `name`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto picks the device's fast one."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length (prompt + output); default: the model's own."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where each replica runs.")
    seed: int = Field(0, description="Seed for random weights and unseeded sampling.")

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.name


class EngineSection(_Section):
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    kv_cache_memory_bytes: ByteSize = Field(
        ByteSize(1 << 30), description="KV-cache memory per replica; accepts e.g. '512MiB'."
    )
    num_blocks: int | None = Field(
        None, ge=1, description="Exact number of KV blocks; overrides kv_cache_memory_bytes."
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests running in one step.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget of one step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prefixes.")
    max_num_waiting: int | None = Field(
        None, ge=0, description="Waiting-queue limit per replica; beyond it requests get 429."
    )


class ReplicaSection(_Section):
    count: int = Field(1, ge=1, description="Engine replicas (data parallelism).")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved by each replica.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved by each replica.")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads of each replica's math library (OMP_NUM_THREADS)."
    )
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests Ray Serve lets into one replica at once."
    )
    health_check_period_s: float = Field(
        1.0, gt=0,
        description="How often Ray Serve asks each replica whether its engine (and every "
        "worker) lives; after 3 failed checks in a row it replaces the replica.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica reserves besides CPUs and GPUs, e.g. "
        "{pool-decode: 1} or {'accelerator_type:H100': 0.001}: replicas then run only on "
        "nodes started with them (`ray start --resources`; Ray adds accelerator_type:<GPU>).",
    )

    @model_validator(mode="after")
    def _check_resources(self) -> ReplicaSection:
        _check_custom_resources("replicas.resources", self.resources)
        return self


class RouterSection(_Section):
    policy: Literal["round_robin", "least_loaded", "prefix_aware"] = Field(
        "least_loaded", description="How the ingress picks a replica for each request."
    )

    @model_validator(mode="after")
    def _check_implemented(self) -> RouterSection:
        if self.policy == "prefix_aware":
            raise ValueError("router.policy 'prefix_aware' is not implemented yet")
        return self


class MigrationSection(_Section):
    """What the ingress does when the replica serving a request fails (its engine or a worker
    died, or the replica itself): the request goes on elsewhere."""

    max_migrations: int = Field(
        3, ge=0,
        description="Times one stream may move to another replica after its replica failed "
        "mid-response; it goes on from the tokens already sent, with the same seed. "
        "0 turns migration off: such streams end with an error event.",
    )
    timeout_s: float = Field(
        60.0, gt=0,
        description="How long a request that lost its replica (or that no replica takes "
        "yet) waits, retrying with backoff, for one that takes it (a replacement included).",
    )

    @property
    def is_enabled(self) -> bool:
        return self.max_migrations > 0


class HttpSection(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP proxy.")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted bearer tokens; empty: no authentication."
    )
    ingress_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs reserved by the ingress.")
    stream_interval_ms: float = Field(
        DEFAULT_STREAM_INTERVAL_MS,
        ge=0,
        description="Least time between two streamed messages of one request; tokens that come "
        "sooner share a message. The first token is never held back. 0: one message per step.",
    )


_PARALLEL = ParallelConfig()  # the engine's defaults: written once, there


class ParallelSection(_Section):
    """How each engine replica splits its model over a worker group (one Ray actor per rank).

    Values are checked by the engine's own `ParallelConfig`, so both report the same errors.
    """

    tensor_parallel_size: int = Field(
        _PARALLEL.tensor_parallel_size, ge=1,
        description="Ranks each layer is split over; must divide the attention heads.",
    )
    pipeline_parallel_size: int = Field(
        _PARALLEL.pipeline_parallel_size, ge=1,
        description="Pipeline stages per replica; the layers are split between them.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        _PARALLEL.backend,
        description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        _PARALLEL.placement_strategy,
        description="Ray placement strategy of a replica's bundles (itself and its workers); "
        "SPREAD or STRICT_SPREAD lets a worker group span nodes.",
    )
    pipeline_layer_partition: list[int] | None = Field(
        None,
        description="Layers of each pipeline stage, one entry per stage; default: even.",
    )
    max_batches_in_flight: int | None = Field(
        _PARALLEL.max_batches_in_flight, ge=1,
        description="Steps a pipeline works on at once; default: pipeline_parallel_size.",
    )
    control_plane: Literal["shm", "socket", "ray"] = Field(
        _PARALLEL.control_plane,
        description="How each step reaches the workers: a shared-memory ring (workers on "
        "other nodes use TCP), TCP only, or plain Ray calls.",
    )
    worker_num_cpus: float = Field(
        _PARALLEL.worker_num_cpus, ge=0,
        description="Ray CPUs reserved by each worker (its torch threads: the integer part, "
        "at least 1).",
    )
    worker_num_gpus: float | None = Field(
        _PARALLEL.worker_num_gpus, ge=0,
        description="Ray GPUs reserved by each worker; default: 1 on CUDA, 0 on CPU.",
    )

    enable_expert_parallel: bool = Field(
        _PARALLEL.enable_expert_parallel,
        description="MoE models: spread whole experts over the tensor-parallel ranks "
        "(expert parallelism) instead of splitting every expert over them.",
    )
    expert_placement_strategy: Literal["linear", "round_robin"] = Field(
        _PARALLEL.expert_placement_strategy,
        description="Which experts each EP rank holds: contiguous ranges (linear) or every "
        "EP-size-th expert (round_robin).",
    )
    all2all_backend: Literal["allgather_reducescatter", "all_to_all"] = Field(
        _PARALLEL.all2all_backend,
        description="How expert parallelism moves tokens to their experts' ranks and back: "
        "all-gather + reduce-scatter, or all-to-all of only the routed tokens.",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker's bundle reserves besides CPUs and "
        "GPUs (e.g. {'accelerator_type:H100': 0.001}), so the worker group runs only on "
        "nodes that have them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, values):
        if isinstance(values, dict) and "expert_parallel_size" in values:
            raise ValueError("parallel.expert_parallel_size is gone: set "
                             "enable_expert_parallel: true (the EP group is the TP ranks)")
        return values

    @model_validator(mode="after")
    def _check(self) -> ParallelSection:
        _check_custom_resources("parallel.worker_resources", self.worker_resources)
        self.to_parallel_config()  # raises ValueError naming the field
        return self

    def to_parallel_config(self) -> ParallelConfig:
        # worker_resources is a placement matter: the Serve app adds it to the worker bundles.
        return ParallelConfig(
            **self.model_dump(exclude={"worker_resources"}))


class PoolSection(_Section):
    count: int = Field(1, ge=1, description="Replicas in this pool.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved by each replica.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved by each replica.")
    parallel: ParallelSection = Field(
        default_factory=ParallelSection, description="Parallel sizes of each replica."
    )


_SPECULATIVE = SpeculativeConfig()  # the engine's defaults: written once, there


class SpeculativeSection(_Section):
    """Speculative decoding (vLLM's `speculative_config` keys); absent or null: off.

    Values are checked by the engine's own `SpeculativeConfig`."""

    method: Literal["ngram", "draft_model"] = Field(
        _SPECULATIVE.method,
        description="ngram: prompt lookup in the request's own tokens; draft_model: a smaller "
        "model with the same tokenizer (`model`). A `model` alone means draft_model.",
    )
    num_speculative_tokens: int = Field(
        _SPECULATIVE.num_speculative_tokens, ge=1, description="Draft tokens per step, at most.")
    prompt_lookup_max: int = Field(
        _SPECULATIVE.prompt_lookup_max, ge=1,
        description="ngram: the longest suffix looked up in the request's tokens.")
    prompt_lookup_min: int = Field(
        _SPECULATIVE.prompt_lookup_min, ge=1, description="ngram: the shortest suffix.")
    model: str | None = Field(
        None, description="draft_model: built-in name, Hugging Face directory or .gguf file.")
    random_weights: bool = Field(
        False, description="draft_model: random weights from its config (benchmarks only).")
    min_acceptance_rate: float = Field(
        _SPECULATIVE.min_acceptance_rate, ge=0, le=1,
        description="A request whose drafts are accepted less often stops speculating "
        "(averaged over its steps), trying one draft again after `probe_interval` steps.")
    probe_interval: int = Field(_SPECULATIVE.probe_interval, ge=1,
                                description="Steps before a stopped request tries one draft; "
                                "doubled after each rejected try, up to 8 times this.")
    disable_by_batch_size: int | None = Field(
        _SPECULATIVE.disable_by_batch_size, ge=1,
        description="No request speculates while this many or more run; null: no limit.")

    @model_validator(mode="before")
    @classmethod
    def _model_means_draft(cls, values):
        if isinstance(values, dict) and "model" in values and "method" not in values:
            values = {**values, "method": "draft_model"}
        return values

    @model_validator(mode="after")
    def _check(self) -> SpeculativeSection:
        self.to_speculative_config()  # raises ValueError naming the field
        return self

    def to_speculative_config(self) -> SpeculativeConfig:
        return SpeculativeConfig(**self.model_dump())


class PDSection(_Section):
    enabled: bool = Field(False, description="Split prefill and decode into separate pools.")
    prefill: PoolSection = Field(default_factory=PoolSection, description="The prefill pool.")
    decode: PoolSection = Field(default_factory=PoolSection, description="The decode pool.")

    @model_validator(mode="after")
    def _check_implemented(self) -> PDSection:
        if self.enabled:
            raise ValueError("pd.enabled (disaggregated prefill/decode) is not implemented yet")
        return self


class ClusterConfig(_Section):
    """A whole deployment: what `fleetlm serve FILE` brings up."""

    name: str = Field("fleetlm", description="Ray Serve application name.")
    model: ModelSection = Field(default_factory=ModelSection, description="Weights to serve.")
    engine: EngineSection = Field(default_factory=EngineSection, description="Engine limits.")
    replicas: ReplicaSection = Field(
        default_factory=ReplicaSection, description="Data parallelism and resources."
    )
    router: RouterSection = Field(default_factory=RouterSection, description="Replica choice.")
    http: HttpSection = Field(default_factory=HttpSection, description="HTTP endpoint.")
    parallel: ParallelSection = Field(
        default_factory=ParallelSection, description="Model parallelism inside a replica."
    )
    migration: MigrationSection = Field(
        default_factory=MigrationSection, description="Requests of failed replicas."
    )
    pd: PDSection = Field(default_factory=PDSection, description="Prefill/decode pools.")
    speculative: SpeculativeSection | None = Field(
        None, description="Speculative decoding; null: off.")

    @model_validator(mode="after")
    def _check_speculative(self) -> ClusterConfig:
        if self.speculative is not None and self.parallel.pipeline_parallel_size > 1:
            raise ValueError("speculative decoding with parallel.pipeline_parallel_size > 1 "
                             "is not supported; use tensor parallelism")
        return self

    @model_validator(mode="after")
    def _check_replica_bundle(self) -> ClusterConfig:
        is_distributed = self.parallel.to_parallel_config().is_distributed
        if is_distributed and not (self.replicas.num_cpus or self.replicas.num_gpus):
            raise ValueError("replicas.num_cpus must be above 0 when a replica drives a worker "
                             "group: its placement-group bundle needs some resource")
        return self


def load_config(path: str | Path) -> ClusterConfig:
    """Read a deployment YAML; raise `ValueError` naming the file and every bad key."""
    path = Path(path)
    return parse_config(yaml.safe_load(path.read_text()) or {}, str(path))


def parse_config(data: object, source: str) -> ClusterConfig:
    """A deployment config from its YAML's mapping; `ValueError` names `source` and every bad
    key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{source}: {_describe(e)}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)


def to_engine_config(config: ClusterConfig) -> EngineConfig:
    """The engine's view of a deployment: its model, cache, scheduler and parallel sections."""
    model, engine, parallel = config.model, config.engine, config.parallel
    return EngineConfig(
        model=ModelConfig(
            model=model.name,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            device=model.device,
            seed=model.seed,
        ),
        cache=CacheConfig(
            block_size=engine.block_size,
            kv_cache_memory_bytes=int(engine.kv_cache_memory_bytes),
            num_blocks=engine.num_blocks,
            enable_prefix_caching=engine.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            max_num_waiting=engine.max_num_waiting,
        ),
        parallel=parallel.to_parallel_config(),
        speculative=None if config.speculative is None else
        config.speculative.to_speculative_config(),
    )


def check_model_fits(config: ClusterConfig) -> None:
    """Raise ValueError if the model cannot be split as `parallel` says (e.g. "parallel:
    tensor_parallel_size 2 does not divide 9 attention heads"), where the model can be found
    here; a model that exists only on the cluster's nodes is checked there, by each replica."""
    from fleetlm.executor.weights import load_hf_config, resolve_model

    parallel = config.parallel.to_parallel_config()
    if not parallel.is_distributed:
        return
    try:
        hf_config = load_hf_config(resolve_model(config.model.name))
    except (OSError, ValueError):
        return
    try:
        parallel.check_fits(hf_config)
    except ValueError as e:
        raise ValueError(f"parallel: {e}") from None
