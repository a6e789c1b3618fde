"""Placement on a cluster's resources: the bundles a config reserves (custom resources
included), the check `fleetlm deploy` runs before deploying, the deploy time limit and the
per-node status. No Ray cluster: nodes are given as data."""

from __future__ import annotations

import pytest

from fleetlm.cluster import launcher, resources
from fleetlm.cluster.app import _placement_options, _replica_actor_options, replica_bundles
from fleetlm.cluster.config import ClusterConfig
from fleetlm.cluster.resources import Node, ResourceShortfall, check_fits


def make_config(**sections) -> ClusterConfig:
    sections.setdefault("model", {})["device"] = "cpu"
    return ClusterConfig.model_validate(sections)


TWO_CPU_NODES = [Node("10.0.0.1", {"CPU": 2.0}), Node("10.0.0.2", {"CPU": 2.0})]


def shortfalls(config, nodes) -> str:
    with pytest.raises(ResourceShortfall) as info:
        check_fits(config, nodes)
    return str(info.value)


def test_two_replicas_of_one_and_a_half_cpus_fit_two_two_cpu_nodes():
    check_fits(make_config(replicas={"count": 2, "num_cpus": 1.5}), TWO_CPU_NODES)


def test_the_total_names_every_group_and_what_the_cluster_has():
    message = shortfalls(make_config(replicas={"count": 3, "num_cpus": 1.5}), TWO_CPU_NODES)
    assert ("the deployment needs CPU 4.6 in all (LLMServer-0 1.5, LLMServer-1 1.5, "
            "LLMServer-2 1.5, OpenAIIngress 0.1), but the cluster has 4") in message


def test_an_ingress_in_the_replica_reserves_nothing_of_its_own():
    one_node = TWO_CPU_NODES[:1]
    check_fits(make_config(replicas={"num_cpus": 2}, http={"ingress": "in_replica"}), one_node)
    # A separate ingress's 0.1 CPU would not fit beside the replica.
    assert "OpenAIIngress 0.1" in shortfalls(make_config(replicas={"num_cpus": 2}), one_node)


def test_a_bundle_no_node_can_hold_names_bundle_resource_and_amount():
    config = make_config(replicas={"num_cpus": 3})
    message = shortfalls(config, TWO_CPU_NODES)
    assert "LLMServer-0 needs CPU 3, but no node has more than 2" in message
    assert "10.0.0.1 CPU 2; 10.0.0.2 CPU 2" in message


def test_worker_bundles_carry_their_rank_and_gpus():
    config = make_config(parallel={"tensor_parallel_size": 3, "worker_num_gpus": 1})
    message = shortfalls(config, TWO_CPU_NODES)
    for rank in range(3):
        assert (f"LLMServer-0 bundle {rank + 1} (worker rank {rank}) needs GPU 1, but no node "
                f"has more than 0") in message
    assert "bundle 0 (the replica)" not in message


def test_strict_pack_needs_the_whole_group_on_one_node():
    parallel = {"tensor_parallel_size": 3, "worker_num_cpus": 0.5}
    check_fits(make_config(parallel=parallel), TWO_CPU_NODES)  # PACK may spill over
    message = shortfalls(make_config(parallel={**parallel, "placement_strategy": "STRICT_PACK"}),
                         TWO_CPU_NODES)
    assert "LLMServer-0 (STRICT_PACK: all 4 bundles on one node) needs CPU 2.5" in message


def test_strict_spread_needs_a_node_per_bundle():
    config = make_config(replicas={"num_cpus": 0.1}, parallel={
        "tensor_parallel_size": 3, "worker_num_cpus": 0.1, "placement_strategy": "STRICT_SPREAD"})
    message = shortfalls(config, TWO_CPU_NODES)
    assert "LLMServer-0 needs 4 nodes (STRICT_SPREAD" in message
    assert "only 2 can hold a bundle: 10.0.0.1, 10.0.0.2" in message


def test_resources_that_exist_only_on_different_nodes():
    nodes = [Node("a", {"CPU": 4.0}), Node("b", {"CPU": 0.5, "pool-decode": 1.0})]
    config = make_config(replicas={"num_cpus": 1, "resources": {"pool-decode": 1}})
    message = shortfalls(config, nodes)
    assert "LLMServer-0 needs CPU 1, pool-decode 1 on one node, but no node has all" in message


