"""A training step on several nodes: a Kubeflow Trainer v2 TrainJob that runs the step's torchrun call on each.

With cluster.nodes > 1, `run_on_gpus` (ctv2v.steps.context) writes the same torchrun call file it writes for one
node, into the step's folder on the workspace volume, and hands it to `run_trainjob`. The TrainJob references
the `torch-distributed` ClusterTrainingRuntime (cluster.trainer_runtime), whose torch plugin gives every node
torchrun's settings as PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT / PET_NPROC_PER_NODE; each
node runs `python -m torch.distributed.run -m ctv2v.steps.context <call file>` with the step's image, GPUs,
CPU and memory, the workspace volume, the settings ConfigMap, the S3 (and MLflow) secrets, and the NCCL
environment (cluster.nccl). The step then follows node 0's log, waits for the job, and fails with the job's
reason when it fails.

Cleanup: a SIGTERM (KFP deletes or cancels the step's pod) or any error while the job may still run deletes
the TrainJob. A finished job (Complete/Failed) stays for inspection; a retried step finds its predecessor's
job by name (a hash of the step's folder), checks it carries this step's labels, deletes it and starts anew,
resuming from the checkpoints on the workspace.

Kubernetes rights the pipeline's service account needs (manifests/pipeline-namespace/trainjob-rbac.yaml): create, get, list,
watch, delete on trainjobs; list on pods (to find node 0's pod) and get on pods/log.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ctv2v.config import RunConfig

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE_CONTAINER = "node"
"""The torch-distributed runtime's training container and replicated job."""
MANAGER = "ctv2v"
"""runtimePatches manager and app.kubernetes.io/managed-by value of the TrainJobs ctv2v creates."""
PART_OF_LABEL = "app.kubernetes.io/part-of"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
STEP_LABEL = "ctv2v.io/step-folder"
OUT_DIR_ANNOTATION = "ctv2v.io/out-dir"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

PASSED_THROUGH = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_WORKSPACE")
"""Set in the step's pod by KFP's MLflow integration when it is on; the nodes log into the same runs."""


class TrainJobFailed(RuntimeError):
    """The TrainJob ended Failed (the message has its reason), or could not be created."""


class StepCancelled(RuntimeError):
    """The step's pod got SIGTERM while its TrainJob ran."""


# ------------------------------------------------------------------------------------------- the object
def trainjob_name(out_dir: Path) -> str:
    """The TrainJob of a step folder: the same name on every retry, a valid DNS label well under JobSet's limit."""
    return "ctv2v-" + hashlib.sha256(str(Path(out_dir)).encode()).hexdigest()[:12]


def _step_label(out_dir: Path) -> str:
    """A label value naming the step folder (at most 63 characters, its start kept)."""
    return Path(out_dir).name[:63].strip("-_.") or "step"


def node_environment(config: RunConfig, environ: Mapping[str, str]) -> list[dict[str, Any]]:
    """The environment of every node: NCCL settings, the step's ConfigMap keys and secrets, KFP's MLflow ids."""
    cluster = config.cluster
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in cluster.nccl.environment().items()]
    env += [{"name": key, "valueFrom": {"configMapKeyRef": {"name": cluster.env_config_map, "key": key,
                                                            "optional": True}}} for key in cluster.ENV_CONFIG_MAP_KEYS]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for secret, keys in cluster.step_secrets().items() for key in keys]
    env += [{"name": key, "value": environ[key]} for key in PASSED_THROUGH if key in environ]
    return env


