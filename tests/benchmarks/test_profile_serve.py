"""benchmarks/profile_serve.py: grouping processes, attributing py-spy samples to parts of the code,
and reading CPU time from /proc (the run itself needs a live server and is done by hand)."""

from __future__ import annotations

import os
import time
from collections import Counter

from benchmarks import profile_serve as ps

ROOT = "/work/x/fleetlm"


def test_processes_are_grouped_by_command_line():
    assert ps.process_group("ray::ServeReplica:fleetlm:LLMServer-0") == "engine replica"
    assert ps.process_group("ray::ServeReplica:fleetlm:OpenAIIngress") == "ingress (FastAPI)"
    assert ps.process_group("ray::ProxyActor") == "HTTP proxy"
    assert ps.process_group("python -m fleetlm.bench serve --base-url x") == "bench client"
    assert ps.process_group("python .venv/bin/fleetlm serve configs/default.yaml") \
        == "fleetlm serve driver"
    assert ps.process_group("/v/site-packages/ray/core/src/ray/raylet/raylet --x") \
        == "Ray daemons (GCS, raylet, dashboard, agents)"
    assert ps.process_group("/usr/sbin/sshd") is None


def test_a_sample_goes_to_its_innermost_fleetlm_frame():
    loop = f"run (/v/ray/serve/_private/replica.py:10);_loop ({ROOT}/executor/async_engine.py:50)"
    step = f"{loop};step ({ROOT}/executor/engine_core.py:80)"
    lines = [
        f"thread (0x1);{step};forward ({ROOT}/executor/models/llama.py:200);"
        f"forward ({ROOT}/parallel/layers.py:90) 7",
        f"thread (0x1);{step};forward ({ROOT}/parallel/layers.py:90);"
        f"__call__ ({ROOT}/kernels/cpu_linear.py:60) 2",
        f"thread (0x1);{step};forward ({ROOT}/executor/models/ops.py:40);"
        f"silu_mul ({ROOT}/kernels/fused_ops.py:102) 1",
        f"thread (0x1);{step};forward ({ROOT}/executor/attention.py:40);"
        f"decode ({ROOT}/kernels/cpu_attention.py:77) 3",
        f"thread (0x1);{step};schedule ({ROOT}/executor/scheduler.py:300) 2",
        f"thread (0x1);{step};rms_norm ({ROOT}/executor/models/ops.py:12) 1",
        f"thread (0x1);{loop} 4",
        "thread (0x2);handle_request (/v/ray/serve/_private/replica.py:99) 5",
        "thread (0x3);select (/usr/lib/python3.11/asyncio/base_events.py:1) 1",
        "",
    ]
    assert ps.parts_from_collapsed(lines) == Counter({
        "linear layers (GEMM)": 9, "attention kernel": 3, "scheduler, KV blocks": 2,
        "norms, RoPE, SiLU": 2, "engine (other)": 4, "Ray Serve (replica side)": 5,
        "asyncio": 1})


def test_cpu_time_of_this_process_grows_with_work():
    before = ps.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert ps.cpu_seconds(os.getpid()) - before >= 0.15
    assert ps.cpu_seconds(2 ** 22 + 12345) is None  # beyond pid_max: no such process


def test_group_cpu_counts_only_what_was_spent_in_between():
    before = {1: ("ray::ProxyActor", 10.0), 2: ("ray::ServeReplica:a:LLMServer-0", 5.0)}
    after = {1: ("ray::ProxyActor", 12.5), 2: ("ray::ServeReplica:a:LLMServer-0", 25.0),
             3: ("/usr/bin/foo", 1.0)}
    assert ps.group_cpu(before, after) == Counter(
        {"HTTP proxy": 2.5, "engine replica": 20.0, "other processes": 1.0})


def test_render_gives_shares_of_all_cpus():
    text = ps.render(10.0, 2, 15.0, Counter({"engine replica": 12.0, "HTTP proxy": 1.0}),
                     Counter({"linear layers (GEMM)": 3, "sampler": 1}), ["--x"])
    assert "busy 15.0 CPU-s of 20.0 (75%)" in text
    assert "| engine replica | 12.0 | 60.0% |" in text
    assert "| linear layers (GEMM) | 3 | 75.0% |" in text
