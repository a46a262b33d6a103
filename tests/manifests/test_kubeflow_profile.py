"""The multi-user Kubeflow overlays, without a cluster.

kubeflow-profile (an MLflow per profile): it renders, every object validates strictly (Kubernetes models, Istio's
published CRD schemas), and its pieces agree with each other: the Istio policies select the MLflow pods and admit the
pipeline's sidecar-less step pods, the profile's notebooks and KFP's API server, the gateway route, MLflow's
--static-prefix, the pipeline's tracking URI and the probes share one path prefix that follows the namespace, and a
real MLflow server started with the Deployment's arguments serves the UI to the Kubeflow host and refuses other
origins.

kubeflow-shared-mlflow + kubeflow-profile-shared-mlflow (one MLflow for every profile): workspaces and Kubernetes
RBAC are switched on, the profiles' clients are pointed at it with their token, admission (Istio, NetworkPolicy)
matches, and a real server with its prefix and Host list answers the profiles' tracking URI."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from mlflow.tracking.request_auth.kubernetes_request_auth_provider import KubernetesNamespacedRequestAuthProvider
from packaging.requirements import Requirement

from ctv2v.config import ClusterConfig
from tests.manifest_checks import (
    ISTIO_CRDS,
    MANIFESTS,
    PLACEHOLDER,
    PROFILE_WITH_SHARED_MLFLOW,
    SHARED_MLFLOW,
    container_env,
    expand,
    find,
    http_get,
    ingress_allowed,
    istio_schemas,
    matches,
    mlflow_container,
    option,
    pod_labels,
    pod_template,
    render,
    secret_templates,
    start_mlflow,
    validate_any,
    validate_istio_object,
)
from tests.servers import stop_process_group
from tests.static_checks import IMAGES

OVERLAY = MANIFESTS / "overlays" / "kubeflow-profile"
ISTIO_KINDS = {"AuthorizationPolicy", "PeerAuthentication", "VirtualService"}
CLUSTER = ClusterConfig()
UI_HOST = "kubeflow.example.com"
POD_IP = "10.1.2.3"


def profile(overlay: Path = OVERLAY) -> tuple[dict, ...]:
    return render(overlay)


def namespace_of(objects) -> str:
    return find(objects, "Deployment", "mlflow")["metadata"]["namespace"]


def mlflow_args(objects, ui_host: str = UI_HOST) -> list[str]:
    """The MLflow container's arguments as the kubelet expands them, with MLFLOW_UI_HOST filled in."""
    objects = copy.deepcopy(objects)
    find(objects, "ConfigMap", "mlflow-server-env")["data"]["MLFLOW_UI_HOST"] = ui_host
    container = mlflow_container(objects)
    env = container_env(container, objects, {"metadata.namespace": namespace_of(objects), "status.podIP": POD_IP})
    return [expand(arg, env) for arg in container["args"]]


def with_namespace(tmp_path: Path, namespace: str) -> tuple[dict, ...]:
    """The overlay rendered after a user sets its `namespace:` line (on a copy of manifests/)."""
    copied = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copied)
    kustomization = copied / "overlays" / "kubeflow-profile" / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("\nnamespace: kubeflow-user-example-com\n") == 1
    kustomization.write_text(text.replace("\nnamespace: kubeflow-user-example-com\n", f"\nnamespace: {namespace}\n"))
    return render(kustomization.parent)


# ------------------------------------------------------------------------------------ Istio schema validation
def test_the_vendored_istio_crds_name_their_source_and_cover_the_overlays_kinds():
    header = ISTIO_CRDS.read_text().split("apiVersion:", 1)[0]
    assert "github.com/istio/istio" in header and "tag 1.30.3" in header and "Apache-2.0" in header
    used = {(o["apiVersion"], o["kind"]) for o in profile() if o["apiVersion"].split("/")[0].endswith(".istio.io")}
    assert {kind for _, kind in used} == ISTIO_KINDS
    assert used <= set(istio_schemas())


