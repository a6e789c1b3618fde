"""Build and deploy the Ray Serve application of one `ClusterConfig`, in one place.

    OpenAIIngress (FastAPI)  ──handle──>  LLMServer (replicas.count replicas, or autoscaled)

With a `pd` section the ingress routes to the decode pool, whose replicas hold a handle to
the prefill pool (pd.py):

    OpenAIIngress ──> LLMServer-decode (pd.decode.count) ──prefill()──> LLMServer-prefill

Each pool is one Serve deployment: Serve checks, replaces and autoscales its replicas, and
every handle to it routes with fleetlm's policy through Serve's request-router API
(serve_router.py; `router:` in the YAML; the prefill pool: least loaded). A replica whose
model is split over a worker group reserves one placement group for itself and its workers:

    bundle 0: the replica (replicas.num_cpus / num_gpus)   bundles 1..N: one per rank

so Serve starts it only where the whole group fits, and replaces it as a whole.

With `http.ingress: in_replica` (one replica, no pd) the engine replica serves the routes
itself, one Serve hop fewer (EngineReplicaIngress):

    Serve's HTTP proxy ──> LLMServer (OpenAIIngress ──LocalHandle──> its own LLMServer methods)

and on a local cluster that `fleetlm serve` starts, the replica listens on the config's port
itself (Serve's direct ingress, `direct_ingress_env`), with no proxy in between.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import replace

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.config import HTTPOptions, RequestRouterConfig

from fleetlm.cluster.autoscaling import serve_autoscaling_config
from fleetlm.cluster.config import (
    ClusterConfig,
    MigrationSection,
    RouterSection,
    parse_config,
    pool_config,
    to_engine_config,
)
from fleetlm.cluster.ingress import OpenAIIngress, build_fastapi, make_ingress_class
from fleetlm.cluster.local_handle import LocalHandle
from fleetlm.cluster.prompt_hashing import PromptHasher
from fleetlm.cluster.serve_logs import send_fleetlm_logs_to_serve
from fleetlm.cluster.serve_router import (
    REQUEST_ROUTER,
    ROUTING_STATS_PERIOD_S,
    ROUTING_STATS_TIMEOUT_S,
    routing_table,
)
from fleetlm.cluster.server import EngineFactory, LLMServer

logger = logging.getLogger(__name__)

INGRESS_NAME = "OpenAIIngress"
MS_PER_S = 1000.0
# Serve replaces a replica after this long without a health-check answer (a wedged replica).
HEALTH_CHECK_TIMEOUT_S = 10.0
# A stopping replica waits this long before each look at its ongoing requests (Serve's default
# is 2 s): an idle replica (a scale-down, `fleetlm serve`'s ^C, a redeploy) is gone in half a
# second instead of two, and a busy one still finishes its streams (graceful_shutdown_timeout_s).
SHUTDOWN_CHECK_PERIOD_S = 0.5


class LLMServerDeployment(LLMServer):
    """`LLMServer` plus Ray Serve's hooks: its log file and shutdown (an async `__del__`)."""

    def __init__(self, *args, **kwargs) -> None:
        send_fleetlm_logs_to_serve()
        context = serve.get_replica_context()
        kwargs["replica_id"] = replica_label(context.deployment, context.replica_id.unique_id)
        super().__init__(*args, **kwargs)

    async def __del__(self) -> None:
        await self.shutdown()
        parent = getattr(super(), "__del__", None)  # Serve's ASGI wrapper's, if an ingress too
        if parent is not None:
            await parent()