def test_custom_resources_reach_the_replica_and_its_workers():
    config = make_config(
        replicas={"num_cpus": 1, "resources": {"pool-decode": 1}},
        parallel={"tensor_parallel_size": 3, "worker_resources": {"accelerator_type:A100": 0.01}})
    bundles = replica_bundles(config)
    assert bundles[0] == {"CPU": 1.0, "pool-decode": 1.0}
    assert bundles[1:] == [{"CPU": 1.0, "accelerator_type:A100": 0.01}] * 3
    assert _placement_options(config)["placement_group_bundles"] == bundles
    assert _replica_actor_options(config)["resources"] == {"pool-decode": 1.0}
    assert "worker_resources" not in vars(config.parallel.to_parallel_config())

    message = shortfalls(config, [Node("10.0.0.1", {"CPU": 8.0, "pool-decode": 1.0})])
    assert "worker rank 0) needs accelerator_type:A100 0.01, but no node has more than 0" in message


@pytest.mark.parametrize("section, key", [("replicas", "resources"),
                                          ("parallel", "worker_resources")])
@pytest.mark.parametrize("value, error", [({"CPU": 1}, "one of Ray's own resources"),
                                          ({"pool": 0}, "pool must be above 0")])
def test_custom_resources_are_checked(section, key, value, error):
    with pytest.raises(ValueError, match=error):
        make_config(**{section: {key: value}})


def test_ray_bookkeeping_is_not_a_resource():
    assert resources.public_resources({"CPU": 2.0, "memory": 1e9, "node:10.0.0.1": 1.0,
                                       "object_store_memory": 1e8, "GPU": 1.0}) == {
        "CPU": 2.0, "GPU": 1.0}


# `fleetlm deploy`: the check comes first; waiting for nodes and the whole deploy are bounded.

@pytest.fixture
def offline_cluster(monkeypatch):
    """A cluster of nodes given by the test; deploy and Serve's status are recorded/faked."""
    state = {"nodes": [], "deployed": [], "states": []}
    monkeypatch.setattr(resources, "cluster_nodes", lambda: list(state["nodes"]))
    monkeypatch.setattr(launcher, "deploy", lambda config, **kw: state["deployed"].append(config))
    monkeypatch.setattr(launcher, "NODE_POLL_INTERVAL_S", 0.01)
    monkeypatch.setattr(launcher, "status_lines", lambda: ["fleetlm: DEPLOYING"])
    monkeypatch.setattr(launcher, "_poll_app", lambda name: iter(state["states"]))
    return state


def test_deploy_fails_before_deploying_when_nothing_can_fit(offline_cluster):
    offline_cluster["nodes"] = [Node("10.0.0.1", {"CPU": 2.0})]
    with pytest.raises(ResourceShortfall, match="needs CPU 4.6 in all"):
        launcher.deploy_and_wait(make_config(replicas={"count": 3, "num_cpus": 1.5}), 60)
    assert offline_cluster["deployed"] == []


def test_deploy_waits_for_nodes_when_asked(offline_cluster, monkeypatch):
    offline_cluster["nodes"] = [TWO_CPU_NODES[0]]
    offline_cluster["states"] = [(3, "RUNNING", "")]
    polls = []

    def nodes_joining():
        polls.append(1)
        return TWO_CPU_NODES if len(polls) > 3 else TWO_CPU_NODES[:1]

    monkeypatch.setattr(resources, "cluster_nodes", nodes_joining)
    config = make_config(replicas={"count": 2, "num_cpus": 1.5})
    launcher.deploy_and_wait(config, 60, is_waiting_for_resources=True)
    assert offline_cluster["deployed"] == [config] and len(polls) == 4


def test_waiting_for_nodes_gives_up_at_the_timeout(offline_cluster):
    offline_cluster["nodes"] = [TWO_CPU_NODES[0]]
    with pytest.raises(ResourceShortfall, match="but the cluster has 2"):
        launcher.deploy_and_wait(make_config(replicas={"count": 2, "num_cpus": 1.5}), 0.05,
                                 is_waiting_for_resources=True)
    assert offline_cluster["deployed"] == []