def test_every_object_validates_against_kubernetes_or_istio_schemas():
    objects = profile()
    assert ISTIO_KINDS <= {o["kind"] for o in objects}
    assert [p for o in objects for p in validate_any(o)] == []


def test_the_istio_validator_catches_what_the_api_server_would_reject():
    objects = profile()
    policy = find(objects, "AuthorizationPolicy", "mlflow-pipeline-steps")
    route = find(objects, "VirtualService", "mlflow-ui")
    assert validate_istio_object(policy) == []

    misspelt = copy.deepcopy(policy)
    misspelt["spec"]["rule"] = misspelt["spec"].pop("rules")
    unknown_action = copy.deepcopy(policy)
    unknown_action["spec"]["action"] = "PERMIT"
    numeric_ports = copy.deepcopy(policy)
    numeric_ports["spec"]["rules"][0]["to"][0]["operation"]["ports"] = [5000]
    bad_metadata = copy.deepcopy(policy)
    bad_metadata["metadata"]["label"] = {"a": "b"}
    port_as_number = copy.deepcopy(route)
    [mlflow_route] = [r for r in port_as_number["spec"]["http"] if "route" in r]
    mlflow_route["route"][0]["destination"]["port"] = 5000
    old_api = dict(copy.deepcopy(policy), apiVersion="security.istio.io/v1alpha1")
    peer = find(objects, "PeerAuthentication", "mlflow")
    port_levels_without_selector = copy.deepcopy(peer)
    del port_levels_without_selector["spec"]["selector"]
    port_out_of_range = copy.deepcopy(peer)
    port_out_of_range["spec"]["portLevelMtls"] = {"70000": {"mode": "PERMISSIVE"}}

    assert any("'rule' was unexpected" in e for e in validate_istio_object(misspelt))
    assert any("'PERMIT' is not one of" in e for e in validate_istio_object(unknown_action))
    assert any("5000 is not of type 'string'" in e for e in validate_istio_object(numeric_ports))
    assert any("metadata.label: no such field in V1ObjectMeta" in e for e in validate_istio_object(bad_metadata))
    assert any("5000 is not of type 'object'" in e for e in validate_istio_object(port_as_number))
    assert any("not in istio-1.30.3-crds.yaml" in e for e in validate_istio_object(old_api))
    # CEL rules of the CRDs (x-kubernetes-validations), which no JSON Schema check sees.
    assert validate_istio_object(peer) == []
    assert any("portLevelMtls requires selector" in e for e in validate_istio_object(port_levels_without_selector))
    assert any("port must be between 1-65535" in e for e in validate_istio_object(port_out_of_range))


# ----------------------------------------------------------------------------------- Istio admission semantics
def _istio_string_match(pattern: str, value: str | None) -> bool:
    """Istio's string match for principals: exact, prefix `x*`, suffix `*x`, or `*` = any present value."""
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _source_matches(source: dict, principal: str | None) -> bool:
    if set(source) - {"principals", "notPrincipals"}:
        raise NotImplementedError(f"source form not modelled here: {source}")
    if "principals" in source and not any(_istio_string_match(p, principal) for p in source["principals"]):
        return False
    return not any(_istio_string_match(p, principal) for p in source.get("notPrincipals", []))


def istio_allows(policies, pod: dict, principal: str | None, port: int) -> bool:
    """ALLOW-policy semantics for a request to `pod` ({"labels"}) on `port` from `principal` (None: plain text, no
    Istio identity): allowed if some rule of a selecting ALLOW policy matches (every selecting policy here is
    ALLOW; the profile's own policies are not part of the overlay)."""
    selecting = [p for p in policies if matches(p["spec"]["selector"], pod["labels"])]
    assert selecting and all(p["spec"]["action"] == "ALLOW" for p in selecting)
    for policy in selecting:
        for rule in policy["spec"]["rules"]:
            from_ok = any(_source_matches(f["source"], principal) for f in rule.get("from", [{"source": {}}]))
            to_ok = any(str(port) in t["operation"]["ports"] for t in rule.get("to", [{"operation": {"ports": [str(port)]}}]))
            if from_ok and to_ok:
                return True
    return False


