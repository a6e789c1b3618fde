"""Multi-host: worker groups spread over two Ray nodes (network namespaces joined by a veth
pair) give the same greedy tokens as the single-process engine; their control links and
their collectives cross the veth over TCP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from netns_cluster import RayNodes

# One cluster start (~15-30 s) and one driver (~2 min on 2 busy cores) for the module; the
# driver's own time-out fires first, so the fixtures still tear everything down.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DRIVER = Path(__file__).with_name("multihost_driver.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
DRIVER_TIMEOUT_S = 540.0

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a short poem about the sea, the wind and a lighthouse keeper who has not seen "
    "another person for three winters. The first line is:",
    "1, 2, 3, 5, 8, 13,",
]
MAX_TOKENS = 32
# A small token budget: the long prompt is prefilled in chunks, across the network too.
ENGINE_ARGS = {"dtype": "float32", "num_blocks": 64, "max_model_len": 512,
               "max_num_batched_tokens": 16}
SPREAD = {"placement_strategy": "SPREAD", "worker_num_cpus": 1}
# The built-in model has 9 attention heads and 3 KV heads: TP=3 is the smallest TP > 1 that
# splits it, and SPREAD puts its ranks 2 + 1 on the two nodes. PP=2 puts one stage on each
# node, so the hand-off between stages crosses the veth as well.
GROUPS = {
    "tp3-shm": {"tensor_parallel_size": 3, "control_plane": "shm", **SPREAD},
    "pp2-socket": {"pipeline_parallel_size": 2, "control_plane": "socket", **SPREAD},
}


@pytest.fixture(scope="module")
def two_node_run(ray_two_nodes: RayNodes, tmp_path_factory) -> dict:
    """Run the driver once in the head namespace: the reference, then every group (one
    cluster start, one driver process: the expensive parts are paid once)."""
    work = tmp_path_factory.mktemp("multihost")
    spec = {"address": ray_two_nodes.address, "num_nodes": 2, "model": "smollm2-135m-instruct",
            "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "engine_args": ENGINE_ARGS,
            "groups": GROUPS}
    (work / "spec.json").write_text(json.dumps(spec))
    started = time.monotonic()
    net = ray_two_nodes.net
    proc = net.run_in(
        net.head,
        [ray_two_nodes.python, str(DRIVER), str(work / "spec.json"), str(work / "result.json")],
        ray_two_nodes.env, DRIVER_TIMEOUT_S, cwd=str(REPO_ROOT))
    if proc.returncode:
        pytest.fail(f"driver failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}", pytrace=False)
    result = json.loads((work / "result.json").read_text())
    print(f"multihost driver: {time.monotonic() - started:.1f} s (reference "
          f"{result['reference_s']:.1f} s; " + "; ".join(
              f"{name}: start {g['start_s']:.1f} s, generate {g['generate_s']:.1f} s"
              for name, g in result["groups"].items()) + ")")
    return result


def test_both_nodes_joined(two_node_run, ray_two_nodes):
    net = ray_two_nodes.net
    assert two_node_run["nodes"] == sorted([net.head.ip, net.worker.ip])


@pytest.mark.parametrize("name", list(GROUPS))
def test_spread_group_matches_single_process(two_node_run, ray_two_nodes, name):
    group = two_node_run["groups"][name]
    assert group["token_ids"] == two_node_run["reference"]
    assert all(len(ids) == MAX_TOKENS for ids in group["token_ids"])

    net = ray_two_nodes.net
    node_ips = [info["node_ip"] for info in group["infos"]]
    assert set(node_ips) == {net.head.ip, net.worker.ip}, node_ips
    assert len({info["node_id"] for info in group["infos"]}) == 2
    assert group["driver"]["node_ip"] == net.head.ip

    # Only ranks on the driver's node read the ring; the others get their steps over TCP,
    # on a link from the worker node's address to the head's.
    local = [r for r, ip in enumerate(node_ips) if ip == net.head.ip]
    remote = [r for r, ip in enumerate(node_ips) if ip == net.worker.ip]
    is_shm = GROUPS[name]["control_plane"] == "shm"
    assert group["ring_ranks"] == (local if is_shm else [])
    for rank in remote:
        assert group["links"][rank]["link_local"][0] == net.worker.ip
        assert group["links"][rank]["link_peer"][0] == net.head.ip
    # gloo (TP all-reduces, PP hand-offs) runs on each node's end of the veth.
    for rank, ip in enumerate(node_ips):
        expected = net.head.interface if ip == net.head.ip else net.worker.interface
        assert group["links"][rank]["gloo_ifname"] == expected
