"""The deployment YAML: one pydantic schema, loaded once, turned into the engine's own config.

The model, engine, parallel and speculative sections are the engine's settings
(`fleetlm.executor.settings`, shared with `LLM(...)` and the CLI flags); this module adds the
deployment's own: replicas, router, HTTP, migration. Every section rejects unknown keys; `load_config` reports them with the file name, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from fleetlm.executor.config import EngineConfig, ParallelConfig
from fleetlm.executor.settings import (
    EngineArgs,
    EngineSection,
    ParallelSection,
    Section,
    describe,
    dotted_key,
)

# Each streamed message costs about a millisecond of CPU across the proxy, ingress and replica
# hops; 50 ms (Ray Serve LLM's choice too) caps that at 20 messages/s per request.
DEFAULT_STREAM_INTERVAL_MS = 50.0
# What a replica's streams together may send. Under load, each stream's messages are spaced
# further apart to stay within it: at 50 messages/s, below 3 open streams nothing changes, 8
# streams get a message every 160 ms, 32 every 640 ms. On a 2-core machine 50 against 200 gave
# 10% more throughput at 8 streams and 7% at 32 (docs/benchmarks.md): the engine's threads get
# the CPU the hops would have used.
DEFAULT_MAX_STREAM_MESSAGES_PER_S = 50.0


# Ray's own resources have their own keys (num_cpus, num_gpus, ...); custom ones must differ.
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_custom_resources(key: str, resources: dict[str, float]) -> None:
    for name, amount in resources.items():
        if name in _RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{key}: {name!r} is one of Ray's own resources; use the "
                             f"num_cpus / num_gpus keys for CPU and GPU")
        if amount <= 0:
            raise ValueError(f"{key}: {name} must be above 0; got {amount:g}")


class AutoscalingSection(Section):
    """Ray Serve autoscales the engine replicas between min_replicas and max_replicas on
    what the replicas report (`fleetlm.cluster.autoscaling`): requests in flight per replica
    against target_ongoing_requests, and KV-cache usage against target_kv_usage."""

    min_replicas: int = Field(1, ge=1, description="Fewest replicas (also the first count).")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests in flight (running and waiting) per replica to aim "
        "for; more makes Serve add replicas, fewer remove them.")
    target_kv_usage: float = Field(
        0.8, gt=0, le=1, description="Mean KV-cache usage of the replicas to stay under; "
        "above it Serve adds replicas even while requests are few (long contexts).")
    upscale_delay_s: float = Field(
        5.0, ge=0, description="How long the wish for more replicas must last before one is "
        "added.")
    downscale_delay_s: float = Field(
        30.0, ge=0, description="How long the wish for fewer replicas must last before one is "
        "removed (its requests finish first).")
    metrics_interval_s: float = Field(
        1.0, gt=0, description="How often each replica reports its load to Serve's autoscaler.")
    look_back_period_s: float = Field(
        5.0, gt=0, description="The window over which the reports are averaged.")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        return self


class ReplicaSection(Section):
    count: int = Field(1, ge=1, description="Engine replicas (data parallelism); with "
                       "autoscaling, leave it out.")
    autoscaling: AutoscalingSection | None = Field(
        None, description="Let Ray Serve add and remove replicas with the load (min_replicas "
        "... max_replicas); null: a fixed count.")
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
        if self.autoscaling is not None and "count" in self.model_fields_set and self.count != 1:
            raise ValueError("count: with autoscaling, min_replicas and max_replicas size the "
                             "deployment; leave count out")
        return self

    @property
    def initial_count(self) -> int:
        """How many replicas the deployment starts with."""
        return self.autoscaling.min_replicas if self.autoscaling is not None else self.count


class RouterSection(Section):
    """How the ingress picks a replica (`fleetlm.cluster.router`). The prefix policies keep
    a request on the replica holding its longest cached prefix until that replica saturates;
    the weights rank the candidates the affinity filter leaves."""

    policy: Literal["round_robin", "least_loaded", "precise_prefix", "approx_prefix"] = Field(
        "least_loaded", description="How the ingress picks a replica for each request: "
        "round_robin; least_loaded (fewest requests in flight and waiting); precise_prefix "
        "(the replicas' KV events, turned on for it, say which blocks each holds); "
        "approx_prefix (the router remembers where it sent each prompt's blocks).",
    )
    prefix_weight: float = Field(
        1.0, ge=0, description="Weight of the prefix scorer (matched leading blocks / prompt "
        "blocks) under the prefix policies.")
    queue_weight: float = Field(
        0.5, ge=0, description="Weight of the queue scorer (fewer requests in flight and "
        "waiting) under the prefix policies.")
    kv_usage_weight: float = Field(
        0.1, ge=0, description="Weight of the KV-usage scorer (more free KV cache) under the "
        "prefix policies.")
    cached_blocks_weight: float = Field(
        1.0, ge=0, description="Weight of the cached-blocks scorer (fewer blocks cached or "
        "being computed) under the prefix policies. A prefix that no replica holds is placed "
        "by room while the caches have it (the affinity filter); this scorer still leans the "
        "same way once they are full.")
    saturation_threshold: int = Field(
        8, ge=1, description="Requests at a replica (this ingress's in flight, or its engine's "
        "running + waiting if more) at which it stops attracting its prefixes' requests (the "
        "saturation valve): they spill to the others; when every replica is that busy, "
        "only from a replica with this many more than the least loaded.")
    approx_history_blocks: int = Field(
        65536, ge=1, description="approx_prefix: block hashes the router remembers (least "
        "recently routed forgotten first); about the replicas' total KV blocks.")

    @model_validator(mode="before")
    @classmethod
    def _old_policy(cls, values):
        if isinstance(values, dict) and values.get("policy") == "prefix_aware":
            raise ValueError("router.policy 'prefix_aware' is now precise_prefix (from the "
                             "replicas' KV events) or approx_prefix (from the router's history)")
        return values


class MigrationSection(Section):
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


class HttpSection(Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP proxy.")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted bearer tokens; empty: no authentication."
    )
    ingress_num_cpus: float = Field(
        0.1, ge=0, description="Ray CPUs reserved by the ingress (a separate one, see ingress).")
    ingress: Literal["separate", "in_replica"] = Field(
        "separate",
        description="Where the OpenAI routes run. 'separate': an ingress deployment of its own, "
        "which routes among the engine replicas and moves a stream whose replica failed to "
        "another (or to its replacement). 'in_replica': in the one engine replica itself, one "
        "Serve hop and one process fewer per request, but a stream whose engine fails ends "
        "with an error; needs one replica (replicas.count 1, no autoscaling, no pd).",
    )
    stream_interval_ms: float = Field(
        DEFAULT_STREAM_INTERVAL_MS,
        ge=0,
        description="Least time between two streamed messages of one request; tokens that come "
        "sooner share a message. The first token is never held back. 0: one message per step.",
    )
    max_stream_messages_per_s: float = Field(
        DEFAULT_MAX_STREAM_MESSAGES_PER_S,
        ge=0,
        description="Most streamed messages per second one replica sends over all its "
        "streaming requests: with more streams open than this allows at stream_interval_ms, "
        "each stream's messages are spaced further apart (open streams / this), and more tokens "
        "share each message. The first token is never held back. 0: no limit.",
    )
    tool_call_parser: Literal["hermes", "llama3_json"] = Field(
        "hermes",
        description="How the model writes tool calls (vLLM's --tool-call-parser): 'hermes' "
        "(<tool_call>{...}</tool_call>: Hermes, Qwen 2.5/3, and the built-in model, which is "
        "told the tools in that format) or 'llama3_json' (Llama 3.x JSON calls).",
    )


class ClusterParallelSection(ParallelSection):
    """The engine's parallel settings plus where a replica's workers may be placed."""

    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker's bundle reserves besides CPUs and "
        "GPUs (e.g. {'accelerator_type:H100': 0.001}), so the worker group runs only on "
        "nodes that have them.",
    )

    @model_validator(mode="after")
    def _check_resources(self) -> ClusterParallelSection:
        _check_custom_resources("parallel.worker_resources", self.worker_resources)
        return self

    def to_parallel_config(self) -> ParallelConfig:
        # worker_resources is a placement matter: the Serve app adds it to the worker bundles.
        return ParallelConfig.from_section(self)


class PoolSection(Section):
    """One pool of a prefill/decode deployment: its replicas, their resources, parallelism
    and engine settings. Keys left out take the top-level `replicas`, `parallel` and `engine`
    sections' values."""

    count: int = Field(1, ge=1, description="Replicas in this pool.")
    autoscaling: AutoscalingSection | None = Field(
        None, description="Autoscale this pool (as replicas.autoscaling); null: a fixed count.")
    num_cpus: float | None = Field(
        None, ge=0, description="Ray CPUs reserved by each replica; default: replicas.num_cpus.")
    num_gpus: float | None = Field(
        None, ge=0, description="Ray GPUs reserved by each replica; default: replicas.num_gpus.")
    num_threads: int | None = Field(
        None, ge=1, description="Math-library threads of each replica (OMP_NUM_THREADS); "
        "default: replicas.num_threads.")
    resources: dict[str, float] | None = Field(
        None, description="Custom Ray resources of each replica (e.g. {pool-prefill: 1}); "
        "default: replicas.resources.")
    parallel: ClusterParallelSection | None = Field(
        None, description="Parallel sizes of each replica; default: the top-level parallel "
        "section. The pools may differ (KV heads are re-split on the way).")
    engine: dict[str, Any] = Field(
        default_factory=dict, description="Engine settings of this pool that differ from the "
        "top-level engine section, e.g. {max_num_batched_tokens: 2048}.")

    @model_validator(mode="after")
    def _check_engine_keys(self) -> PoolSection:
        unknown = sorted(set(self.engine) - set(EngineSection.model_fields))
        if unknown:
            raise ValueError(f"engine: unknown keys {unknown}; use the engine section's keys")
        if self.resources:
            _check_custom_resources("resources", self.resources)
        return self


