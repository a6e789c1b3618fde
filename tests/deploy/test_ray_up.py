"""A real `ray up` of deploy/ray-cluster-local.yaml onto two SSH machines on this host, then
`fleetlm deploy` of a two-replica config (one replica on each machine), answers through the
head with the OpenAI SDK, `fleetlm status`, and `ray down`, after which no Ray process is left.

The machines (ssh_machines.py) are network namespaces joined by a veth pair, each with its own
PID and mount namespace and Debian's sshd; the commands run on a "laptop" beside the head, as
deploy/README.md tells a user to run them. The cluster YAML is used as written except for what
names this host: the machines' addresses, the SSH user (root), and the copy of the checkout
(the machines see this one, at ~/fleetlm, instead of an rsync of it).

A sentinel process named like Ray's raylet runs outside the machines throughout: `ray stop`,
which `ray up` and `ray down` run on every node, must never reach it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from netns_cluster import MultihostSetupError, TwoNodeNetwork
from ssh_machines import SshMachines

# One `ray up` (~20 s), the worker joining (~30 s), two replicas loading (~1 min on 2 busy
# cores), `ray down` and the worker's Ray ending by itself (~1-2 min): more than CI's time
# budget leaves, so it is a release check (`scripts/test -m release`, deploy/README.md).
pytestmark = [pytest.mark.slow, pytest.mark.release, pytest.mark.timeout(1500)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "deploy" / "ray-cluster-local.yaml"
SERVE_CONFIG = "deploy/fleetlm-two-nodes.yaml"
CLIENT = Path(__file__).with_name("openai_client.py")
RAY = str(Path(sys.executable).with_name("ray"))
MODEL = "smollm2-135m-instruct"
NUM_REQUESTS = 4
HTTP_PORT = 8000
DEPLOY_TIMEOUT_S = 600
STEP_TIMEOUT_S = 900.0
RAY_GONE_TIMEOUT_S = 240.0  # a worker's raylet waits 60 s for a lost GCS, then stops
# Nothing beyond a login shell's: the cluster YAML itself keeps the head on autoscaler v1.
LAPTOP_ENV: dict[str, str] = {}
# The three commented lines of the cluster YAML's head start command that serve at `ray up`.
SERVING_COMMAND = re.compile(
    r"^  # (- >-|  cd ~/fleetlm && fleetlm deploy .*|  --wait-for-resources .*)$", re.MULTILINE)


class StepFailed(AssertionError):
    pass


@pytest.fixture(scope="module")
def sentinel() -> Iterator[subprocess.Popen]:
    """A process whose name (`raylet`) `ray stop` looks for, outside every machine."""
    work = Path(tempfile.mkdtemp(prefix="fleetlm-sentinel-"))
    fake_raylet = work / "raylet"
    shutil.copy("/bin/sleep", fake_raylet)
    proc = subprocess.Popen([str(fake_raylet), "3600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module", params=["deploy by ray exec", "serve from ray up"])
def ray_up_run(request, sentinel) -> Iterator[dict]:
    """Either `ray up`, then `fleetlm deploy` through `ray exec` (deploy/README.md's steps), or
    `ray up` with the cluster YAML's commented `fleetlm deploy` start command switched on."""
    # Not under /tmp: each machine mounts its own /tmp, and its sshd reads this folder.
    base = Path(tempfile.mkdtemp(prefix="fleetlm-rayup-", dir="/var/tmp"))
    cache = Path(os.environ.get("FLEETLM_CACHE_DIR", Path.home() / ".cache" / "fleetlm"))
    try:
        with TwoNodeNetwork.create() as net, SshMachines(net, base, cache) as machines:
            net.add_default_routes()
            yield _run_everything(net, machines, base,
                                  serve_from_ray_up=request.param == "serve from ray up")
    except MultihostSetupError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_everything(net: TwoNodeNetwork, machines: SshMachines, base: Path,
                    serve_from_ray_up: bool) -> dict:
    cluster_yaml = _cluster_yaml_for(net, machines, base, serve_from_ray_up)
    run: dict = {"head": net.head.ip, "worker": net.worker.ip, "seconds": {}}

    def step(name: str, argv: list[str], timeout: float = STEP_TIMEOUT_S) -> str:
        started = time.monotonic()
        result = machines.run_on_laptop(argv, timeout, env=LAPTOP_ENV, cwd=str(REPO_ROOT))
        run["seconds"][name] = round(time.monotonic() - started, 1)
        output = result.stdout + result.stderr
        if result.returncode:
            raise StepFailed(f"{name} failed ({result.returncode}):\n{output[-6000:]}\n"
                             f"{_head_logs(base)}")
        return output

    def on_head(command: str) -> list[str]:
        return [RAY, "exec", str(cluster_yaml), command]

    step("token", [RAY, "get-auth-token", "--generate"])
    run["deploy"] = step("ray up", [RAY, "up", "-y", "--no-config-cache", str(cluster_yaml)])
    if not serve_from_ray_up:
        run["deploy"] = step("fleetlm deploy", on_head(
            f"cd ~/fleetlm && fleetlm deploy {SERVE_CONFIG} --wait-for-resources "
            f"--timeout {DEPLOY_TIMEOUT_S}"))
    run["status"] = step("fleetlm status", on_head("fleetlm status"))
    answers = base / "answers.json"
    step("OpenAI SDK", [sys.executable, str(CLIENT), f"http://{net.head.ip}:{HTTP_PORT}/v1",
                        MODEL, str(NUM_REQUESTS), str(answers)])
    run["answers"] = json.loads(answers.read_text())
    run["ray down"] = step("ray down", [RAY, "down", "-y", str(cluster_yaml)])
    run["left_running"] = _wait_until_ray_is_gone(machines, run)
    return run


def _cluster_yaml_for(net: TwoNodeNetwork, machines: SshMachines, base: Path,
                      serve_from_ray_up: bool) -> Path:
    """deploy/ray-cluster-local.yaml with this host's machines, user and checkout (and its
    commented serving start command switched on, with `serve_from_ray_up`)."""
    text = CLUSTER_YAML.read_text()
    if serve_from_ray_up:
        text, count = SERVING_COMMAND.subn(r"  \1", text)
        assert count == 3, "the cluster YAML's commented `fleetlm deploy` command changed"
    config = yaml.safe_load(text)
    config["provider"].update(head_ip=net.head.ip, worker_ips=[net.worker.ip])
    config["auth"]["ssh_user"] = "root"  # the key stays ~/.ssh/id_ed25519, the laptop's
    # Each machine sees this checkout (and its .venv) at ~/fleetlm instead of a fresh copy
    # that scripts/setup.sh would have to install from scratch.
    del config["file_mounts"]["~/fleetlm"]
    for machine in machines.machines:
        (machine.home / "fleetlm").symlink_to(REPO_ROOT)
    path = base / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_until_ray_is_gone(machines: SshMachines, run: dict) -> dict[str, list[str]]:
    started = time.monotonic()
    while True:
        left = {m.name: machines.ray_processes(m) for m in machines.machines}
        if not any(left.values()) or time.monotonic() - started > RAY_GONE_TIMEOUT_S:
            run["seconds"]["Ray gone after ray down"] = round(time.monotonic() - started, 1)
            return {name: names for name, names in left.items() if names}
        time.sleep(2.0)


def _head_logs(base: Path) -> str:
    """The head autoscaler's log: where a worker's set-up over SSH reports."""
    logs = sorted((base / "head" / "tmp" / "ray").glob("session_2*/logs/monitor.out"))
    return f"head's monitor.out:\n{logs[-1].read_text()[-4000:]}" if logs else ""


def test_timings(ray_up_run):
    print("ray up test steps (s):", ray_up_run["seconds"])
    print(ray_up_run["status"])


def test_one_replica_on_each_node(ray_up_run):
    status = ray_up_run["status"]
    head, worker = ray_up_run["head"], ray_up_run["worker"]
    by_node = {line.split()[0]: line for line in status.splitlines()
               if line.strip().startswith(("10.", "(not placed"))}
    assert set(by_node) == {head, worker}, status
    for line in by_node.values():
        assert line.count("LLMServer RUNNING") == 1, status  # one of the deployment's two
    # The ingress may land on either node (every node's Serve proxy forwards to it).
    assert sum("OpenAIIngress RUNNING" in line for line in by_node.values()) == 1, status


def test_deploy_reports_the_endpoint(ray_up_run):
    assert f"fleetlm is serving {MODEL} at http://0.0.0.0:{HTTP_PORT}/v1" in ray_up_run["deploy"]


def test_openai_sdk_gets_answers_through_the_head(ray_up_run):
    answers = ray_up_run["answers"]
    assert answers["models"] == [MODEL]
    assert len(answers["answers"]) == NUM_REQUESTS
    for answer in answers["answers"]:
        assert answer["text"] and answer["completion_tokens"] > 0


def test_ray_down_leaves_no_ray_process(ray_up_run):
    assert ray_up_run["left_running"] == {}, ray_up_run["left_running"]


def test_ray_stop_never_reaches_outside_the_machines(ray_up_run, sentinel):
    # `ray stop` did run on the head ("Stopped all ..." or, when one process outlived the
    # grace period and was killed, "Stopped only 5 out of 6 ...")
    assert re.search(r"Stopped (all|only \d+ out of \d+) Ray processes", ray_up_run["ray down"])
    assert sentinel.poll() is None, "ray stop killed a process outside the test machines"
