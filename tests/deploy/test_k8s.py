"""deploy/k8s, checked offline: every manifest validates against the Kubernetes 1.37 schemas that
kubernetes-validate bundles (strict: unknown fields are errors); the KubeRay RayCluster validates
against RAYCLUSTER_V1 below (its own fields) and its pod templates as core PodTemplates; every
reference between the manifests resolves; the ConfigMap and Secret give settings the services
accept."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.api.settings import ApiSettings, hash_api_key
from services.workers.dispatcher import DispatcherSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "deploy" / "k8s"
VERSION = "1.37.0"


_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object"}  # validated as a core PodTemplate, strictly
# KubeRay's ray.io/v1 RayCluster, as its API types define it (field names, types, enums and
# required fields of the spec, the head group and worker groups; unknown fields are errors). The
# operator's generated CRD file cannot be fetched offline, so this schema is written here.
RAYCLUSTER_V1: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "additionalProperties": False,
                    "properties": {
                        "serviceType": {"type": "string"},
                        "headService": {"type": "object"},
                        "enableIngress": {"type": "boolean"},
                        "rayStartParams": _STRING_MAP,
                        "template": _POD_TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": _INT32,
                            "minReplicas": _INT32,
                            "maxReplicas": _INT32,
                            "numOfHosts": _INT32,
                            "rayStartParams": _STRING_MAP,
                            "template": _POD_TEMPLATE,
                            "scaleStrategy": {"type": "object"},
                            "suspend": {"type": "boolean"},
                            "idleTimeoutSeconds": _INT32,
                        },
                    },
                },
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "resources": {"type": "object"},
                        "image": {"type": "string"},
                        "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
                        "env": {"type": "array"},
                        "envFrom": {"type": "array"},
                        "volumeMounts": {"type": "array"},
                        "securityContext": {"type": "object"},
                        "idleTimeoutSeconds": _INT32,
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "version": {"enum": ["v1", "v2"]},
                    },
                },
                "headServiceAnnotations": _STRING_MAP,
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
                "gcsFaultToleranceOptions": {"type": "object"},
                "authOptions": {"type": "object"},
            },
        },
    },
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def applied() -> list[dict[str, Any]]:
    """Every resource `kubectl apply -k deploy/k8s` creates, plus the example Secret."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"] for doc in documents(K8S / name)]
    return docs + documents(K8S / "secret.example.yaml")


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in applied() if doc["kind"] == kind]


def pod_templates() -> list[dict[str, Any]]:
    templates = []
    for doc in applied():
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            templates.append(spec["template"])
        elif doc["kind"] == "RayCluster":
            templates.append(spec["headGroupSpec"]["template"])
            templates += [group["template"] for group in spec["workerGroupSpecs"]]
    return templates


def test_every_manifest_file_is_applied_or_the_secret_example():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


@pytest.mark.parametrize(
    "doc", [d for d in applied() if d["kind"] != "RayCluster"], ids=lambda d: d["kind"]
)
def test_core_manifests_validate_strictly(doc: dict[str, Any]):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_schema_violation_is_caught():
    [deployment] = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "genq-api"]
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_ray_cluster_validates_against_the_raycluster_v1_schema():
    [cluster] = by_kind("RayCluster")
    jsonschema.validate(cluster, RAYCLUSTER_V1)


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "workerGroupSpecs", 0, "replicas"), "two"),
        (("spec", "workerGroupSpecs", 0, "maxReplicas"), 2**31),
        (("spec", "autoscalerOptions", "upscalingMode"), "Fast"),
        (("spec", "headGroupSpec", "rayStartParams", "num-gpus"), 0),
        (("spec", "workerGroupSpecs", 0, "replica"), 1),
        (("spec", "headGroup"), {}),
    ],
)
def test_a_ray_cluster_schema_violation_is_caught(path: tuple[str | int, ...], value: object):
    [cluster] = by_kind("RayCluster")
    broken = copy.deepcopy(cluster)
    parent: Any = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYCLUSTER_V1)


def test_a_worker_group_without_a_name_is_caught():
    [cluster] = by_kind("RayCluster")
    broken = copy.deepcopy(cluster)
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        jsonschema.validate(broken, RAYCLUSTER_V1)


def test_the_ray_cluster_has_a_gpu_worker_group_and_valid_pod_templates():
    [cluster] = by_kind("RayCluster")
    spec = cluster["spec"]

    assert cluster["apiVersion"] == "ray.io/v1" and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    [gpu] = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    [worker] = gpu["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    for template in [head["template"], gpu["template"]]:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate({**pod, "template": template}, VERSION, strict=True)


def test_every_reference_resolves():
    config = {d["metadata"]["name"]: d["data"] for d in by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in by_kind("Secret")}
    for template in pod_templates():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config[ref["configMapKeyRef"]["name"]]
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]]
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config
    labels = [t.get("metadata", {}).get("labels", {}) for t in pod_templates()]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= pod.items() for pod in labels), service["metadata"]["name"]
    # what the services are told to reach exists
    assert config["genq-config"]["GENQ_REDIS_URL"].startswith("redis://genq-redis:")
    assert config["genq-config"]["GENQ_S3_ENDPOINT"].startswith("genq-minio:")
    [cluster] = by_kind("RayCluster")
    ray_head = f"{cluster['metadata']['name']}-head-svc"  # the service KubeRay makes
    assert config["genq-config"]["GENQ_RAY_ADDRESS"].startswith(f"{ray_head}:")


def test_the_config_map_and_secret_give_settings_the_services_accept(
    monkeypatch: pytest.MonkeyPatch,
):
    [config] = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "genq-config"]
    env = {**config["data"], **by_kind("Secret")[0]["stringData"]}
    env["GENQ_API_KEYS"] = f"{hash_api_key('a-real-key')}=team"  # the example holds a placeholder
    for name in [n for n in os.environ if n.startswith("GENQ_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    ApiSettings().check()
    dispatcher = DispatcherSettings()
    dispatcher.check()
    assert dispatcher.device == "cuda" and dispatcher.actor_num_gpus == 1.0


def test_the_bucket_init_script_is_the_compose_one():
    [init] = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "genq-minio-init"]
    assert init["data"]["minio-init.sh"] == (REPO_ROOT / "deploy" / "minio-init.sh").read_text()