def build_trainjob(config: RunConfig, call_file: Path, out_dir: Path, namespace: str,
                   environ: Mapping[str, str]) -> dict[str, Any]:
    """The TrainJob running `call_file` on cluster.nodes nodes, as the API expects it (validated by
    kubeflow-trainer-api's models: an unknown field fails here, not in the cluster)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    cluster = config.cluster
    labels = {PART_OF_LABEL: cluster.pod_label, MANAGED_BY_LABEL: MANAGER, STEP_LABEL: _step_label(out_dir)}
    cpu, memory, shm = cluster.gpu_step_resources(cluster.gpus_per_step)
    pod_spec: dict[str, Any] = {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In",
                                   "values": list(cluster.gpu_products)}]}]}}},
        "tolerations": [{"key": cluster.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": cluster.workspace_pvc}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}],
        "containers": [{"name": NODE_CONTAINER, "volumeMounts": [
            {"name": "workspace", "mountPath": cluster.workspace_mount},
            {"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if cluster.service_account:
        pod_spec["serviceAccountName"] = cluster.service_account
    if cluster.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in cluster.image_pull_secrets]
    # As the step pods: no Istio sidecar (NCCL/gloo between nodes and MLflow go direct), not evicted mid-run.
    pod_metadata = {"labels": {PART_OF_LABEL: cluster.pod_label},
                    "annotations": {"sidecar.istio.io/inject": "false",
                                    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}}
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": trainjob_name(out_dir), "namespace": namespace, "labels": labels,
                     "annotations": {OUT_DIR_ANNOTATION: str(out_dir)}},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": cluster.trainer_runtime},
            "activeDeadlineSeconds": cluster.step_timeout_s,
            "trainer": {
                "image": cluster.step_image("trainer"),
                # torchrun takes --nnodes, --node-rank, --master-addr/port, --nproc-per-node from the PET_*
                # variables the runtime sets on each node.
                "command": [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0",
                            "-m", "ctv2v.steps.context", str(call_file)],
                "numNodes": cluster.nodes,
                "numProcPerNode": cluster.gpus_per_step,
                "resourcesPerNode": {  # requests = limits, as the one-node step (Guaranteed QoS)
                    "requests": {"cpu": cpu, "memory": memory, cluster.gpu_resource: str(cluster.gpus_per_step)},
                    "limits": {"cpu": cpu, "memory": memory, cluster.gpu_resource: str(cluster.gpus_per_step)},
                },
                "env": node_environment(config, environ),
            },
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": NODE_CONTAINER, "template": {"spec": {"template": {
                    "metadata": pod_metadata, "spec": pod_spec}}}}]}}}}],
        },
    }
    model = TrainerV1alpha1TrainJob.from_dict(body)
    checked = model.to_dict()
    if checked != body:
        raise ValueError(f"TrainJob {body['metadata']['name']}: fields that kubeflow-trainer-api's model does not "
                         f"know: built {body}, model kept {checked}")
    return body


def launch_folder(config: RunConfig, out_dir: Path) -> Path:
    """Where a multi-node step puts its call file and staged inputs: `<out_dir>.trainjob` on the workspace volume
    (not in out_dir, which holds only output)."""
    workspace = Path(config.cluster.workspace_mount)
    if not Path(out_dir).resolve().is_relative_to(workspace.resolve()):
        raise ValueError(f"cluster.nodes={config.cluster.nodes}: the step folder {out_dir} must be on the workspace "
                         f"volume (cluster.workspace_mount={workspace}), the only folder every node sees")
    folder = Path(out_dir).with_name(Path(out_dir).name + ".trainjob")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stage_inputs(arguments: Mapping[str, Any], folder: Path, workspace: Path) -> dict[str, Any]:
    """`arguments` with every file or folder outside the `workspace` volume copied into `folder`/inputs/<name>.

    A KFP step reads its input artifacts from its own pod's disk; the TrainJob's nodes see only the workspace.
    """
    staged = dict(arguments)
    for key, value in arguments.items():
        if isinstance(value, Path) and not value.resolve().is_relative_to(workspace.resolve()):
            target = folder / "inputs" / key
            if value.is_dir():
                shutil.copytree(value, target, dirs_exist_ok=True)
            elif value.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(value, target)
            else:
                raise FileNotFoundError(f"{key}={value}: no such file or folder to hand to the TrainJob's nodes")
            staged[key] = target
    return staged


# ------------------------------------------------------------------------------------------ lifecycle
def kubernetes_api() -> tuple[Any, str]:
    """An API client and namespace: the pod's service account in the cluster, else the current kubeconfig context."""
    from kubernetes import client
    from kubernetes import config as kube_config

    token_dir = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    if (token_dir / "token").is_file():
        kube_config.load_incluster_config()
        return client.ApiClient(), (token_dir / "namespace").read_text().strip()
    # KUBECONFIG is read now, not when the kubernetes package was imported (its default path is fixed at import).
    kubeconfig = os.environ.get("KUBECONFIG", "~/.kube/config")
    api = kube_config.new_client_from_config(config_file=kubeconfig)
    _, context = kube_config.list_kube_config_contexts(config_file=kubeconfig)
    namespace = context["context"].get("namespace")
    if not namespace:
        raise ValueError(f"kubeconfig context {context['name']!r} names no namespace to create the TrainJob in")
    return api, namespace


