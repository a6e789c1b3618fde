"""Build and deploy the Ray Serve application of one `ClusterConfig`, in one place.

    OpenAIIngress (FastAPI, router)  ──handle──>  LLMServer-0 … LLMServer-{count-1}

With a `pd` section the ingress routes to the decode pool, whose replicas hold handles to
the prefill pool's (pd.py):

    OpenAIIngress ──> LLMServer-decode-0 … ──prefill()──> LLMServer-prefill-0 …

Each engine replica is its own single-replica deployment, so the ingress holds a handle per
replica and its router, not Serve's, decides where a request goes. A replica whose model is
split over a worker group reserves one placement group for itself and its workers:

    bundle 0: the replica (replicas.num_cpus / num_gpus)   bundles 1..N: one per rank

so Serve starts it only where the whole group fits, and replaces it as a whole.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ray import serve
from ray.serve import Application
from ray.serve.config import HTTPOptions

from fleetlm.cluster.config import ClusterConfig, parse_config, pool_config, to_engine_config
from fleetlm.cluster.ingress import make_ingress_class
from fleetlm.cluster.prompt_hashing import PromptHasher
from fleetlm.cluster.serve_logs import send_fleetlm_logs_to_serve
from fleetlm.cluster.server import EngineFactory, LLMServer

logger = logging.getLogger(__name__)

INGRESS_NAME = "OpenAIIngress"
MS_PER_S = 1000.0
# Serve replaces a replica after this long without a health-check answer (a wedged replica).
HEALTH_CHECK_TIMEOUT_S = 10.0


class LLMServerDeployment(LLMServer):
    """`LLMServer` plus Ray Serve's hooks: its log file and shutdown (an async `__del__`)."""

    def __init__(self, *args, **kwargs) -> None:
        send_fleetlm_logs_to_serve()
        super().__init__(*args, **kwargs)

    async def __del__(self) -> None:
        await self.shutdown()


def server_name(index: int, pool: str = "") -> str:
    """A replica's deployment name: LLMServer-0, or LLMServer-prefill-0 in a P/D pool."""
    return f"LLMServer-{pool}-{index}" if pool else f"LLMServer-{index}"


def build_app(config: ClusterConfig, engine_factory: EngineFactory | None = None) -> Application:
    """The application: one ingress bound to `config.replicas.count` engine replicas, or with
    a `pd` section to the decode pool's replicas, each bound to the prefill pool's.

    `engine_factory(EngineConfig) -> EngineClient` builds each replica's engine; None means
    fleetlm's own `AsyncEngine`. It is pickled to the replicas, so it must be importable there.
    """
    if config.pd is None:
        servers, prefill_servers = _servers(config, engine_factory), []
    else:
        prefill_servers = _servers(pool_config(config, "prefill"), engine_factory, "prefill")
        servers = _servers(pool_config(config, "decode"), engine_factory, "decode",
                           prefill_servers=prefill_servers, pd=config.pd)
    num_servers = len(servers)
    ingress = serve.deployment(make_ingress_class()).options(
        name=INGRESS_NAME,
        num_replicas=1,
        ray_actor_options={"num_cpus": config.http.ingress_num_cpus},
        max_ongoing_requests=config.replicas.max_ongoing_requests * num_servers,
    )
    return ingress.bind(
        config.model.served_name, servers, config.router, config.http.api_keys,
        config.migration, prefill_servers, _prompt_hasher(config),
    )


def _prompt_hasher(config: ClusterConfig) -> PromptHasher | None:
    """The prefix-aware policies match prompts' block hashes, computed as the engines do."""
    if config.router.policy not in ("precise_prefix", "approx_prefix"):
        return None
    return PromptHasher(config.model.name, config.model.tokenizer, config.engine.block_size)


