"""Multi-node steps: the TrainJob object (validated by kubeflow-trainer-api's models) and its create / watch /
delete sequence against a loopback Kubernetes API stub that records requests (tests/kube_stub.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes import config as kube_config

from ctv2v.config_io import load_config
from ctv2v.remote.trainjob import (
    MANAGED_BY_LABEL,
    OUT_DIR_ANNOTATION,
    TrainJobFailed,
    build_trainjob,
    kubernetes_api,
    run_trainjob,
    trainjob_name,
)
from pipeline.compile import compile_pipeline
from tests.conftest import REPO
from tests.kube_stub import TRAINJOBS, KubeStub

STEP_FOLDER = Path("/workspace/runs/run-1/train-frozen-main")


def _config(*overrides: str):
    return load_config([REPO / "configs" / "main.yaml", REPO / "configs" / "v100-32gb.yaml"], list(overrides))


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_trainjob_is_strictly_valid_and_runs_the_step_call_on_every_node(nodes):
    config = _config(f"cluster.nodes={nodes}", "cluster.gpus_per_step=4", "cluster.mlflow_secret=ctv2v-mlflow",
                     "cluster.nccl.socket_ifname=ib0", "cluster.nccl.extra_env={NCCL_P2P_DISABLE: '1'}")
    call_file = STEP_FOLDER / "torchrun-call.json"
    body = build_trainjob(config, call_file, STEP_FOLDER, "team-a", {"MLFLOW_RUN_ID": "r-1", "HOME": "/root"})

    # Strict: every field survives a round trip through the API's models (an unknown field would be dropped),
    # and the models' own type checks (StrictInt, StrictStr...) accept every value.
    assert TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == trainjob_name(STEP_FOLDER)
    assert body["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                          "name": "torch-distributed"}
    trainer = body["spec"]["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == 4
    assert trainer["image"] == config.cluster.step_image("trainer")
    assert trainer["command"][1:3] == ["-m", "torch.distributed.run"]
    assert trainer["command"][-2:] == ["ctv2v.steps.context", str(call_file)]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"]
    assert trainer["resourcesPerNode"]["limits"]["cpu"] == str(4 * config.cluster.cpu_per_gpu)
    env = {item["name"]: item for item in trainer["env"]}
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "ib0" and env["NCCL_IB_DISABLE"]["value"] == "1"
    assert env["NCCL_P2P_DISABLE"]["value"] == "1"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "ctv2v-s3",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ctv2v-mlflow"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "ctv2v-env"
    assert env["MLFLOW_RUN_ID"]["value"] == "r-1" and "HOME" not in env
    (patch,) = body["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app.kubernetes.io/part-of": "ctv2v-pipeline"}
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["spec"]["serviceAccountName"] == "ctv2v-pipeline"
    (term,) = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In",
                                         "values": config.cluster.gpu_products}]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "ctv2v-workspace"}
    (container,) = pod["spec"]["containers"]
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]


def test_nodes_get_the_same_settings_and_secrets_as_the_step_pod(tmp_path):
    """What the compiled pipeline gives a training step's pod from the ConfigMap and Secrets, every node gets."""
    config = _config("cluster.nodes=2", "cluster.mlflow_secret=ctv2v-mlflow")
    package = compile_pipeline(config, tmp_path / "pipeline.yaml")
    platform = list(yaml.safe_load_all(package.read_text()))[1]
    step_pod = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-op"]
    pod_refs = {("configMapKeyRef", source["configMapName"], key["configMapKey"], key["envVar"])
                for source in step_pod["configMapAsEnv"] for key in source["keyToEnv"]}
    pod_refs |= {("secretKeyRef", source["secretName"], key["secretKey"], key["envVar"])
                 for source in step_pod["secretAsEnv"] for key in source["keyToEnv"]}
    body = build_trainjob(config, STEP_FOLDER / "c.json", STEP_FOLDER, "team-a", {})
    node_refs = {(kind, ref["name"], ref["key"], item["name"]) for item in body["spec"]["trainer"]["env"]
                 for kind, ref in item.get("valueFrom", {}).items()}
    assert {ref[1] for ref in pod_refs} == {"ctv2v-env", "ctv2v-s3", "ctv2v-mlflow"}
    assert node_refs == pod_refs