def _condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _finished(job: Mapping[str, Any]) -> bool:
    """True when the job completed; raises TrainJobFailed when it failed."""
    failed = _condition(job, "Failed")
    if failed is not None:
        name = job["metadata"]["name"]
        raise TrainJobFailed(f"TrainJob {job['metadata'].get('namespace')}/{name} failed: "
                             f"{failed.get('reason', 'no reason')}: {failed.get('message', 'no message')} "
                             f"(kubectl describe trainjob {name}; node logs: kubectl logs -l "
                             f"jobset.sigs.k8s.io/jobset-name={name})")
    return _condition(job, "Complete") is not None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Inside: SIGTERM raises StepCancelled in the main thread, so the finally clauses delete the job."""
    def cancel(signum: int, _frame: Any) -> None:
        raise StepCancelled(f"signal {signum} while the TrainJob ran")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _NodeZeroLog(threading.Thread):
    """Follows the log of node 0's pod (each new pod of it in turn) into this process's log."""

    def __init__(self, core: Any, namespace: str, name: str, poll_s: float):
        super().__init__(name=f"log-{name}", daemon=True)
        self.core, self.namespace, self.name_, self.poll_s = core, namespace, name, poll_s
        self.stop = threading.Event()
        self.followed: set[str] = set()

    def run(self) -> None:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        selector = f"jobset.sigs.k8s.io/jobset-name={self.name_},batch.kubernetes.io/job-completion-index=0"
        while not self.stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
                for pod in pods:
                    if pod.metadata.name in self.followed or pod.status.phase not in ("Running", "Succeeded",
                                                                                      "Failed"):
                        continue
                    self.followed.add(pod.metadata.name)
                    stream = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace,
                                                               container=NODE_CONTAINER, follow=True,
                                                               _preload_content=False)
                    for line in stream.stream():
                        for text in line.decode(errors="replace").splitlines():
                            log.info("[%s] %s", pod.metadata.name, text)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                # The log is a convenience (a pod may vanish between list and read): the job's status decides.
                log.warning("TrainJob %s: cannot read node 0's log: %s", self.name_, exc)
            self.stop.wait(self.poll_s)


def run_trainjob(config: RunConfig, call_file: Path, out_dir: Path, *, api_client: Any = None,
                 namespace: str | None = None, environ: Mapping[str, str] | None = None,
                 log_poll_s: float = 5.0) -> None:
    """Create the step's TrainJob, follow node 0's log, wait for it; raise TrainJobFailed with its reason.

    Without `api_client`/`namespace`, they come from the pod's service account or the kubeconfig.
    """
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    if api_client is None:
        api_client, found_namespace = kubernetes_api()
        namespace = namespace or found_namespace
    if namespace is None:
        raise ValueError("run_trainjob: a namespace is needed with an explicit api_client")
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    body = build_trainjob(config, call_file, out_dir, namespace, os.environ if environ is None else environ)
    name = body["metadata"]["name"]
    where = (GROUP, VERSION, namespace, PLURAL)

    def get() -> dict[str, Any] | None:
        try:
            return custom.get_namespaced_custom_object(*where, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete() -> None:
        try:
            custom.delete_namespaced_custom_object(*where, name, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise

    previous = get()
    if previous is not None:
        meta = previous.get("metadata", {})
        if (meta.get("labels", {}).get(MANAGED_BY_LABEL) != MANAGER
                or meta.get("annotations", {}).get(OUT_DIR_ANNOTATION) != str(out_dir)):
            raise TrainJobFailed(f"TrainJob {namespace}/{name} exists and was not created by this step "
                                 f"(labels {meta.get('labels')}); not touching it")
        log.info("TrainJob %s/%s: left by an earlier attempt of this step; deleting it and starting anew "
                 "(training resumes from the checkpoints in %s)", namespace, name, out_dir)
        delete()
        deadline = time.monotonic() + 300
        while get() is not None:
            if time.monotonic() > deadline:
                raise TrainJobFailed(f"TrainJob {namespace}/{name}: the earlier attempt's job is still being "
                                     "deleted after 300 s")
            time.sleep(1)

    follower = _NodeZeroLog(core, namespace, name, log_poll_s)
    done = False
    with _sigterm_raises():
        try:
            try:
                custom.create_namespaced_custom_object(*where, body)
            except ApiException as exc:
                done = True  # nothing was created
                raise TrainJobFailed(f"cannot create TrainJob {namespace}/{name}: HTTP {exc.status} {exc.reason}: "
                                     f"{exc.body}") from None
            log.info("TrainJob %s/%s: %d nodes x %d GPUs, runtime %s", namespace, name, config.cluster.nodes,
                     config.cluster.gpus_per_step, config.cluster.trainer_runtime)
            follower.start()
            while not (done := _finished(_must_exist(get(), namespace, name))):
                try:
                    for event in watch.Watch().stream(custom.list_namespaced_custom_object, *where,
                                                      field_selector=f"metadata.name={name}",
                                                      timeout_seconds=int(config.cluster.trainjob_poll_s)):
                        if event["type"] == "DELETED" or _finished(event["object"]):
                            break
                except ApiException as exc:
                    if exc.status != 410:  # 410: the watch fell behind; the next get() catches up
                        raise
            log.info("TrainJob %s/%s: complete", namespace, name)
        except TrainJobFailed:
            done = True  # Failed is final: the job stays for `kubectl describe`; a retry replaces it
            raise
        finally:
            if not done:
                log.warning("TrainJob %s/%s: deleting it (the step stops)", namespace, name)
                try:
                    delete()
                except ApiException as exc:
                    log.error("TrainJob %s/%s: could not delete it (HTTP %s %s); delete it by hand: "
                              "kubectl delete trainjob -n %s %s", namespace, name, exc.status, exc.reason,
                              namespace, name)
            follower.stop.set()
            if follower.is_alive():
                follower.join(timeout=10)


def _must_exist(job: dict[str, Any] | None, namespace: str, name: str) -> dict[str, Any]:
    if job is None:
        raise TrainJobFailed(f"TrainJob {namespace}/{name} was deleted while the step waited for it")
    return job