def _servers(config: ClusterConfig, engine_factory: EngineFactory | None, pool: str = "",
             **pd_kwargs) -> list:
    """The bound engine replicas of a deployment (or of one P/D pool)."""
    engine_config = to_engine_config(config)
    if config.router.policy == "precise_prefix" and pool != "prefill":  # the router mirrors
        # the caches of the replicas it routes to
        engine_config = replace(engine_config,
                                cache=replace(engine_config.cache, enable_kv_events=True))
    interval_s = config.http.stream_interval_ms / MS_PER_S
    return [
        serve.deployment(LLMServerDeployment)
        .options(
            name=server_name(i, pool),
            num_replicas=1,
            ray_actor_options=_replica_actor_options(config),
            max_ongoing_requests=config.replicas.max_ongoing_requests,
            health_check_period_s=config.replicas.health_check_period_s,
            health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
            **_placement_options(config),
        )
        .bind(engine_config, config.model.served_name, engine_factory, interval_s,
              server_name(i, pool), config.http.tool_call_parser, **pd_kwargs)
        for i in range(config.replicas.count)
    ]


def app_builder(args: dict) -> Application:
    """Ray Serve's entry for Serve config files and KubeRay's `serveConfigV2`:
    `import_path: fleetlm.cluster.app:app_builder` with the fleetlm deployment YAML as `args`.
    There Serve's own `http_options` place the HTTP proxy; the config's http host and port are
    for `fleetlm serve/deploy` only."""
    return build_app(parse_config(args, "serve config args"))


def _replica_actor_options(config: ClusterConfig) -> dict:
    replicas = config.replicas
    options: dict = {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus}
    if replicas.resources:
        options["resources"] = dict(replicas.resources)
    if replicas.num_threads is not None:
        env = {"OMP_NUM_THREADS": str(replicas.num_threads)}
        options["runtime_env"] = {"env_vars": env}
    return options


def _placement_options(config: ClusterConfig) -> dict:
    """Serve options that reserve a replica's worker group with it (none in-process)."""
    bundles = replica_bundles(config)
    if len(bundles) == 1:
        return {}
    return {
        "placement_group_bundles": bundles,
        "placement_group_strategy": config.parallel.placement_strategy,
    }


def replica_bundles(config: ClusterConfig) -> list[dict[str, float]]:
    """What one engine replica reserves: its own bundle, then one bundle per worker rank (just
    its own when the model runs in-process). The deploy command checks these against the
    cluster's nodes before deploying."""
    replicas = config.replicas
    replica_bundle = {"CPU": replicas.num_cpus, **replicas.resources}
    if replicas.num_gpus:
        replica_bundle["GPU"] = replicas.num_gpus
    parallel = config.parallel.to_parallel_config()
    if not parallel.is_distributed:
        return [replica_bundle]
    from fleetlm.executor.ray_executor import worker_bundles, worker_device

    workers = worker_bundles(parallel, worker_device(config.model.device))
    return [replica_bundle, *({**b, **config.parallel.worker_resources} for b in workers)]


def start_http(config: ClusterConfig) -> None:
    """Start Serve's HTTP proxy where the config says (no-op if Serve already runs)."""
    serve.start(http_options=HTTPOptions(host=config.http.host, port=config.http.port))


def deploy(
    config: ClusterConfig,
    engine_factory: EngineFactory | None = None,
    is_blocking: bool = True,
    route_prefix: str = "/",
) -> None:
    """Deploy (or update) the application on the connected Ray cluster.

    With `is_blocking`, return once every replica is running; otherwise return at once.
    """
    start_http(config)
    if config.pd is None:
        logger.info("Deploying %s: %d replica(s) of %s", config.name, config.replicas.count,
                    config.model.name)
    else:
        logger.info("Deploying %s: %d prefill and %d decode replica(s) of %s", config.name,
                    config.pd.prefill.count, config.pd.decode.count, config.model.name)
    app = build_app(config, engine_factory)
    serve._run(app, name=config.name, route_prefix=route_prefix, _blocking=is_blocking)


def url_of(config: ClusterConfig) -> str:
    return f"http://{config.http.host}:{config.http.port}"
