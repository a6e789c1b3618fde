"""What the CLI does on a Ray cluster: connect, deploy with a progress bar, report, tear down.

Kept apart from cli.py so the CLI stays an argument parser and these steps stay testable.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator

from tqdm.auto import tqdm

from fleetlm.cluster import resources
from fleetlm.cluster.app import deploy, direct_ingress_env, num_engine_replicas, url_of
from fleetlm.cluster.config import ClusterConfig

logger = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.5
NODE_POLL_INTERVAL_S = 2.0
RUNNING = "RUNNING"
FAILED_STATES = ("DEPLOY_FAILED", "UNHEALTHY")
# What Serve puts in a deployment's message when replicas have waited for resources longer
# than RAY_SERVE_SLOW_STARTUP_WARNING_S (30 s by default): the cluster has no room for them now.
UNSCHEDULABLE_PATTERN = re.compile(r"taken more than \S+ to be scheduled")


# What a local cluster's Ray processes get unless the environment says otherwise; a cluster
# started with `ray start` takes them from its start commands (deploy/ray-cluster-*.yaml).
RAY_ENV_DEFAULTS = {
    # Ray runs workers at nice 15; an engine replica's OpenMP threads then lose the CPU to every
    # Ray daemon, and each preempted thread stalls the whole parallel region.
    "RAY_worker_niceness": "0",
    # Serve's HTTP proxy calls the ingress over gRPC instead of as Ray actor tasks: every
    # streamed message costs the proxy less CPU, which the engine's threads get back.
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def set_ray_env_defaults() -> None:
    """RAY_ENV_DEFAULTS into this process's environment (a Ray cluster it starts inherits
    them), where not already set."""
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def connect(address: str | None, is_local_allowed: bool,
            config: ClusterConfig | None = None) -> bool:
    """Join the cluster at `address` (or `RAY_ADDRESS`); else start a local one if allowed,
    for `config`: where its routes run in its one engine replica (`http.ingress: in_replica`),
    the replica listens on `http.port` itself (app.direct_ingress_env) unless the environment
    sets RAY_SERVE_ENABLE_DIRECT_INGRESS=0.

    Returns True if this process started the cluster (and so should stop it).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("Joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    if not is_local_allowed:
        try:
            ray.init(address="auto", logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ConnectionError(
                "no running Ray cluster found: pass --address or set RAY_ADDRESS"
            ) from e
        return False
    logger.info("Starting a local Ray cluster on %s", LOCAL_HOST)
    set_ray_env_defaults()
    if config is not None and config.http.ingress == "in_replica" and config.http.port and (
            os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "0"):
        os.environ.update(direct_ingress_env(config.http.port))
    ray.init(_node_ip_address=LOCAL_HOST, include_dashboard=False, logging_level=logging.WARNING)
    return True


def deploy_and_wait(config: ClusterConfig, timeout_s: float,
                    is_waiting_for_resources: bool = False) -> None:
    """Check that the cluster can hold `config`, deploy it, and show replicas coming up until
    all run. Raises `ResourceShortfall` (at once, or after `timeout_s` when waiting for nodes to
    join), `RuntimeError` if Serve gives up, `Unschedulable` when Serve reports replicas it
    cannot place (unless waiting for resources), `DeployTimeout` after `timeout_s` in all."""
    deadline = time.monotonic() + timeout_s
    _wait_until_it_fits(config, deadline if is_waiting_for_resources else time.monotonic())
    deploy(config, is_blocking=False)
    # The engine replicas and the ingress (unless it runs in the one engine replica).
    num_replicas = num_engine_replicas(config) + (config.http.ingress == "separate")
    with tqdm(total=num_replicas, desc=f"Starting {config.model.name}", unit="replica") as bar:
        for num_running, status, message in _poll_app(config.name):
            bar.update(num_running - bar.n)
            if status in FAILED_STATES:
                raise RuntimeError(f"deploying {config.name} failed: {message}")
            if status == RUNNING:
                return
            if not is_waiting_for_resources and UNSCHEDULABLE_PATTERN.search(message):
                raise Unschedulable(_unschedulable_message(config, message))
            if time.monotonic() > deadline:
                raise DeployTimeout(_timeout_message(config, timeout_s, message))


class DeployTimeout(RuntimeError):
    """The replicas did not all run in time; the application stays deployed."""


class Unschedulable(RuntimeError):
    """The cluster's free resources cannot hold a replica (others hold the rest, though the
    nodes' totals would fit); the application stays deployed."""


def _wait_until_it_fits(config: ClusterConfig, deadline: float) -> None:
    """Return once the cluster's nodes can hold `config`; past `deadline` raise why not."""
    while True:
        try:
            return resources.check_fits(config, resources.cluster_nodes())
        except resources.ResourceShortfall:
            if time.monotonic() > deadline:
                raise
        time.sleep(NODE_POLL_INTERVAL_S)


def _unschedulable_message(config: ClusterConfig, message: str) -> str:
    lines = [f"cannot place every replica of {config.name}: the cluster's nodes could hold "
             "it, but other applications or actors hold the resources it needs",
             f"Ray Serve says: {message}"]
    lines += status_lines()
    lines.append("Free resources (`fleetlm shutdown --app NAME` removes an application), or "
                 "pass --wait-for-resources to wait for them within --timeout. "
                 f"{config.name} stays deployed and Serve keeps trying; "
                 f"`fleetlm shutdown --app {config.name}` removes it.")
    return "\n".join(lines)


def _timeout_message(config: ClusterConfig, timeout_s: float, message: str) -> str:
    lines = [f"gave up after {timeout_s:g} s: not every replica of {config.name} is running"]
    lines += status_lines()
    if message:
        lines.append(f"Ray Serve says: {message}")
    lines.append(f"{config.name} stays deployed and Serve keeps trying; "
                 f"`fleetlm shutdown --app {config.name}` removes it.")
    return "\n".join(lines)


def _poll_app(name: str) -> Iterator[tuple[int, str, str]]:
    from ray import serve

    while True:
        app = serve.status().applications.get(name)
        if app is None:  # not registered yet
            yield 0, "", ""
        else:
            num_running = sum(
                d.replica_states.get(RUNNING, 0) for d in app.deployments.values()
            )
            messages = [app.message, *(d.message for d in app.deployments.values())]
            yield num_running, _name(app.status), " ".join(m for m in messages if m)
        time.sleep(POLL_INTERVAL_S)


def _name(status) -> str:
    """Serve's status enums print as "ApplicationStatus.RUNNING"; we want "RUNNING"."""
    return getattr(status, "value", str(status))


def ready_message(config: ClusterConfig) -> str:
    import ray

    url = url_of(config)
    address = ray.get_runtime_context().gcs_address
    key = f' -H "Authorization: Bearer {config.http.api_keys[0]}"' if config.http.api_keys else ""
    return (
        f"fleetlm is serving {config.model.served_name} at {url}/v1 (chat page: {url}/)\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{key} \\\n"
        f"    -d '{{\"model\": \"{config.model.served_name}\", "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"Ray cluster: {address} (fleetlm status --address {address})"
    )


def status_lines() -> list[str]:
    """Each application and deployment with its replica states, then each node with the
    replicas it runs."""
    from ray.serve.context import _get_global_client

    return format_status(_get_global_client().get_serve_details(), resources.cluster_nodes())


def format_status(details: dict, nodes: list[resources.Node]) -> list[str]:
    """`details`: Serve's instance details (the dict behind its REST API)."""
    applications = details.get("applications") or {}
    if not applications:
        return ["No fleetlm applications are running."]
    lines = []
    on_node: dict[str, list[str]] = {node.address: [] for node in nodes}
    for app_name, app in applications.items():
        message = app.get("message")
        lines.append(f"{app_name}: {_name(app['status'])}" + (f" ({message})" if message else ""))
        for deployment_name, deployment in app["deployments"].items():
            replicas = deployment.get("replicas") or []
            states = Counter(_name(replica["state"]) for replica in replicas)
            counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            lines.append(f"  {deployment_name}: {_name(deployment['status'])} [{counts}]")
            for replica in replicas:
                where = replica.get("node_ip") or "(not placed yet)"
                on_node.setdefault(where, []).append(
                    f"{deployment_name} {_name(replica['state'])}")
    lines.append("Replicas by node:")
    for address, names in on_node.items():
        node = next((n for n in nodes if n.address == address), None)
        capacity = f" ({resources.format_resources(node.resources)})" if node else ""
        lines.append(f"  {address}{capacity}: {', '.join(names) or 'no replicas'}")
    return lines


def teardown(app_name: str | None, is_cluster_owned: bool) -> None:
    """Delete one app (or all of Serve with None); stop Ray if this process started it."""
    import ray
    from ray import serve

    if app_name is None or is_cluster_owned:
        serve.shutdown()
    else:
        serve.delete(app_name)
    ray.shutdown()