class PDSection(Section):
    """Disaggregated prefill and decode: the decode pool answers requests and has a prefill
    replica compute each long prompt, then reads its KV (`fleetlm.kvtransfer`) and decodes.
    The top-level `kv_transfer` section sets the transport, timeouts and failure policy."""

    prefill: PoolSection = Field(default_factory=PoolSection, description="The prefill pool.")
    decode: PoolSection = Field(default_factory=PoolSection, description="The decode pool.")
    threshold_tokens: int = Field(
        256, ge=0,
        description="A prompt with fewer tokens than this that the decode replica does not "
        "already hold in its prefix cache is prefilled by the decode replica itself (a "
        "transfer would cost more than it saves). 0: every prompt goes to the prefill pool.")
    prefill_timeout_s: float = Field(
        60.0, gt=0,
        description="How long the decode replica waits for a prefill replica's answer before "
        "it applies kv_transfer.failure_policy (recompute: prefill itself; fail: a 503).")


class ClusterConfig(EngineArgs):
    """A whole deployment: what `fleetlm serve FILE` brings up. The model, engine, parallel
    and speculative sections are the engine's own settings (`EngineArgs`)."""

    name: str = Field("fleetlm", description="Ray Serve application name.")
    replicas: ReplicaSection = Field(
        default_factory=ReplicaSection, description="Data parallelism and resources."
    )
    router: RouterSection = Field(default_factory=RouterSection, description="Replica choice.")
    http: HttpSection = Field(default_factory=HttpSection, description="HTTP endpoint.")
    parallel: ClusterParallelSection = Field(
        default_factory=ClusterParallelSection, description="Model parallelism inside a replica."
    )
    migration: MigrationSection = Field(
        default_factory=MigrationSection, description="Requests of failed replicas."
    )
    pd: PDSection | None = Field(
        None, description="Disaggregated prefill and decode pools; null: every replica does both.")

    @model_validator(mode="before")
    @classmethod
    def _check_old_pd_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("pd"), dict) and \
                "enabled" in data["pd"]:
            raise ValueError("pd.enabled is gone: a pd section turns prefill/decode pools on, "
                             "pd: null (or no pd section) turns them off")
        return data

    @model_validator(mode="after")
    def _check_pd(self) -> ClusterConfig:
        if self.pd is None:
            return self
        if self.replicas.count != 1:
            raise ValueError("replicas.count: with a pd section, pd.prefill.count and "
                             "pd.decode.count size the pools; leave replicas.count out")
        if self.replicas.autoscaling is not None:
            raise ValueError("replicas.autoscaling: with a pd section each pool autoscales on "
                             "its own (pd.prefill.autoscaling, pd.decode.autoscaling)")
        if self.kv_transfer is not None and self.kv_transfer.role != "both":
            raise ValueError("kv_transfer.role: with a pd section each pool's role is set for "
                             "it (prefill: producer, decode: consumer); leave it out")
        if self.kv_transfer is not None and self.kv_transfer.transport == "inproc":
            raise ValueError("kv_transfer.transport: the pools run in separate processes; "
                             "use tcp or shm")
        prefill, decode = pool_config(self, "prefill"), pool_config(self, "decode")
        if prefill.engine.block_size != decode.engine.block_size:  # the KV layout
            raise ValueError("pd: the pools' engine.block_size must be equal")
        return self

    @model_validator(mode="after")
    def _check_ingress(self) -> ClusterConfig:
        if self.http.ingress != "in_replica":
            return self
        for key, is_set in (("replicas.count", self.replicas.count != 1),
                            ("replicas.autoscaling", self.replicas.autoscaling is not None),
                            ("pd", self.pd is not None)):
            if is_set:
                raise ValueError(f"{key}: http.ingress 'in_replica' serves from one engine "
                                 "replica; use 'separate' to route among several")
        return self

    @model_validator(mode="after")
    def _check_replica_bundle(self) -> ClusterConfig:
        if self.parallel.is_distributed and not (self.replicas.num_cpus or self.replicas.num_gpus):
            raise ValueError("replicas.num_cpus must be above 0 when a replica drives a worker "
                             "group: its placement-group bundle needs some resource")
        return self