def test_istio_policies_select_the_mlflow_pods_and_its_container_port():
    objects = profile()
    labels = pod_labels(objects, "Deployment", "mlflow")
    [container_port] = [p["containerPort"] for p in mlflow_container(objects)["ports"]]
    peer = find(objects, "PeerAuthentication", "mlflow")
    assert matches(peer["spec"]["selector"], labels)
    # Plain text only where the step pods connect; mutual TLS required on every other port of the pod.
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert peer["spec"]["portLevelMtls"] == {str(container_port): {"mode": "PERMISSIVE"}}


@pytest.mark.parametrize("caller, principal, port, allowed", [
    ("sidecar-less step pod", None, 5000, True),
    ("step pod with a sidecar", "cluster.local/ns/{namespace}/sa/{sa}", 5000, True),
    ("step pod with a sidecar, other trust domain", "corp.example/ns/{namespace}/sa/{sa}", 5000, True),
    ("same service account name, other namespace", "cluster.local/ns/other/sa/{sa}", 5000, False),
    ("a notebook of the namespace (default-editor)", "cluster.local/ns/{namespace}/sa/default-editor", 5000, True),
    ("a notebook of another profile", "cluster.local/ns/other/sa/default-editor", 5000, False),
    ("KFP's API server (its MLflow plugin)", "cluster.local/ns/kubeflow/sa/ml-pipeline", 5000, True),
    ("KFP's UI", "cluster.local/ns/kubeflow/sa/ml-pipeline-ui", 5000, False),
    ("another workload of the namespace, in the mesh", "cluster.local/ns/{namespace}/sa/other", 5000, False),
    ("plain text to another port of the pod", None, 15000, False),
])
def test_istio_admits_exactly_the_step_pods_notebooks_and_kfps_api_server(caller, principal, port, allowed):
    objects = profile()
    namespace = namespace_of(objects)
    policies = [o for o in objects if o["kind"] == "AuthorizationPolicy"]
    pod = {"labels": pod_labels(objects, "Deployment", "mlflow")}
    if principal is not None:
        principal = principal.format(namespace=namespace, sa=CLUSTER.service_account)
    assert istio_allows(policies, pod, principal, port) is allowed, caller


@pytest.mark.parametrize("source, allowed", [
    ("pipeline", True), ("gateway", True), ("notebook", True), ("kfp-api-server", True), ("kfp-driver", True),
    ("kfp-driver-agent", True),
    ("other-istio-system-pod", False), ("other-pod", False), ("kfp-ui", False), ("notebook-elsewhere", False),
    ("kfp-driver-elsewhere", False),
])
def test_network_policy_admits_the_gateway_step_pods_drivers_notebooks_and_kfps_api_server_only(source, allowed):
    objects = profile()
    namespace = namespace_of(objects)
    here = {"kubernetes.io/metadata.name": namespace}
    istio_system = {"kubernetes.io/metadata.name": "istio-system"}
    kubeflow = {"kubernetes.io/metadata.name": "kubeflow"}
    pods = {
        "pipeline": {"namespace": namespace, "labels": {"app.kubernetes.io/part-of": CLUSTER.pod_label},
                     "namespace_labels": here},
        "gateway": {"namespace": "istio-system", "labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"},
                    "namespace_labels": istio_system},
        "other-istio-system-pod": {"namespace": "istio-system", "labels": {"app": "istiod"},
                                   "namespace_labels": istio_system},
        "other-pod": {"namespace": namespace, "labels": {"app": "notebook"}, "namespace_labels": here},
        # Kubeflow's notebook controller labels a notebook's pods notebook-name=<name>.
        "notebook": {"namespace": namespace, "labels": {"notebook-name": "nb", "statefulset": "nb"},
                     "namespace_labels": here},
        "notebook-elsewhere": {"namespace": "other", "labels": {"notebook-name": "nb"},
                               "namespace_labels": {"kubernetes.io/metadata.name": "other"}},
        "kfp-api-server": {"namespace": "kubeflow", "labels": {"app": "ml-pipeline"}, "namespace_labels": kubeflow},
        "kfp-ui": {"namespace": "kubeflow", "labels": {"app": "ml-pipeline-ui"}, "namespace_labels": kubeflow},
        # KFP's driver of a task (it makes the task's nested MLflow run under KFP's MLflow plugin): a pod of the
        # run's Argo Workflow, or the run's Argo agent pod with KFP's executor-plugin driver.
        "kfp-driver": {"namespace": namespace, "labels": {"pipelines.kubeflow.org/v2_component": "true",
                                                          "workflows.argoproj.io/workflow": "ctv2v-x7k2p"},
                       "namespace_labels": here},
        "kfp-driver-agent": {"namespace": namespace, "labels": {"workflows.argoproj.io/component": "agent",
                                                                "workflows.argoproj.io/workflow": "ctv2v-x7k2p"},
                             "namespace_labels": here},
        "kfp-driver-elsewhere": {"namespace": "other", "labels": {"pipelines.kubeflow.org/v2_component": "true"},
                                 "namespace_labels": {"kubernetes.io/metadata.name": "other"}},
    }
    target = {"namespace": namespace, "labels": pod_labels(objects, "Deployment", "mlflow"), "namespace_labels": here}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert ingress_allowed(policies, namespace, target, pods[source], 5000) is allowed


