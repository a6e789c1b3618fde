"""The `ray up` cluster YAMLs in deploy/ pass Ray's own cluster-config schema (the check
`ray up` starts with) and install and start fleetlm the way the README does. The local one
is run for real by test_ray_up.py; the cloud one is an example no test can launch here.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from fleetlm.cluster.config import load_config
from fleetlm.cluster.launcher import RAY_ENV_DEFAULTS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CLUSTER_YAMLS = ["ray-cluster-local.yaml", "ray-cluster-aws.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_ray_accepts_the_cluster_yaml(name):
    validate_config(prepare_config(load(name)))  # what `ray up` checks first


def test_ray_rejects_a_misspelled_key():
    config = load("ray-cluster-local.yaml")
    config["setup_command"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="'setup_command' was unexpected"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_every_node_installs_and_starts_fleetlm_like_the_readme(name):
    config = load(name)
    assert config["file_mounts"]["~/fleetlm"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".venv" in config["rsync_exclude"]
    assert any("scripts/setup.sh" in command for command in config["setup_commands"])
    for key, flag in (("head_start_ray_commands", "--head"),
                      ("worker_start_ray_commands", "--address=$RAY_HEAD_IP:6379")):
        start = next(c for c in config[key] if "ray start" in c)
        assert flag in start and "RAY_AUTH_MODE=token" in start
        # what `fleetlm serve` gives a local cluster (nice 0, the proxy's gRPC): launcher.py
        assert all(f"{name}={value}" in start for name, value in RAY_ENV_DEFAULTS.items())


def test_cloud_node_types_carry_the_pool_resources_configs_ask_for():
    types = load("ray-cluster-aws.yaml")["available_node_types"]
    pools = {name: set(node["resources"]) for name, node in types.items()}
    assert pools["cpu-prefill"] == {"pool-prefill"} and pools["gpu-decode"] == {"pool-decode"}


def test_two_node_config_puts_one_replica_on_each_two_cpu_machine():
    config = load_config(DEPLOY / "fleetlm-two-nodes.yaml")
    assert config.replicas.count == 2
    assert 1.0 < config.replicas.num_cpus <= 2.0  # two never fit one 2-CPU machine
    assert config.http.host == "0.0.0.0"