Pool = Literal["prefill", "decode"]
_POOL_ROLES = {"prefill": "producer", "decode": "consumer"}


def pool_config(config: ClusterConfig, pool: Pool) -> ClusterConfig:
    """One pool of a P/D deployment as a plain deployment: its replicas, parallelism and
    engine settings, and the KV-transfer role of its engines (`ValueError` naming the pool's
    key if they do not make a valid deployment)."""
    section = getattr(config.pd, pool)
    data = config.model_dump(exclude={"pd"})
    replicas = data["replicas"]
    replicas["count"] = section.count
    replicas["autoscaling"] = section.autoscaling.model_dump() if section.autoscaling else None
    for key in ("num_cpus", "num_gpus", "num_threads", "resources"):
        if getattr(section, key) is not None:
            replicas[key] = getattr(section, key)
    if section.parallel is not None:
        data["parallel"] = section.parallel.model_dump()
    data["engine"].update(section.engine)
    data["kv_transfer"] = {**(data["kv_transfer"] or {}), "role": _POOL_ROLES[pool]}
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"pd.{pool}: {describe(e)}") from None


def load_config(path: str | Path) -> ClusterConfig:
    """Read a deployment YAML; raise `ValueError` naming the file and every bad key."""
    return parse_config(read_yaml(path), str(path))


