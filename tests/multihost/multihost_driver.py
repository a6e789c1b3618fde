"""The driver of the multi-host test, run inside the head node's network namespace:

    python multihost_driver.py SPEC.json RESULT.json

SPEC names the cluster address, the model, the prompts and the engine arguments. The driver
runs the prompts greedily on a single-process engine (the reference), then on each worker
group that SPEC names (spread over the cluster's nodes), and writes what it saw to RESULT:
token ids, where each rank ran, which ranks read the shared-memory ring, and, from inside
each worker, the addresses of its control link and its gloo interface. The test asserts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ray
import torch

from fleetlm import LLM, SamplingParams

NODE_WAIT_S = 120.0


def wait_for_nodes(num_nodes: int) -> list[str]:
    """A SPREAD placement group is best effort: reserve it only once every node is up."""
    deadline = time.monotonic() + NODE_WAIT_S
    while len(alive := [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]) < num_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {alive} of {num_nodes} Ray nodes up after {NODE_WAIT_S} s")
        time.sleep(0.5)
    return sorted(alive)


def greedy_token_ids(llm: LLM, prompts: list[str], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def link_view(worker) -> dict:
    """Seen from inside one rank: its control link's two ends and its gloo interface."""
    sock = worker.endpoint.sock
    return {"link_local": list(sock.getsockname()), "link_peer": list(sock.getpeername()),
            "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}


def wait_for_free_cpus() -> None:
    """SPREAD is best effort, so a group placed while the last one's CPUs are still being
    released packs onto the nodes that have them: wait until Ray sees every CPU free."""
    deadline = time.monotonic() + NODE_WAIT_S
    while (free := ray.available_resources().get("CPU", 0)) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {free} CPUs free {NODE_WAIT_S} s after the last group")
        time.sleep(0.2)


def run_group(spec: dict, group_args: dict) -> dict:
    wait_for_free_cpus()
    started = time.monotonic()
    with LLM(spec["model"], **spec["engine_args"], **group_args) as llm:
        ready = time.monotonic()
        executor = llm.engine.executor
        token_ids = greedy_token_ids(llm, spec["prompts"], spec["max_tokens"])
        generated = time.monotonic()
        return {
            "infos": executor.infos,
            "driver": executor.driver,
            "ring_ranks": sorted(getattr(executor.control, "ring_ranks", ())),
            "links": executor.collective_rpc(link_view),
            "token_ids": token_ids,
            "start_s": ready - started,
            "generate_s": generated - ready,
        }


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ray.init(address=spec["address"], logging_level="WARNING")
    result: dict = {"nodes": wait_for_nodes(spec["num_nodes"])}
    started = time.monotonic()
    # One thread: OpenMP threads spinning on 2 cores that the workers and Ray also use run
    # the reference ten times slower than it needs.
    torch.set_num_threads(1)
    with LLM(spec["model"], **spec["engine_args"]) as llm:
        result["reference"] = greedy_token_ids(llm, spec["prompts"], spec["max_tokens"])
    result["reference_s"] = time.monotonic() - started
    result["groups"] = {name: run_group(spec, args) for name, args in spec["groups"].items()}
    ray.shutdown()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
