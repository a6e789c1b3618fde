"""deploy/kuberay/rayservice.yaml is a RayService `kubectl apply` would take, and one KubeRay
could deploy: it validates against the pinned RayService CRD schema (strict, as kubectl's
field validation is), its serveConfigV2 against Ray Serve's config schema, and the fleetlm
config inside against fleetlm's own; its import path builds the application. Each validator
is also shown to reject a broken copy, so a pass means something.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from fleetlm.cluster.config import parse_config

KUBERAY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"
MANIFEST = KUBERAY / "rayservice.yaml"
SCHEMA = KUBERAY / "rayservice-crd-schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture()
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def errors(validator: jsonschema.Draft202012Validator, document: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def test_manifest_validates_against_the_pinned_crd_schema(validator, manifest):
    assert errors(validator, manifest) == []


@pytest.mark.parametrize("breakage, where", [
    # a misspelled field, as kubectl's strict field validation rejects it
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParam={}),
     "spec.rayClusterConfig.headGroupSpec"),
    # a Kubernetes type inside the pod template (a probe's port must be int or string)
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0]["readinessProbe"]["httpGet"].update(port=[8000]),
     "spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0.readinessProbe"),
    # a required field of the CRD
    (lambda m: m["spec"]["rayClusterConfig"].pop("headGroupSpec"), "spec.rayClusterConfig"),
    # an enum of the CRD
    (lambda m: m["spec"]["rayClusterConfig"]["authOptions"].update(mode="password"),
     "spec.rayClusterConfig.authOptions.mode"),
    (lambda m: m.update(kind="RayCluster"), "kind"),
])
def test_the_schema_rejects_broken_manifests(validator, manifest, breakage, where):
    broken = copy.deepcopy(manifest)
    breakage(broken)
    found = errors(validator, broken)
    assert found and any(e.startswith(where) for e in found), found


def test_serve_config_is_valid_for_ray_serve(manifest):
    config = ServeDeploySchema.model_validate(serve_config(manifest))
    assert [app.name for app in config.applications] == ["fleetlm"]
    assert config.http_options.host == "0.0.0.0"
    with pytest.raises(ValueError, match="import_path"):
        ServeDeploySchema.model_validate({"applications": [{"args": {}}]})


def test_fleetlm_config_inside_is_valid_and_builds_the_application(manifest):
    app = serve_config(manifest)["applications"][0]
    module_name, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    config = parse_config(app["args"], "serveConfigV2")
    assert config.replicas.count == 2
    assert isinstance(builder(app["args"]), Application)
    broken = copy.deepcopy(app["args"]) | {"replica": {"count": 2}}
    with pytest.raises(ValueError, match="serve config args.*replica"):
        builder(broken)


def test_pods_fit_the_replicas_and_probe_fleetlm_health(manifest):
    """Each worker pod holds one replica (CPU requests), and its readiness probe asks
    fleetlm's /health on the port Serve's proxy listens on."""
    serve = serve_config(manifest)
    args = serve["applications"][0]["args"]
    cluster = manifest["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    pod_cpus = float(container["resources"]["requests"]["cpu"])
    assert args["replicas"]["num_cpus"] <= pod_cpus < 2 * args["replicas"]["num_cpus"]
    assert group["replicas"] * 1 >= args["replicas"]["count"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe == {"path": "/health", "port": serve["http_options"]["port"]}
    for spec in (cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] is True
