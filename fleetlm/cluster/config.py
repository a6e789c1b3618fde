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
)


# Each streamed message costs about a millisecond of CPU across the proxy, ingress and replica
# hops; 50 ms (Ray Serve LLM's choice too) caps that at 20 messages/s per request.
DEFAULT_STREAM_INTERVAL_MS = 50.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class RouterSection(_Section):
    policy: Literal["round_robin", "least_loaded", "prefix_aware"] = Field(
        "least_loaded", description="How the ingress picks a replica for each request."
    )

    @model_validator(mode="after")
    def _check_implemented(self) -> RouterSection:
        if self.policy == "prefix_aware":
            raise ValueError("router.policy 'prefix_aware' is not implemented yet")
        return self


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


class ParallelSection(_Section):
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU ranks) per layer.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per replica.")
    expert_parallel_size: int = Field(1, ge=1, description="Ranks the MoE experts span.")

    @model_validator(mode="after")
    def _check_implemented(self) -> ParallelSection:
        for name in type(self).model_fields:
            if getattr(self, name) > 1:
                raise ValueError(f"parallel.{name} > 1 is not implemented yet")
        return self


class PoolSection(_Section):
    count: int = Field(1, ge=1, description="Replicas in this pool.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved by each replica.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved by each replica.")
    parallel: ParallelSection = Field(
        default_factory=ParallelSection, description="Parallel sizes of each replica."
    )


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
    pd: PDSection = Field(default_factory=PDSection, description="Prefill/decode pools.")


def load_config(path: str | Path) -> ClusterConfig:
    """Read a deployment YAML; raise `ValueError` naming the file and every bad key."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {_describe(e)}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"{key}: {item['msg']}" if key else item["msg"])
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
        parallel=ParallelConfig(
            tensor_parallel_size=parallel.tensor_parallel_size,
            pipeline_parallel_size=parallel.pipeline_parallel_size,
        ),
    )
