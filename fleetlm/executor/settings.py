"""The engine's settings, defined once: each field's name, default, description and checks.

The deployment YAML (`fleetlm.cluster.config`), the flags of `fleetlm serve` (generated from
these fields) and the offline `LLM(**kwargs)` (spread over these sections by field name) are
all validated here; the engine then reads the frozen dataclasses built from them
(`fleetlm.executor.config`). Errors name the key, never just the type.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

BUILTIN_MODEL = "smollm2-135m-instruct"
GGUF_SUFFIX = ".gguf"
QUANTIZATIONS = ("gguf", "compressed-tensors")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    name: str = Field(
        BUILTIN_MODEL, description="Built-in model name, Hugging Face model directory or .gguf file.")
    served_model_name: str | None = Field(
        None, description="The `model` id clients send and /v1/models lists; default: `name`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto picks the device's fast one.")
    max_model_len: int | None = Field(
        None, ge=1, description="Context length (prompt + output); default: the model's own.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where each replica runs.")
    seed: int = Field(0, description="Seed for random weights and unseeded sampling.")
    quantization: str | None = Field(
        None, description="Weight quantization: gguf keeps a .gguf file's quantized matrices "
        "(Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) and runs the linear layers on them (CPU); unset "
        "dequantizes the file to `dtype` when loaded. compressed-tensors: a W8A8 INT8 "
        "checkpoint (LLM Compressor's, or `fleetlm quantize`'s) run on int8 GEMMs (CPU), or an "
        "FP8 W8A8 one (FP8_DYNAMIC) on FP8 GEMMs (GPU; on CPUs only to check it, slowly); such "
        "a checkpoint is detected from its config.json when this is unset.")
    random_weights: bool = Field(
        False, description="Random weights from the model's config (tests and benchmarks).")
    tokenizer: str | None = Field(
        None, description="Tokenizer: a built-in model name, a folder or a .gguf file; default: "
        "the model's own (a random-weight config folder may name one instead of holding it).")

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.name

    @field_validator("name", "tokenizer")
    @classmethod
    def _absolute_if_local(cls, value: str | None) -> str | None:
        """A relative path that exists here becomes absolute: replicas and workers may run in
        another directory (built-in names are left alone)."""
        if value is None or os.path.isabs(value) or not os.path.exists(value):
            return value
        return os.path.abspath(value)

    @field_validator("quantization")
    @classmethod
    def _supported_quantization(cls, value: str | None) -> str | None:
        if value not in (None, *QUANTIZATIONS):
            raise ValueError(f"{value!r} is not supported: fleetlm runs full-precision weights, "
                             f".gguf files' own blocks (gguf) and W8A8 INT8 checkpoints "
                             f"(compressed-tensors; FP8 W8A8 too)")
        return value

    @model_validator(mode="after")
    def _check_quantization(self) -> ModelSection:
        if self.quantization == "gguf" and not (
                self.name == BUILTIN_MODEL or self.name.endswith(GGUF_SUFFIX)):
            raise ValueError(f"quantization gguf needs a {GGUF_SUFFIX} model; got {self.name!r}")
        if self.quantization == "compressed-tensors" and (
                self.name == BUILTIN_MODEL or self.name.endswith(GGUF_SUFFIX)):
            raise ValueError(f"quantization compressed-tensors needs a Hugging Face model folder "
                             f"(`fleetlm quantize MODEL OUT --scheme W8A8` writes one); got "
                             f"{self.name!r}")
        return self


class EngineSection(Section):
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    kv_cache_memory_bytes: ByteSize = Field(
        ByteSize(1 << 30), description="KV-cache memory per replica; accepts e.g. '512MiB'.")
    num_blocks: int | None = Field(
        None, ge=1, description="Exact number of KV blocks; overrides kv_cache_memory_bytes.")
    kv_cache_dtype: Literal["auto", "int8", "fp8"] = Field(
        "auto", description="KV-cache storage: auto keeps the model's dtype; int8 stores each "
        "token's K and V per head as int8 with a float32 scale (symmetric, absmax / 127), "
        "about 3.8x the blocks of float32 in the same memory (CPU only); fp8 stores them as "
        "float8 e4m3 with no scale, as vLLM's fp8 without calibrated scales, 2x the blocks of "
        "bf16 (CUDA only).")
    max_num_seqs: int = Field(64, ge=1, description="Most requests running in one step.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget of one step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prefixes.")
    enable_kv_events: bool = Field(
        False, description="Record which KV blocks each step cached and evicted, for a "
        "KV-aware router to ask for (`kv_events_since`); off costs nothing.")
    max_num_waiting: int | None = Field(
        None, ge=0, description="Waiting-queue limit per replica; beyond it requests get 429.")


class ParallelSection(Section):
    """How each engine replica splits its model over a worker group (one Ray actor per rank).
    World size 1 runs in-process unless `executor_backend` is ray."""

    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks each layer is split over; must divide the attention heads.")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages per replica; the layers are split between them.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of a replica's bundles (itself and its "
        "workers); SPREAD or STRICT_SPREAD lets a worker group span nodes.")
    pipeline_layer_partition: list[int] | None = Field(
        None, description="Layers of each pipeline stage, one entry per stage; default: even.")
    max_batches_in_flight: int | None = Field(
        None, ge=1, description="Steps a pipeline works on at once; default: "
        "pipeline_parallel_size.")
    control_plane: Literal["shm", "socket", "ray"] = Field(
        "socket", description="How each step reaches the workers: a shared-memory ring "
        "(workers on other nodes use TCP), TCP only, or plain Ray calls.")
    worker_num_cpus: float = Field(
        1.0, ge=0, description="Ray CPUs reserved by each worker (its torch threads: the "
        "integer part, at least 1).")
    worker_num_gpus: float | None = Field(
        None, ge=0, description="Ray GPUs reserved by each worker; default: 1 on CUDA, 0 on CPU.")
    executor_backend: Literal["auto", "local", "ray"] = Field(
        "auto", description="auto: in-process for world size 1, Ray worker actors above; "
        "ray: Ray workers even for one rank.")
    step_timeout_s: float = Field(
        600.0, gt=0, description="A step the workers do not answer by then fails the group.")
    enable_expert_parallel: bool = Field(
        False, description="MoE models: spread whole experts over the tensor-parallel ranks "
        "(expert parallelism) instead of splitting every expert over them.")
    expert_placement_strategy: Literal["linear", "round_robin"] = Field(
        "linear", description="Which experts each EP rank holds: contiguous ranges (linear) "
        "or every EP-size-th expert (round_robin).")
    all2all_backend: Literal["allgather_reducescatter", "all_to_all"] = Field(
        "allgather_reducescatter", description="How expert parallelism moves tokens to their "
        "experts' ranks and back: all-gather + reduce-scatter, or all-to-all of only the "
        "routed tokens.")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, values):
        if isinstance(values, dict) and "expert_parallel_size" in values:
            raise ValueError("expert_parallel_size is gone: set enable_expert_parallel: true "
                             "(the EP group is the TP ranks)")
        return values

    @model_validator(mode="after")
    def _check_partition(self) -> ParallelSection:
        partition = self.pipeline_layer_partition
        if partition is not None and len(partition) != self.pipeline_parallel_size:
            raise ValueError(f"pipeline_layer_partition {partition} must have one entry per "
                             f"stage ({self.pipeline_parallel_size})")
        return self

    @property
    def is_distributed(self) -> bool:
        world_size = self.tensor_parallel_size * self.pipeline_parallel_size
        return self.executor_backend == "ray" or (
            self.executor_backend == "auto" and world_size > 1)


class SpeculativeSection(Section):
    """Speculative decoding (vLLM's `speculative_config` keys): a proposer suggests draft
    tokens that the target model verifies in one forward pass."""

    method: Literal["ngram", "draft_model"] = Field(
        "ngram", description="ngram: prompt lookup in the request's own tokens; draft_model: "
        "a smaller model with the same tokenizer (`model`). A `model` alone means draft_model.")
    num_speculative_tokens: int = Field(4, ge=1, description="Draft tokens per step, at most.")
    prompt_lookup_max: int = Field(
        4, ge=1, description="ngram: the longest suffix looked up in the request's tokens.")
    prompt_lookup_min: int = Field(2, ge=1, description="ngram: the shortest suffix.")
    model: str | None = Field(
        None, description="draft_model: built-in name, Hugging Face directory or .gguf file.")
    random_weights: bool = Field(
        False, description="draft_model: random weights from its config (benchmarks only).")
    min_acceptance_rate: float = Field(
        0.25, ge=0, le=1, description="A request whose drafts are accepted less often stops "
        "speculating (averaged over its steps), trying one draft again after `probe_interval` "
        "steps.")
    probe_interval: int = Field(
        16, ge=1, description="Steps before a stopped request tries one draft; doubled after "
        "each rejected try, up to 8 times this.")
    disable_by_batch_size: int | None = Field(
        None, ge=1, description="No request speculates while this many or more run; null: "
        "no limit.")

    @model_validator(mode="before")
    @classmethod
    def _model_means_draft(cls, values):
        if isinstance(values, dict) and "model" in values and "method" not in values:
            values = {**values, "method": "draft_model"}
        return values

    @model_validator(mode="after")
    def _check(self) -> SpeculativeSection:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be at most prompt_lookup_max")
        if (self.model is not None) != (self.method == "draft_model"):
            raise ValueError("model names the draft model, and only for method draft_model")
        return self


class KVTransferSection(Section):
    """Disaggregated prefill/decode (`fleetlm.kvtransfer`): a producer keeps a finished
    prompt's KV blocks under a lease for a consumer to read. vLLM's `kv_transfer_config`."""

    role: Literal["producer", "consumer", "both"] = Field(
        "both", description="producer: a prefill engine (keeps and serves KV); consumer: a "
        "decode engine (reads it); both.")
    transport: Literal["tcp", "shm", "dist", "inproc"] = Field(
        "tcp", description="How KV bytes move: tcp (between hosts), shm (shared memory "
        "between processes on one host, requests over TCP), dist (torch.distributed "
        "send/recv on a two-rank gloo group per connection, requests over TCP), inproc (one "
        "process).")
    host: str = Field("127.0.0.1", description="The producer's KV server address.")
    port: int = Field(0, ge=0, le=65535, description="The producer's KV server port (rank r "
                      "of a worker group: port + r); 0: any free one.")
    engine_id: str | None = Field(
        None, description="Names this engine in transfer params; default: a random id.")
    lease_timeout_s: float = Field(
        30.0, gt=0, description="A producer frees a finished prompt's blocks this long after "
        "they were last read (or when the consumer has read them all).")
    transfer_timeout_s: float = Field(
        30.0, gt=0, description="A consumer gives up a transfer that has not completed by "
        "then (and applies failure_policy).")
    chunk_bytes: ByteSize = Field(
        ByteSize(4 << 20), description="A consumer reads at most this much per request.")
    failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="A failed transfer: recompute (the consumer computes the "
        "prompt itself) or fail (the request ends with an error).")


class EngineArgs(Section):
    """Everything one engine replica needs: the offline `LLM(...)` takes exactly this, and a
    deployment (`ClusterConfig`) adds replicas, routing and HTTP around it."""

    model: ModelSection = Field(default_factory=ModelSection, description="Weights to serve.")
    engine: EngineSection = Field(default_factory=EngineSection, description="Engine limits.")
    parallel: ParallelSection = Field(
        default_factory=ParallelSection, description="Model parallelism inside a replica.")
    speculative: SpeculativeSection | None = Field(
        None, description="Speculative decoding; null: off.")
    kv_transfer: KVTransferSection | None = Field(
        None, description="KV transfer between prefill and decode engines; null: off.")

    @model_validator(mode="after")
    def _check_speculative(self) -> EngineArgs:
        if self.speculative is not None and self.parallel.pipeline_parallel_size > 1:
            raise ValueError("speculative decoding with parallel.pipeline_parallel_size > 1 "
                             "is not supported; use tensor parallelism")
        return self

    @classmethod
    def from_kwargs(cls, model: str | os.PathLike, speculative_config: dict | None = None,
                    kv_transfer_config: dict | None = None, **kwargs: Any) -> EngineArgs:
        """vLLM-style flat keywords: each belongs to the one section with a field of that
        name; `speculative_config` and `kv_transfer_config` are dicts, as vLLM's. TypeError
        for an unknown keyword, ValueError naming the keyword for a bad value."""
        sections = {"model": ModelSection, "engine": EngineSection, "parallel": ParallelSection}
        data: dict[str, dict] = {"model": {"name": os.fspath(model)}, "engine": {}, "parallel": {}}
        for key, value in kwargs.items():
            owner = next((s for s, section in sections.items()
                          if key in section.model_fields and key != "name"), None)
            if owner is None:
                raise TypeError(f"unknown engine argument {key!r}")
            data[owner][key] = value
        if speculative_config is not None:
            data["speculative"] = speculative_config
        if kv_transfer_config is not None:
            data["kv_transfer"] = kv_transfer_config
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(describe(e, _flat_key)) from None


def _flat_key(loc: tuple) -> str:
    """("parallel", "tensor_parallel_size") -> "tensor_parallel_size"; the speculative dict
    keeps its name, as LLM's keyword."""
    if loc and loc[0] in ("speculative", "kv_transfer"):
        return ".".join([f"{loc[0]}_config", *map(str, loc[1:])])
    return ".".join(str(part) for part in loc[1:] or loc)


def dotted_key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def describe(error: ValidationError, key_of=dotted_key) -> str:
    """One line naming every bad key (as `key_of` spells a pydantic location)."""
    lines = []
    for item in error.errors():
        key = key_of(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)
