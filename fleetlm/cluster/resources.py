"""Does a deployment fit the cluster? Every bundle it reserves, against the nodes' resources.

An engine replica that drives a worker group is one placement group (bundle 0: the replica,
then one bundle per rank, placed by `parallel.placement_strategy`); an in-process replica and
the ingress are single actors. `find_shortfalls` reports only what cannot fit the nodes as
they are, counting their total resources (not what is free now), so it never refuses what
Ray could place: a bundle no node can hold, a STRICT_PACK group no node can hold whole, a
STRICT_SPREAD group with fewer fitting nodes than bundles, a resource the whole deployment
needs more of than the cluster has. Each message names the bundle, the resource and how much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleetlm.cluster.config import ClusterConfig, pool_config

# Ray's accounting is in units of 1/10000; anything smaller is rounding.
EPSILON = 1e-6
# Per-node entries of ray.nodes() that are not resources a deployment asks for.
_HIDDEN_PREFIXES = ("node:", "memory", "object_store_memory")


class ResourceShortfall(RuntimeError):
    """The cluster cannot hold the deployment; the message lists every reason."""


@dataclass(frozen=True)
class Bundle:
    owner: str  # e.g. "LLMServer-0 bundle 2 (worker rank 1)"
    resources: Mapping[str, float]


@dataclass(frozen=True)
class Group:
    """What Ray places as one unit: a placement group, or a single actor (one bundle)."""

    name: str
    bundles: tuple[Bundle, ...]
    strategy: str = "PACK"


@dataclass(frozen=True)
class Node:
    address: str
    resources: Mapping[str, float]  # totals


def deployment_groups(config: ClusterConfig) -> list[Group]:
    """The engine replicas' groups and the ingress (unless it runs in the replica), as
    `fleetlm.cluster.app` reserves them."""
    from fleetlm.cluster.app import INGRESS_NAME

    if config.pd is None:
        groups = _replica_groups(config)
    else:
        groups = [*_replica_groups(pool_config(config, "prefill"), "prefill"),
                  *_replica_groups(pool_config(config, "decode"), "decode")]
    if config.http.ingress == "separate":
        groups.append(Group(INGRESS_NAME, (Bundle(INGRESS_NAME,
                                                  {"CPU": config.http.ingress_num_cpus}),)))
    return groups


def _replica_groups(config: ClusterConfig, pool: str = "") -> list[Group]:
    from fleetlm.cluster.app import replica_bundles, server_name

    bundles = replica_bundles(config)
    groups = []
    for index in range(config.replicas.initial_count):
        name = server_name(index, pool)
        if len(bundles) == 1:
            groups.append(Group(name, (Bundle(name, bundles[0]),)))
            continue
        owners = [f"{name} bundle 0 (the replica)"] + [
            f"{name} bundle {rank + 1} (worker rank {rank})" for rank in range(len(bundles) - 1)]
        groups.append(Group(name, tuple(map(Bundle, owners, bundles)),
                            config.parallel.placement_strategy))
    return groups


def find_shortfalls(groups: Sequence[Group], nodes: Sequence[Node]) -> list[str]:
    """Why the groups cannot fit the nodes; empty when they may."""
    problems = []
    for group in groups:
        problems += _group_shortfalls(group, nodes)
    return problems + _total_shortfalls(groups, nodes)


def _group_shortfalls(group: Group, nodes: Sequence[Node]) -> list[str]:
    if group.strategy == "STRICT_PACK" and len(group.bundles) > 1:
        together = Bundle(f"{group.name} (STRICT_PACK: all {len(group.bundles)} bundles on one "
                          f"node)", _sum(b.resources for b in group.bundles))
        return _bundle_shortfalls(together, nodes)
    problems = []
    for bundle in group.bundles:
        problems += _bundle_shortfalls(bundle, nodes)
    if group.strategy == "STRICT_SPREAD" and not problems:
        fitting = [n.address for n in nodes if _fits(group.bundles[0].resources, n.resources)]
        if len(fitting) < len(group.bundles):
            problems.append(
                f"{group.name} needs {len(group.bundles)} nodes (STRICT_SPREAD: one bundle "
                f"each, {format_resources(group.bundles[0].resources)}), but only {len(fitting)} can "
                f"hold a bundle: {', '.join(fitting) or 'none'}")
    return problems


def _bundle_shortfalls(bundle: Bundle, nodes: Sequence[Node]) -> list[str]:
    if any(_fits(bundle.resources, node.resources) for node in nodes):
        return []
    problems = []
    for name, amount in bundle.resources.items():
        most = max((node.resources.get(name, 0.0) for node in nodes), default=0.0)
        if amount > most + EPSILON:
            problems.append(f"{bundle.owner} needs {name} {amount:g}, but no node has more "
                            f"than {most:g} ({_describe(nodes, name)})")
    if not problems:  # each resource exists somewhere, but never all on one node
        problems.append(f"{bundle.owner} needs {format_resources(bundle.resources)} on one node, but no "
                        f"node has all of it ({_describe(nodes, *bundle.resources)})")
    return problems


def _total_shortfalls(groups: Sequence[Group], nodes: Sequence[Node]) -> list[str]:
    needed = _sum(b.resources for g in groups for b in g.bundles)
    have = _sum(node.resources for node in nodes)
    problems = []
    for name, amount in needed.items():
        if amount > have.get(name, 0.0) + EPSILON:
            parts = ", ".join(f"{g.name} {_sum(b.resources for b in g.bundles)[name]:g}"
                              for g in groups if _sum(b.resources for b in g.bundles).get(name))
            problems.append(f"the deployment needs {name} {amount:g} in all ({parts}), but "
                            f"the cluster has {have.get(name, 0.0):g}")
    return problems


def _fits(need: Mapping[str, float], have: Mapping[str, float]) -> bool:
    return all(amount <= have.get(name, 0.0) + EPSILON for name, amount in need.items())


def _sum(resource_maps) -> dict[str, float]:
    total: dict[str, float] = {}
    for resources in resource_maps:
        for name, amount in resources.items():
            total[name] = total.get(name, 0.0) + amount
    return {name: amount for name, amount in total.items() if amount}


def format_resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in resources.items() if amount)


def _describe(nodes: Sequence[Node], *names: str) -> str:
    if not nodes:
        return "the cluster has no nodes"
    return "nodes: " + "; ".join(
        f"{node.address} " + (", ".join(f"{n} {node.resources.get(n, 0.0):g}" for n in names))
        for node in nodes)


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, with their total resources."""
    import ray

    return [Node(n["NodeManagerAddress"], public_resources(n["Resources"]))
            for n in ray.nodes() if n["Alive"]]


def public_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """A node's resources without Ray's bookkeeping entries (node:<ip>, memory)."""
    return {name: amount for name, amount in resources.items()
            if not name.startswith(_HIDDEN_PREFIXES)}


def check_fits(config: ClusterConfig, nodes: Sequence[Node]) -> None:
    """Raise `ResourceShortfall` listing every reason the config cannot fit `nodes`."""
    problems = find_shortfalls(deployment_groups(config), nodes)
    if problems:
        raise ResourceShortfall(
            f"the cluster cannot hold {config.name}:\n  " + "\n  ".join(problems))