def test_deploy_gives_up_after_the_timeout_and_says_what_is_left(offline_cluster):
    offline_cluster["nodes"] = TWO_CPU_NODES
    offline_cluster["states"] = ((1, "DEPLOYING", "1 replica pending") for _ in iter(int, 1))
    with pytest.raises(launcher.DeployTimeout) as info:
        launcher.deploy_and_wait(make_config(replicas={"count": 2, "num_cpus": 1.5}), 0.05)
    message = str(info.value)
    assert message.startswith("gave up after 0.05 s: not every replica of fleetlm is running")
    assert "Ray Serve says: 1 replica pending" in message
    assert "`fleetlm shutdown --app fleetlm` removes it" in message


# Serve's message (ray/serve/_private/deployment_state.py) once a replica has waited 30 s for
# resources that the nodes have but others hold: seen from a real cluster whose CPUs an actor
# held (fleetlm deploy then failed after 30.5 s instead of waiting out --timeout).
NOT_SCHEDULED = (
    "Deployment 'LLMServer-0' in application 'fleetlm' has 1 replicas that have taken more "
    "than 30s to be scheduled. This may be due to waiting for the cluster to auto-scale or for "
    "a runtime environment to be installed. Resources required for each replica: "
    '{"CPU": 1.0}, total resources available: {"CPU": 0.4}. Use `ray status` for more details.')


def test_deploy_fails_when_serve_cannot_place_a_replica(offline_cluster):
    offline_cluster["nodes"] = TWO_CPU_NODES
    offline_cluster["states"] = [(1, "DEPLOYING", ""), (1, "DEPLOYING", NOT_SCHEDULED),
                                 (3, "RUNNING", "")]  # fmt: skip
    with pytest.raises(launcher.Unschedulable) as info:
        launcher.deploy_and_wait(make_config(replicas={"count": 2, "num_cpus": 1.5}), 600)
    message = str(info.value)
    assert message.startswith("cannot place every replica of fleetlm")
    assert 'Resources required for each replica: {"CPU": 1.0}' in message
    assert "--wait-for-resources" in message


def test_waiting_for_resources_outlasts_serves_placement_message(offline_cluster):
    offline_cluster["nodes"] = TWO_CPU_NODES
    offline_cluster["states"] = [(1, "DEPLOYING", NOT_SCHEDULED), (3, "RUNNING", "")]
    config = make_config(replicas={"count": 2, "num_cpus": 1.5})
    launcher.deploy_and_wait(config, 600, is_waiting_for_resources=True)
    assert offline_cluster["deployed"] == [config]


def test_status_lists_replicas_by_node():
    details = {"applications": {"fleetlm": {
        "status": "RUNNING", "message": "",
        "deployments": {
            "OpenAIIngress": {"status": "HEALTHY",
                              "replicas": [{"state": "RUNNING", "node_ip": "10.0.0.1"}]},
            "LLMServer-0": {"status": "HEALTHY",
                            "replicas": [{"state": "RUNNING", "node_ip": "10.0.0.1"}]},
            "LLMServer-1": {"status": "UPDATING",
                            "replicas": [{"state": "STARTING", "node_ip": "10.0.0.2"},
                                         {"state": "PENDING_ALLOCATION", "node_ip": None}]},
        }}}}
    nodes = [*TWO_CPU_NODES, Node("10.0.0.3", {"CPU": 2.0, "GPU": 1.0})]
    assert launcher.format_status(details, nodes) == [
        "fleetlm: RUNNING",
        "  OpenAIIngress: HEALTHY [1 RUNNING]",
        "  LLMServer-0: HEALTHY [1 RUNNING]",
        "  LLMServer-1: UPDATING [1 PENDING_ALLOCATION, 1 STARTING]",
        "Replicas by node:",
        "  10.0.0.1 (CPU 2): OpenAIIngress RUNNING, LLMServer-0 RUNNING",
        "  10.0.0.2 (CPU 2): LLMServer-1 STARTING",
        "  10.0.0.3 (CPU 2, GPU 1): no replicas",
        "  (not placed yet): LLMServer-1 PENDING_ALLOCATION",
    ]


def test_status_without_applications():
    assert launcher.format_status({"applications": {}}, TWO_CPU_NODES) == [
        "No fleetlm applications are running."]