def test_mlflow_pod_is_in_the_mesh_and_its_database_traffic_bypasses_the_proxy():
    annotations = pod_template(find(profile(), "Deployment", "mlflow"))["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "true"
    # The init container connects to Postgres before the proxy runs: that port must not be redirected into it.
    store_uri = secret_templates()["mlflow-backend-store"]["stringData"]["MLFLOW_BACKEND_STORE_URI"]
    excluded = annotations["traffic.sidecar.istio.io/excludeOutboundPorts"].split(",")
    assert str(urlsplit(store_uri).port) in excluded


# --------------------------------------------------------------------------------- one prefix, many places
def prefixes(objects) -> dict[str, str]:
    """Every place the gateway path prefix appears, without its trailing slash."""
    route = find(objects, "VirtualService", "mlflow-ui")["spec"]["http"]
    by_name = {r["name"]: r for r in route}
    probe_path = mlflow_container(objects)["readinessProbe"]["httpGet"]["path"]
    tracking_uri = find(objects, "ConfigMap", CLUSTER.env_config_map)["data"]["MLFLOW_TRACKING_URI"]
    return {
        "--static-prefix": option(mlflow_args(objects), "--static-prefix"),
        "route prefix": by_name["mlflow-ui"]["match"][0]["uri"]["prefix"].removesuffix("/"),
        "redirect from": by_name["mlflow-ui-slash"]["match"][0]["uri"]["exact"],
        "redirect to": by_name["mlflow-ui-slash"]["redirect"]["uri"].removesuffix("/"),
        "tracking URI": urlsplit(tracking_uri).path,
        "probe": probe_path.split("/api/", 1)[0],
        **{f"{probe} (/health)": mlflow_container(objects)[probe]["httpGet"]["path"].removesuffix("/health")
           for probe in ("startupProbe", "livenessProbe")},
    }


def test_gateway_route_static_prefix_tracking_uri_and_probe_share_one_prefix():
    objects = profile()
    found = prefixes(objects)
    assert set(found.values()) == {f"/mlflow/{namespace_of(objects)}"}, found
    route = find(objects, "VirtualService", "mlflow-ui")["spec"]
    assert route["gateways"] == ["kubeflow/kubeflow-gateway"]
    [destination] = [r["route"][0]["destination"] for r in route["http"] if "route" in r]
    [service_port] = find(objects, "Service", "mlflow")["spec"]["ports"]
    assert destination == {"host": "mlflow", "port": {"number": service_port["port"]}}


def test_the_prefix_and_the_principal_follow_the_namespace_line(tmp_path):
    objects = with_namespace(tmp_path, "team-a")
    assert namespace_of(objects) == "team-a"
    assert set(prefixes(objects).values()) == {"/mlflow/team-a"}
    [_, mesh_rule, _] = find(objects, "AuthorizationPolicy", "mlflow-pipeline-steps")["spec"]["rules"]
    assert mesh_rule["from"][0]["source"]["principals"] == [f"*/ns/team-a/sa/{CLUSTER.service_account}",
                                                            "*/ns/team-a/sa/default-editor"]
    assert "kubeflow-user-example-com" not in yaml.safe_dump_all(objects)


def test_only_the_object_store_endpoints_and_the_kubeflow_host_are_left_to_fill():
    unfilled = [(o["metadata"]["name"], k) for o in profile() if o["kind"] == "ConfigMap"
                for k, v in o.get("data", {}).items() if PLACEHOLDER in v]
    assert sorted(unfilled) == [("ctv2v-env", "S3_ENDPOINT"), ("mlflow-server-env", "MLFLOW_S3_ENDPOINT_URL"),
                                ("mlflow-server-env", "MLFLOW_UI_HOST")]


# ----------------------------------------------------------------------------------------- real MLflow server
def test_mlflow_behind_the_gateway_serves_the_ui_to_the_kubeflow_host_and_the_api_to_the_steps(tmp_path):
    objects = profile()
    args = mlflow_args(objects)
    container = mlflow_container(objects)
    probe = container["readinessProbe"]["httpGet"]
    [probe_host] = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    prefix = option(args, "--static-prefix")
    proc, port = start_mlflow(tmp_path, args, probe["path"], probe_host)
    try:
        base = f"http://127.0.0.1:{port}"
        search = "/ajax-api/2.0/mlflow/runs/search"
        body = b'{"experiment_ids": ["0"]}'
        json_body = {"Content-Type": "application/json"}
        # The browser, through the gateway: the Kubeflow host, and its origin on the UI's POSTs.
        assert http_get(f"{base}{prefix}/", UI_HOST) == 200
        assert http_get(f"{base}{prefix}{search}", UI_HOST, {**json_body, "Origin": f"https://{UI_HOST}"},
                        "POST", body) == 200
        assert http_get(f"{base}{prefix}{search}", UI_HOST, {**json_body, "Origin": "https://evil.example.com"},
                        "POST", body) == 403
        assert http_get(f"{base}{prefix}/", "evil.example.com") == 403
        # The steps: the tracking URI's host, the API under the prefix (and nothing outside it).
        tracking = urlsplit(find(objects, "ConfigMap", CLUSTER.env_config_map)["data"]["MLFLOW_TRACKING_URI"])
        assert http_get(f"{base}{tracking.path}/api/2.0/mlflow/experiments/search?max_results=1", tracking.netloc) == 200
        assert http_get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", tracking.netloc) == 404
        # The kubelet's probes, at their paths under the prefix (/health outside it is a 404: a restart loop).
        for probe in ("startupProbe", "livenessProbe"):
            assert http_get(base + container[probe]["httpGet"]["path"], probe_host) == 200, probe
        assert http_get(f"{base}/health", probe_host) == 404
    finally:
        stop_process_group(proc)


# --------------------------------------------------------------------------------------- one shared MLflow
def shared() -> tuple[dict, ...]:
    return render(SHARED_MLFLOW)


def test_the_shared_mlflow_has_a_workspace_per_profile_authorized_by_kubernetes_rbac():
    objects = shared()
    args = mlflow_args(objects)
    assert {"--enable-workspaces", "--workspace-store-uri=kubernetes://", "--app-name=kubernetes-auth"} <= set(args)
    assert find(objects, "ConfigMap", "mlflow-server-env")["data"]["MLFLOW_K8S_WORKSPACE_LABEL_SELECTOR"] == (
        "app.kubernetes.io/part-of=kubeflow-profile")
    # The server's image holds the plugins that provide both (pinned).
    pins = [Requirement(line) for line in (IMAGES / "mlflow-server" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    [plugins] = [pin for pin in pins if pin.name == "mlflow-kubernetes-plugins"]
    assert str(plugins.specifier).startswith("==")
    # Its own token lists and watches namespaces, nothing else; SelfSubjectAccessReviews use the callers' tokens.
    pod_spec = pod_template(find(objects, "Deployment", "mlflow"))["spec"]
    assert pod_spec["serviceAccountName"] == "mlflow" and pod_spec["automountServiceAccountToken"] is True
    assert find(objects, "ClusterRole", "ctv2v-mlflow-workspaces")["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]
    binding = find(objects, "ClusterRoleBinding", "ctv2v-mlflow-workspaces")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mlflow", "namespace": namespace_of(objects)}]
    assert not [o for o in objects if o["kind"] in ("PersistentVolumeClaim", "Role", "RoleBinding")]


def test_profiles_reach_the_shared_mlflow_under_one_prefix_with_their_token_and_namespace():
    objects, profile_objects = shared(), profile(PROFILE_WITH_SHARED_MLFLOW)
    assert not [o for o in profile_objects if o["kind"] in ("Deployment", "Service", "StatefulSet")]
    env = find(profile_objects, "ConfigMap", CLUSTER.env_config_map)["data"]
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    args = mlflow_args(objects)
    [service_port] = find(objects, "Service", "mlflow")["spec"]["ports"]
    assert tracking.netloc == f"mlflow.{namespace_of(objects)}.svc.cluster.local:{service_port['port']}"
    assert tracking.netloc in option(args, "--allowed-hosts").split(",")
    route = {r["name"]: r for r in find(objects, "VirtualService", "mlflow-ui")["spec"]["http"]}
    link = json.loads((SHARED_MLFLOW / "dashboard-menu-link.json").read_text())
    assert {tracking.path, option(args, "--static-prefix"), route["mlflow-ui"]["match"][0]["uri"]["prefix"].rstrip("/"),
            link["link"].rstrip("/")} == {"/mlflow"}
    assert mlflow_container(objects)["readinessProbe"]["httpGet"]["path"] == "/mlflow/health"
    assert set(link) == {"type", "link", "text", "icon"} and link["type"] == "item"
    # MLflow's client adds the pod's service-account token and namespace (workspace) to every request.
    assert env["MLFLOW_TRACKING_AUTH"] == KubernetesNamespacedRequestAuthProvider().get_name()
    # What kubernetes-auth checks: the pipeline's steps and the profile's notebooks may create and update
    # experiments and registered models of their own namespace, and delete nothing.
    namespace = find(profile_objects, "ConfigMap", CLUSTER.env_config_map)["metadata"]["namespace"]
    rules = find(profile_objects, "Role", "ctv2v-mlflow")["rules"]
    granted = {(resource, verb) for rule in rules if rule["apiGroups"] == ["mlflow.kubeflow.org"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    for resource in ("experiments", "registeredmodels"):
        assert {(resource, verb) for verb in ("get", "list", "create", "update")} <= granted
    assert not {verb for _, verb in granted} & {"delete", "*"}
    subjects = find(profile_objects, "RoleBinding", "ctv2v-mlflow")["subjects"]
    assert {(s["name"], s["namespace"]) for s in subjects} == {(CLUSTER.service_account, namespace),
                                                               ("default-editor", namespace)}


@pytest.mark.parametrize("caller, principal, port, allowed", [
    ("sidecar-less step pod", None, 5000, True),
    ("the Kubeflow gateway", "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account", 5000, True),
    ("KFP's API server", "cluster.local/ns/kubeflow/sa/ml-pipeline", 5000, True),
    ("a notebook of any profile", "cluster.local/ns/team-b/sa/default-editor", 5000, True),
    ("a step pod with a sidecar", f"cluster.local/ns/team-b/sa/{CLUSTER.service_account}", 5000, True),
    ("KFP's UI", "cluster.local/ns/kubeflow/sa/ml-pipeline-ui", 5000, False),
    ("plain text to another port of the pod", None, 15000, False),
])
def test_istio_admits_the_profiles_the_gateway_and_kfps_api_server_to_the_shared_mlflow(caller, principal, port,
                                                                                          allowed):
    objects = shared()
    policies = [o for o in objects if o["kind"] == "AuthorizationPolicy"]
    assert istio_allows(policies, {"labels": pod_labels(objects, "Deployment", "mlflow")}, principal, port) is allowed


@pytest.mark.parametrize("source, allowed", [
    ("step pod of a profile", True), ("notebook of a profile", True), ("gateway", True), ("kfp-api-server", True),
    ("kfp-ui", False), ("pod of a namespace that is no profile", False),
])
def test_network_policy_admits_profiles_the_gateway_and_kfps_api_server_to_the_shared_mlflow(source, allowed):
    objects = shared()
    namespace = namespace_of(objects)
    kubeflow = {"kubernetes.io/metadata.name": namespace}
    profile_namespace = {"kubernetes.io/metadata.name": "team-b", "app.kubernetes.io/part-of": "kubeflow-profile"}
    pods = {
        "step pod of a profile": {"namespace": "team-b", "labels": {"app.kubernetes.io/part-of": CLUSTER.pod_label},
                                  "namespace_labels": profile_namespace},
        "notebook of a profile": {"namespace": "team-b", "labels": {"notebook-name": "nb"},
                                  "namespace_labels": profile_namespace},
        "gateway": {"namespace": "istio-system", "labels": {"istio": "ingressgateway"},
                    "namespace_labels": {"kubernetes.io/metadata.name": "istio-system"}},
        "kfp-api-server": {"namespace": namespace, "labels": {"app": "ml-pipeline"}, "namespace_labels": kubeflow},
        "kfp-ui": {"namespace": namespace, "labels": {"app": "ml-pipeline-ui"}, "namespace_labels": kubeflow},
        "pod of a namespace that is no profile": {"namespace": "default", "labels": {"notebook-name": "nb"},
                                                  "namespace_labels": {"kubernetes.io/metadata.name": "default"}},
    }
    target = {"namespace": namespace, "labels": pod_labels(objects, "Deployment", "mlflow"), "namespace_labels": kubeflow}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert ingress_allowed(policies, namespace, target, pods[source], 5000) is allowed


PLUGIN_ARGUMENTS = ("--enable-workspaces", "--workspace-store-uri=kubernetes://", "--app-name=kubernetes-auth")
"""Served by mlflow-kubernetes-plugins, which the package index here does not hold: left out of the local server."""


def test_the_shared_mlflow_answers_the_profiles_tracking_uri_and_the_kubeflow_host_under_its_prefix(tmp_path):
    objects = shared()
    args = [arg for arg in mlflow_args(objects) if arg not in PLUGIN_ARGUMENTS]
    container = mlflow_container(objects)
    tracking = urlsplit(find(profile(PROFILE_WITH_SHARED_MLFLOW), "ConfigMap", CLUSTER.env_config_map)["data"][
        "MLFLOW_TRACKING_URI"])
    proc, port = start_mlflow(tmp_path, args, container["readinessProbe"]["httpGet"]["path"], tracking.netloc)
    try:
        base = f"http://127.0.0.1:{port}"
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        # Generous timeouts: the first UI request renders on a shared, loaded machine.
        assert http_get(f"{base}{tracking.path}{api}", tracking.netloc, timeout_s=60) == 200
        assert http_get(f"{base}{tracking.path}/", UI_HOST, timeout_s=60) == 200
        assert http_get(f"{base}{tracking.path}{api}", "mlflow.elsewhere:5000", timeout_s=60) == 403
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert http_get(base + container[probe]["httpGet"]["path"], tracking.netloc, timeout_s=60) == 200, probe
    finally:
        stop_process_group(proc)
