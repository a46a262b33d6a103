"""A real two-"node" training step on this machine.

The step's launcher (ctv2v.steps.context.run_on_gpus with cluster.nodes=2) creates its TrainJob on a loopback
Kubernetes API stub; the test then plays Kubeflow Trainer: it starts the TrainJob's command on two "nodes" (two
torchrun launchers, one process each, a c10d rendezvous on 127.0.0.1, gloo) with the PET_* environment the
torch-distributed runtime gives each node, and marks the job Complete when both exit. Both ranks must end
with identical weights, equal to a one-node two-process run with the same global batch and seed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import pytest
import torch

from ctv2v.models.weights import CheckpointError
from ctv2v.steps.context import run_on_gpus
from ctv2v.steps.train import train_step
from tests.conftest import REPO, TRAINING_PHANTOM, prepared_phantoms, training_config
from tests.kube_stub import KubeStub
from tests.multinode_step import train_recording_weights

OVERRIDES = ["training.frozen.batch_size=1", "training.frozen.epochs=1", "training.latent_cache=false"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hashes(out_dir):
    return [json.loads((out_dir / f"hash-rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_nodes_train_like_one_node_with_two_processes(tmp_path, monkeypatch):
    from ctv2v.models.vae import ScratchVAE, save_vae_artifact

    workspace = tmp_path / "workspace"
    config = training_config(*OVERRIDES, f"cluster.workspace_mount={workspace}", "cluster.trainjob_poll_s=1")
    data = prepared_phantoms(workspace / "runs" / "r1", config, volumes=4, shape=TRAINING_PHANTOM)
    torch.manual_seed(0)
    vae_dir = tmp_path / "pod-disk" / "vae"  # an input artifact on the step pod's own disk, as KFP puts it
    save_vae_artifact(ScratchVAE.from_config(config.vae.scratch), vae_dir, weights="scratch",
                      extra={"note": "random weights, test input"})
    arguments = {"phase": "frozen", "data_dir": data, "vae_dir": vae_dir, "init_dir": None, "resume": True,
                 "pipeline_run_id": None}
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", str(REPO))

    # One node, two processes: the reference.
    one_node = workspace / "runs" / "r1" / "one-node"
    run_on_gpus(train_recording_weights, 2, config, one_node, **arguments)

    # Two nodes of one process each, through the TrainJob the step creates.
    stub = KubeStub(outcome=None)
    url = stub.start()
    monkeypatch.setenv("KUBECONFIG", str(stub.write_kubeconfig(tmp_path / "kubeconfig", url)))
    two_nodes = workspace / "runs" / "r1" / "two-nodes"
    failure: list[BaseException] = []

    def launch() -> None:
        try:
            run_on_gpus(train_recording_weights, 1, config.model_copy(update={"cluster": config.cluster.model_copy(
                update={"nodes": 2})}), two_nodes, **arguments)
        except BaseException as exc:  # noqa: BLE001 (reported by the test below)
            failure.append(exc)

    launcher = threading.Thread(target=launch)
    launcher.start()
    try:
        assert stub.created.wait(120), f"no TrainJob created: {failure}"
        (job,) = stub.jobs.values()
        trainer = job["spec"]["trainer"]
        assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 1
        # torchrun gave the reference's two processes OMP_NUM_THREADS=1 (it does so only for nproc_per_node > 1):
        # the nodes get the same, since bitwise-equal weights need the same intra-op reduction order.
        node_env = {**env, **{item["name"]: item["value"] for item in trainer["env"] if "value" in item},
                    "OMP_NUM_THREADS": "1"}
        port = _free_port()
        nodes = [subprocess.Popen(trainer["command"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**node_env, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
                                                  "PET_NODE_RANK": str(rank), "PET_RDZV_BACKEND": "c10d",
                                                  "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}",
                                                  "PET_RDZV_ID": "ctv2v-two-nodes"})
                 for rank in (0, 1)]
        logs = [node.communicate(timeout=600)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
        stub.outcome = "Complete"
        launcher.join(timeout=60)
    finally:
        stub.outcome = "Complete"
        launcher.join(timeout=60)
        stub.stop()
    assert not failure, failure

    reference, result = _hashes(one_node), _hashes(two_nodes)
    assert [r["world_size"] for r in result] == [2, 2]
    # 2 train volumes x 2 clips over 2 ranks at batch 1: 2 steps, each averaging 2 clips (global batch 2).
    assert [r["steps"] for r in result] == [2, 2]
    assert result[0]["weights"] == result[1]["weights"]
    assert result[0]["weights"] == reference[0]["weights"]
    # Rank 0 alone wrote the output; the launcher's files stayed out of it.
    assert (two_nodes / "model").is_dir()
    assert [p.name for p in (two_nodes / "checkpoints").iterdir()] == ["step-00000002.pt"]
    assert not (two_nodes / "torchrun-call.json").exists()

    # Resuming on a different number of processes is refused, naming the count.
    with pytest.raises(CheckpointError, match="written by 2 processes"):
        train_step(config, out_dir=two_nodes, **arguments)