def read_yaml(path: str | Path) -> object:
    """A YAML file's data (an empty file: an empty mapping); OSError if it cannot be read."""
    text = Path(path).read_text()
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None


def parse_config(data: object, source: str, key_of=dotted_key) -> ClusterConfig:
    """A deployment config from its YAML's mapping; `ValueError` names `source` and every bad
    key (as `key_of` spells a pydantic error location)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{source}: {describe(e, key_of)}") from None


def to_engine_config(config: ClusterConfig) -> EngineConfig:
    """The engine's view of a deployment: its model, cache, scheduler and parallel sections."""
    return EngineConfig.from_args(config)


def check_model_fits(config: ClusterConfig) -> None:
    """Raise ValueError if the model cannot be split as `parallel` says (e.g. "parallel:
    tensor_parallel_size 2 does not divide 9 attention heads"), or as a P/D pool's says,
    where the model can be found here; a model that exists only on the cluster's nodes is
    checked there, by each replica."""
    from fleetlm.executor.weights import load_hf_config, resolve_model

    if config.pd is not None:
        pools = {f"pd.{pool}.parallel": pool_config(config, pool).parallel
                 for pool in ("prefill", "decode")}
    else:
        pools = {"parallel": config.parallel}
    splits = {key: section.to_parallel_config() for key, section in pools.items()}
    splits = {key: parallel for key, parallel in splits.items() if parallel.is_distributed}
    if not splits:
        return
    try:
        hf_config = load_hf_config(resolve_model(config.model.name))
    except (OSError, ValueError):
        return
    for key, parallel in splits.items():
        try:
            parallel.check_fits(hf_config)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