class EngineReplicaIngress(LLMServerDeployment):
    """An engine replica that serves the OpenAI routes itself (`http.ingress: in_replica`):
    its `OpenAIIngress` calls this replica's own methods through a `LocalHandle`, on this
    event loop. Without another replica to move to, a stream whose engine fails ends with an
    error (no migration); Serve replaces the replica, routes and engine together."""

    def __init__(self, *args, router: RouterSection, api_keys: Sequence[str] = (),
                 hasher: PromptHasher | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        context = serve.get_replica_context()
        table = routing_table(context.app_name, context.deployment, router)
        handle = LocalHandle(self, context.app_name, context.deployment,
                             context.replica_id.unique_id, table)
        self.ingress = OpenAIIngress(self.model_name, handle, router, api_keys,
                                     MigrationSection(max_migrations=0), hasher=hasher)

    def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve calls this in the replica
        return build_fastapi(self.ingress)


def server_name(index: int, pool: str = "") -> str:
    """How the resource check names one replica: LLMServer-0, or LLMServer-prefill-0."""
    return f"{deployment_name(pool)}-{index}"


def replica_label(deployment: str, replica: str) -> str:
    """A replica in /metrics and the logs: its deployment and Serve's id of it."""
    return f"{deployment}#{replica}"


def deployment_name(pool: str = "") -> str:
    """An engine pool's deployment: LLMServer, or LLMServer-prefill / LLMServer-decode."""
    return f"LLMServer-{pool}" if pool else "LLMServer"


def build_app(config: ClusterConfig, engine_factory: EngineFactory | None = None) -> Application:
    """The application: one ingress bound to the engine deployment, or with a `pd` section
    to the decode pool's, which is bound to the prefill pool's; with `http.ingress:
    in_replica`, the engine deployment alone, its replica serving the routes.

    `engine_factory(EngineConfig) -> EngineClient` builds each replica's engine; None means
    fleetlm's own `AsyncEngine`. It is pickled to the replicas, so it must be importable there.
    """
    if config.http.ingress == "in_replica":  # the config checked: one replica, no pd
        return _server(config, engine_factory, deployment_class=serve.ingress()(
            EngineReplicaIngress), router=config.router, api_keys=config.http.api_keys,
            hasher=_prompt_hasher(config, engine_factory))
    if config.pd is None:
        server, prefill_server = _server(config, engine_factory), None
        max_replicas = _max_replicas(config)
    else:
        prefill_config, decode_config = pool_config(config, "prefill"), pool_config(config,
                                                                                     "decode")
        prefill_server = _server(prefill_config, engine_factory, "prefill",
                                 routed_by=RouterSection(policy="least_loaded"))
        server = _server(decode_config, engine_factory, "decode",
                         prefill_server=prefill_server, pd=config.pd)
        max_replicas = _max_replicas(decode_config)
    ingress = serve.deployment(make_ingress_class()).options(
        name=INGRESS_NAME,
        num_replicas=1,
        ray_actor_options={"num_cpus": config.http.ingress_num_cpus},
        max_ongoing_requests=config.replicas.max_ongoing_requests * max_replicas,
        graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_PERIOD_S,
    )
    return ingress.bind(
        config.model.served_name, server, config.router, config.http.api_keys,
        config.migration, prefill_server, _prompt_hasher(config, engine_factory),
    )


def _prompt_hasher(config: ClusterConfig, engine_factory: EngineFactory | None
                   ) -> PromptHasher | None:
    """The ingress tokenizes each prompt once for fleetlm's engines (they get the token
    ids); the prefix-aware policies also match its block hashes, computed as the engines do.
    Another engine keeps its own tokenizer: the ingress then hashes only, if it must."""
    is_prefix_policy = config.router.policy in ("precise_prefix", "approx_prefix")
    if engine_factory is not None and not is_prefix_policy:
        return None
    return PromptHasher(config.model.name, config.model.tokenizer, config.engine.block_size,
                        send_token_ids=engine_factory is None)


def num_engine_replicas(config: ClusterConfig) -> int:
    """The engine replicas a deployment starts with (both pools under P/D)."""
    if config.pd is None:
        return config.replicas.initial_count
    return sum(pool_config(config, pool).replicas.initial_count for pool in ("prefill", "decode"))


def _max_replicas(config: ClusterConfig) -> int:
    autoscaling = config.replicas.autoscaling
    return autoscaling.max_replicas if autoscaling is not None else config.replicas.count


def _server(config: ClusterConfig, engine_factory: EngineFactory | None, pool: str = "",
            routed_by: RouterSection | None = None,
            deployment_class: type = LLMServerDeployment, **kwargs) -> Application:
    """The bound engine deployment (or one P/D pool's), routed by `routed_by` (default: the
    config's own router); `kwargs` go to `deployment_class` (P/D's, the ingress's)."""
    router = routed_by or config.router
    engine_config = to_engine_config(config)
    if router.policy == "precise_prefix":  # the router mirrors the replicas' caches
        engine_config = replace(engine_config,
                                cache=replace(engine_config.cache, enable_kv_events=True))
    interval_s = config.http.stream_interval_ms / MS_PER_S
    replicas = config.replicas
    if replicas.autoscaling is None:
        scaling: dict = {"num_replicas": replicas.count}
    else:
        scaling = {"autoscaling_config": serve_autoscaling_config(replicas.autoscaling)}
    return (
        serve.deployment(deployment_class)
        .options(
            name=deployment_name(pool),
            ray_actor_options=_replica_actor_options(config),
            max_ongoing_requests=replicas.max_ongoing_requests,
            health_check_period_s=replicas.health_check_period_s,
            health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
            graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_PERIOD_S,
            request_router_config=RequestRouterConfig(
                request_router_class=REQUEST_ROUTER,
                request_router_kwargs={"router": router.model_dump()},
                request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
                request_routing_stats_timeout_s=ROUTING_STATS_TIMEOUT_S,
            ),
            **scaling,
            **_placement_options(config),
        )
        .bind(engine_config, config.model.served_name, engine_factory, interval_s,
              max_stream_messages_per_s=config.http.max_stream_messages_per_s,
              tool_call_parser=config.http.tool_call_parser, **kwargs)
    )


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


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment under which Ray Serve's replicas (and its controller, which hands out
    their ports) let an ingress replica listen on `port` itself (Serve's direct ingress), for
    a local cluster whose one engine replica serves the routes (`http.ingress: in_replica`):
    a request then reaches the routes with no proxy process and no gRPC hop, and neither do
    its streamed messages."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # range(min, max)
        # No load balancer in front to deregister a stopping replica from: it closes the port
        # at once, and its replacement may take the port again at once.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def is_direct_ingress(config: ClusterConfig) -> bool:
    """Whether this process's Ray cluster was started with `direct_ingress_env` of this
    config's port (launcher.connect does that for an in_replica config)."""
    env = direct_ingress_env(config.http.port)
    names = ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
             "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")
    return config.http.ingress == "in_replica" and all(
        os.environ.get(name) == env[name] for name in names)


def start_http(config: ClusterConfig) -> None:
    """Start Serve's HTTP proxy where the config says (no-op if Serve already runs). Under
    direct ingress the engine replica listens on the config's port, and the proxy (which
    Serve needs running for that) on a free port of its own."""
    port = _free_port(config.http.host) if is_direct_ingress(config) else config.http.port
    serve.start(http_options=HTTPOptions(host=config.http.host, port=port))


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
        logger.info("Deploying %s: %d replica(s) of %s", config.name,
                    config.replicas.initial_count, config.model.name)
    else:
        logger.info("Deploying %s: %d prefill and %d decode replica(s) of %s", config.name,
                    config.pd.prefill.count, config.pd.decode.count, config.model.name)
    app = build_app(config, engine_factory)
    serve._run(app, name=config.name, route_prefix=route_prefix, _blocking=is_blocking)


def url_of(config: ClusterConfig) -> str:
    return f"http://{config.http.host}:{config.http.port}"