def test_model_rejects_what_the_api_would():
    body = build_trainjob(_config("cluster.nodes=2"), STEP_FOLDER / "c.json", STEP_FOLDER, "team-a", {})
    body["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValueError, match="numNodes"):
        TrainerV1alpha1TrainJob.from_dict(body)


@pytest.fixture
def stub():
    stub = KubeStub()
    stub.url = stub.start()
    yield stub
    stub.stop()


def _api(stub: KubeStub, tmp_path: Path):
    return kube_config.new_client_from_config(config_file=str(stub.write_kubeconfig(tmp_path / "kubeconfig",
                                                                                   stub.url)))


def test_kubeconfig_set_after_the_kubernetes_package_was_imported_is_the_one_used(stub, tmp_path, monkeypatch):
    """kubernetes fixes its default kubeconfig path when imported (this module imported it above); a KUBECONFIG
    exported later, as a launcher does for the step, must still be the one that names the cluster and namespace."""
    monkeypatch.setenv("KUBECONFIG", str(stub.write_kubeconfig(tmp_path / "kubeconfig", stub.url)))
    api_client, namespace = kubernetes_api()
    assert namespace == "team-a"
    assert api_client.configuration.host == stub.url


def test_complete_job_streams_node0_log_and_is_kept(stub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ctv2v.remote.trainjob")
    config = _config("cluster.nodes=2", "cluster.trainjob_poll_s=2")
    run_trainjob(config, STEP_FOLDER / "c.json", STEP_FOLDER, api_client=_api(stub, tmp_path), namespace="team-a",
                 environ={}, log_poll_s=0.1)
    name = trainjob_name(STEP_FOLDER)
    base = TRAINJOBS.format(namespace="team-a")
    calls = stub.calls()
    assert calls[:2] == [("GET", f"{base}/{name}"), ("POST", base)]
    watches = [r for r in stub.requests if r.path == base and r.method == "GET"]
    assert watches and watches[0].query["fieldSelector"] == [f"metadata.name={name}"]
    assert watches[0].query["watch"][0].lower() == "true"
    assert stub.calls("DELETE") == []
    assert name in stub.jobs  # a finished job stays for inspection
    assert any(r.path.endswith("/log") and r.query["container"] == ["node"] for r in stub.requests)
    assert "rank 0: step 2 loss 0.4" in caplog.text


def test_failed_job_fails_the_step_with_its_reason(stub, tmp_path):
    stub.outcome = "Failed"
    stub.failure = ("BackoffLimitExceeded", "node-1 exited with code 137 (OOMKilled)")
    with pytest.raises(TrainJobFailed, match=r"failed: BackoffLimitExceeded: node-1 exited with code 137"):
        run_trainjob(_config("cluster.nodes=2"), STEP_FOLDER / "c.json", STEP_FOLDER,
                     api_client=_api(stub, tmp_path), namespace="team-a", environ={}, log_poll_s=0.1)
    assert stub.calls("DELETE") == []  # Failed is final; kept for `kubectl describe`


def test_retry_replaces_its_own_stale_job_but_never_a_foreign_one(stub, tmp_path):
    name = trainjob_name(STEP_FOLDER)
    api = _api(stub, tmp_path)
    config = _config("cluster.nodes=2")
    stub.jobs[name] = {"metadata": {"name": name, "labels": {MANAGED_BY_LABEL: "someone-else"}, "annotations": {}}}
    with pytest.raises(TrainJobFailed, match="not created by this step"):
        run_trainjob(config, STEP_FOLDER / "c.json", STEP_FOLDER, api_client=api, namespace="team-a", environ={})
    assert stub.calls("DELETE") == [] and stub.calls("POST") == []

    stub.jobs[name] = {"metadata": {"name": name, "labels": {MANAGED_BY_LABEL: "ctv2v"},
                                    "annotations": {OUT_DIR_ANNOTATION: str(STEP_FOLDER)}}}
    run_trainjob(config, STEP_FOLDER / "c.json", STEP_FOLDER, api_client=api, namespace="team-a", environ={},
                 log_poll_s=0.1)
    methods = [method for method, _ in stub.calls()]
    assert methods.index("DELETE") < methods.index("POST")
    assert stub.jobs[name]["spec"]["trainer"]["numNodes"] == 2


CANCELLED_STEP = """
import sys
from pathlib import Path
from ctv2v.config_io import load_config
from ctv2v.steps.context import run_on_gpus
from ctv2v.steps.train import train_step

config = load_config([sys.argv[1]], sys.argv[2:])
workspace = Path(config.cluster.workspace_mount)
run_on_gpus(train_step, 1, config, workspace / "runs" / "r1" / "train-full-main", phase="full",
            data_dir=workspace / "runs" / "r1" / "data", vae_dir=Path(sys.argv[0]).parent / "vae-artifact",
            init_dir=None, resume=True, pipeline_run_id="r1")
"""


def test_cancelled_kfp_step_deletes_its_running_job(stub, tmp_path):
    """The KFP step's pod gets SIGTERM (run deleted or retried): the TrainJob it created must not keep running."""
    stub.outcome = None  # runs until deleted
    (tmp_path / "vae-artifact").mkdir()
    (tmp_path / "vae-artifact" / "vae.json").write_text("{}")
    script = tmp_path / "step.py"
    script.write_text(CANCELLED_STEP)
    workspace = tmp_path / "workspace"
    env = {**os.environ, "KUBECONFIG": str(stub.write_kubeconfig(tmp_path / "kubeconfig", stub.url)),
           "PYTHONPATH": str(REPO)}
    step = subprocess.Popen([sys.executable, str(script), str(REPO / "configs" / "main.yaml"), "cluster.nodes=2",
                             f"cluster.workspace_mount={workspace}", "cluster.trainjob_poll_s=1"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert stub.created.wait(60), "the step never created its TrainJob"
        time.sleep(0.5)
        step.send_signal(signal.SIGTERM)
        _, stderr = step.communicate(timeout=60)
    finally:
        if step.poll() is None:
            step.kill()
    assert step.returncode != 0
    assert "StepCancelled" in stderr
    name = trainjob_name(workspace / "runs" / "r1" / "train-full-main")
    assert ("DELETE", f"{TRAINJOBS.format(namespace='team-a')}/{name}") in stub.calls()
    assert stub.jobs == {}
    (created,) = [r.body for r in stub.requests if r.method == "POST"]
    # The VAE artifact lived on the step pod's disk: it was staged onto the workspace for the nodes.
    call_file = Path(created["spec"]["trainer"]["command"][-1])
    staged = Path(yaml.safe_load(call_file.read_text())["arguments"]["vae_dir"])
    assert staged.is_relative_to(workspace) and (staged / "vae.json").read_text() == "{}"


def _rbac_need(request) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) the API server authorizes a recorded request as."""
    path = request.path
    if path.endswith("/log"):
        return "", "pods/log", "get"
    if path.endswith("/pods"):
        return "", "pods", "list"
    collection = path.endswith("/trainjobs")
    verb = {"POST": "create", "DELETE": "delete"}.get(request.method) or (
        ("watch" if request.query.get("watch", [""])[0].lower() == "true" else "list") if collection else "get")
    return "trainer.kubeflow.org", "trainjobs", verb


def test_rbac_grants_exactly_what_a_multinode_step_calls(stub, tmp_path):
    from tests.manifest_checks import MANIFESTS, find, render

    config = _config("cluster.nodes=2", "cluster.trainjob_poll_s=1")
    api = _api(stub, tmp_path)
    name = trainjob_name(STEP_FOLDER)
    stub.jobs[name] = {"metadata": {"name": name, "labels": {MANAGED_BY_LABEL: "ctv2v"},
                                    "annotations": {OUT_DIR_ANNOTATION: str(STEP_FOLDER)}}}
    run_trainjob(config, STEP_FOLDER / "c.json", STEP_FOLDER, api_client=api, namespace="team-a", environ={},
                 log_poll_s=0.1)
    needed = {_rbac_need(request) for request in stub.requests}

    objects = render(MANIFESTS / "base")
    role = find(objects, "Role", "ctv2v-trainjobs")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert not any("resourceNames" in rule for rule in role["rules"])
    assert needed == granted  # everything the step calls, and nothing more
    binding = find(objects, "RoleBinding", "ctv2v-trainjobs")
    assert binding["roleRef"]["name"] == "ctv2v-trainjobs"
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "ctv2v-pipeline")]
