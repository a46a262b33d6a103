"""The compiled DAG: strict protobuf validation and checks of what the cluster reads from the compiled YAML: images
per kind of step (and digests), V100 node affinity, resources and limits on every step, the GPU count as a
compile-time constant, the commit, the TTL, the exit handler's cleanup option, and the KFP version it needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import json
import re

from kubernetes.utils import parse_quantity
from packaging.version import Version

from ctv2v.config import V100_16GB_PRODUCTS, V100_32GB_PRODUCTS, ClusterConfig
from ctv2v.config_io import load_config
from ctv2v.tracking.runs import git_commit
from pipeline.cli import main as cli_main
from pipeline.compile import (
    ImagesLockError,
    PipelineSpecError,
    backend_requirements,
    compile_pipeline,
    required_backend_version,
    validate_pipeline_yaml,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_EXECUTORS = ("train-vae-op", "train-op", "train-op-2", "train-op-3", "train-op-4")
CPU_STEPS = ("prepare-data-op", "fetch-checkpoint-op", "compare-op", "finish-run-op")
GPU_STEPS = ("train-op", "train-vae-op", "match-architecture-op", "evaluate-op")
NODES = {1: (8, 61), 4: (32, 244), 8: (64, 488)}
"""Common V100 machines: GPUs -> (vCPUs, GiB of memory), e.g. AWS p3.2xlarge, p3.8xlarge, p3.16xlarge."""
NODE_RESERVE = (1, 6)
"""(vCPUs, GiB) a node keeps for the kubelet, the system and its daemons (GPU plugin, GFD, CNI, logging)."""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    config = load_config([CONFIGS / "pretrained.yaml"], ["cluster.mlflow_secret=ctv2v-mlflow-auth"])
    compile_pipeline(config, out)
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    return out, pipeline_doc, platform_doc


def _executors(platform_doc: dict) -> dict:
    return platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _executor_for(pipeline_doc: dict, platform_doc: dict, component_prefix: str) -> list[tuple[str, dict, dict]]:
    """(executor label, container spec, kubernetes config) of every executor whose component starts so."""
    containers = pipeline_doc["deploymentSpec"]["executors"]
    return [(label, containers[label]["container"], cfg) for label, cfg in _executors(platform_doc).items()
            if label.startswith(f"exec-{component_prefix}")]


def test_compiled_yaml_parses_strictly_into_kfp_protobufs(compiled):
    out, pipeline_doc, _ = compiled
    pipeline_spec, platform_spec = validate_pipeline_yaml(out)
    assert pipeline_spec.pipeline_info.name == "ctv2v"
    assert set(pipeline_spec.root.input_definitions.parameters) == {"config", "branches", "workspace_root"}
    assert "kubernetes" in platform_spec.platforms


def test_validation_rejects_an_unknown_field(compiled, tmp_path):
    out, pipeline_doc, platform_doc = compiled
    pipeline_doc = dict(pipeline_doc, pipelineInfoo={"name": "typo"})
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all([pipeline_doc, platform_doc]))
    with pytest.raises(PipelineSpecError, match="pipelineInfoo"):
        validate_pipeline_yaml(broken)


def _component_of(executor_label: str) -> str:
    """`exec-train-op-3` -> `train-op`: the component an executor runs."""
    name = executor_label.removeprefix("exec-")
    head, _, tail = name.rpartition("-")
    return head if tail.isdigit() else name


def _affinity_products(cfg: dict) -> list[str]:
    [term] = cfg["nodeAffinity"]
    [expression] = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In"
    assert "weight" not in term, "required, not preferred: a GPU step must not land on another card"
    return expression["values"]


def test_gpu_steps_are_scheduled_on_any_listed_v100_and_tolerate_the_gpu_taint(compiled):
    _, pipeline_doc, platform_doc = compiled
    gpu_steps = [step for prefix in ("train", "match-architecture", "evaluate")
                 for step in _executor_for(pipeline_doc, platform_doc, prefix)]
    assert len(gpu_steps) >= 8
    for label, container, cfg in gpu_steps:
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu", label
        assert container["resources"]["accelerator"]["resourceCount"] == "1", label
        assert "nodeSelector" not in cfg, f"{label}: one exact product would leave the other V100 nodes idle"
        assert _affinity_products(cfg) == list(V100_32GB_PRODUCTS), label
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in cfg["tolerations"], label
        assert cfg["emptyDirMounts"][0]["mountPath"] == "/dev/shm", label
        assert cfg["emptyDirMounts"][0]["medium"] == "Memory", label
        assert cfg["podMetadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false", label
        assert cfg["activeDeadlineSeconds"] == "172800" or cfg["activeDeadlineSeconds"] == 172800, label


@pytest.mark.parametrize("overlay, products", [("v100-16gb.yaml", V100_16GB_PRODUCTS),
                                                ("v100-32gb.yaml", V100_32GB_PRODUCTS)])
def test_each_v100_preset_targets_its_cards(overlay, products, tmp_path):
    out = compile_pipeline(load_config([CONFIGS / "main.yaml", CONFIGS / overlay]), tmp_path / "p.yaml")
    _, platform_doc = list(yaml.safe_load_all(out.read_text()))
    gpu = [cfg for label, cfg in _executors(platform_doc).items() if "nodeAffinity" in cfg]
    assert gpu and all(_affinity_products(cfg) == list(products) for cfg in gpu)


def test_every_step_has_cpu_and_memory_limits_and_runs_on_its_kinds_image(compiled):
    _, pipeline_doc, platform_doc = compiled
    kinds = {}
    for label, executor in pipeline_doc["deploymentSpec"]["executors"].items():
        container = executor["container"]
        resources = container["resources"]
        # Profile ResourceQuotas refuse pods without limits; requests = limits keeps them last to be evicted.
        for resource in ("Cpu", "Memory"):
            assert resources[f"resource{resource}Limit"] == resources[f"resource{resource}Request"], label
        component = _component_of(label)
        is_gpu = "accelerator" in resources
        assert component in (GPU_STEPS if is_gpu else CPU_STEPS), label
        kinds.setdefault(component, set()).add(container["image"])
        cfg = _executors(platform_doc)[label]
        assert cfg["podMetadata"]["annotations"]["sidecar.istio.io/inject"] == "false", label
    assert {c: images for c, images in kinds.items()} == {
        **{c: {"ctv2v/cpu:0.1.0"} for c in CPU_STEPS}, **{c: {"ctv2v/trainer:0.1.0"} for c in GPU_STEPS}}


@pytest.mark.parametrize("gpus", sorted(NODES))
def test_gpu_step_resources_scale_with_gpus_and_fit_common_v100_machines(gpus, tmp_path):
    config = load_config([CONFIGS / "main.yaml"], [f"cluster.gpus_per_step={gpus}"])
    out = compile_pipeline(config, tmp_path / "p.yaml")
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    vcpus, gib = NODES[gpus]
    _, container, cfg = _executor_for(pipeline_doc, platform_doc, "train-vae-op")[0]
    resources = container["resources"]
    assert resources["accelerator"]["resourceCount"] == str(gpus)
    cpu, memory = parse_quantity(resources["resourceCpuLimit"]), parse_quantity(resources["resourceMemoryLimit"])
    shm = parse_quantity(cfg["emptyDirMounts"][0]["sizeLimit"])
    assert cpu == ClusterConfig().cpu_per_gpu * gpus and memory == ClusterConfig().memory_per_gpu_gib * gpus * 2**30
    assert cpu <= vcpus - NODE_RESERVE[0] and memory <= (gib - NODE_RESERVE[1]) * 2**30, "does not fit the node"
    # /dev/shm pages are charged to the container's memory limit: leave the processes at least as much again.
    assert 2 * shm <= memory


def test_with_several_nodes_training_steps_are_small_cpu_launchers_and_the_gpus_go_to_the_trainjob(tmp_path):
    """A multi-node step's pod only creates and follows its TrainJob: holding a V100 there would idle a card for
    the whole run. Its retries and timeout stay; evaluate and match still run on a GPU pod."""
    config = load_config([CONFIGS / "main.yaml"], ["cluster.nodes=2", "cluster.gpus_per_step=4"])
    out = compile_pipeline(config, tmp_path / "p.yaml")
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    launchers = [step for prefix in ("train-op", "train-vae-op")
                 for step in _executor_for(pipeline_doc, platform_doc, prefix)]
    assert {_component_of(label) for label, _, _ in launchers} == {"train-op", "train-vae-op"}
    for label, container, cfg in launchers:
        assert "accelerator" not in container["resources"], label
        assert "nodeAffinity" not in cfg and "tolerations" not in cfg, label
        assert container["image"] == "ctv2v/cpu:0.1.0", label
        assert parse_quantity(container["resources"]["resourceCpuLimit"]) == 1, label
        assert cfg["pvcMount"][0]["mountPath"] == config.cluster.workspace_mount, label
        assert int(cfg["activeDeadlineSeconds"]) == config.cluster.step_timeout_s, label
    train = [t for name, t in _all_tasks(pipeline_doc).items() if name.startswith(("train-op", "train-vae-op"))]
    assert train and all(task["retryPolicy"]["maxRetryCount"] == config.cluster.train_retries for task in train)
    (_, evaluate, _), *_ = _executor_for(pipeline_doc, platform_doc, "evaluate-op")
    assert evaluate["resources"]["accelerator"]["resourceCount"] == "1"


def test_shm_larger_than_half_the_memory_is_refused():
    with pytest.raises(ValueError, match="counts against the memory limit"):
        ClusterConfig(shm_per_gpu_gib=30, memory_per_gpu_gib=52)


def test_the_gpu_count_is_a_compile_time_constant_not_read_from_the_runtime_config(tmp_path):
    config = load_config([CONFIGS / "main.yaml"], ["cluster.gpus_per_step=4"])
    out = compile_pipeline(config, tmp_path / "p.yaml")
    pipeline_doc, _ = list(yaml.safe_load_all(out.read_text()))
    tasks = _all_tasks(pipeline_doc)
    training = {name: task for name, task in tasks.items() if name.startswith(("train-op", "train-vae-op"))}
    assert training
    for name, task in training.items():
        assert task["inputs"]["parameters"]["gpus"]["runtimeValue"]["constant"] == 4, name
    for label, executor in pipeline_doc["deploymentSpec"]["executors"].items():
        source = " ".join(executor["container"].get("command", []) + executor["container"].get("args", []))
        # The only use left is the override by the compiled value (`config.cluster.gpus_per_step = gpus`).
        assert not re.findall(r"config\.cluster\.gpus_per_step\b(?!\s*=\s*gpus\b)", source), (
            f"{label} reads the GPU count from the runtime config")


def test_the_compiled_pipeline_records_its_commit_and_ttl(compiled):
    _, pipeline_doc, platform_doc = compiled
    commit = git_commit()
    assert commit in pipeline_doc["pipelineInfo"]["description"]
    for label, cfg in _executors(platform_doc).items():
        assert cfg["podMetadata"]["annotations"]["ctv2v.io/git-commit"] == commit, label
    assert platform_doc["platforms"]["kubernetes"]["pipelineConfig"] == {
        "resourceTtlOnCompletion": ClusterConfig().run_ttl_s}


def test_the_exit_handler_gets_the_scratch_cleanup_policy(compiled):
    _, pipeline_doc, _ = compiled
    [finish] = [t for name, t in _all_tasks(pipeline_doc).items() if name.startswith("finish-run-op")]
    assert finish["inputs"]["parameters"]["scratch_cleanup"]["runtimeValue"]["constant"] == "on_success"
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED", "an exit handler runs always"


def test_the_backend_version_follows_the_features_used():
    assert required_backend_version(ClusterConfig()) == Version("2.17.0")
    without_ttl = ClusterConfig(run_ttl_s=None)
    assert required_backend_version(without_ttl) == Version("2.14.0")
    assert max(backend_requirements(without_ttl), key=backend_requirements(without_ttl).get).startswith("node affinity")


DIGEST_CPU, DIGEST_TRAINER = "sha256:" + "c" * 64, "sha256:" + "7" * 64


def test_digests_given_in_the_config_pin_each_kinds_image(tmp_path):
    out = tmp_path / "p.yaml"
    assert cli_main(["pipeline", "compile", "--config", str(CONFIGS / "main.yaml"),
                     "--set", "cluster.trainer_image=registry.test:5000/ml/ctv2v/trainer:9.9.9",
                     "--set", f"cluster.trainer_image_digest={DIGEST_TRAINER}",
                     "--set", f"cluster.cpu_image_digest={DIGEST_CPU}",
                     "--set", "cluster.image_pull_secrets=[regcred]", "-o", str(out)]) == 0
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    images = {_component_of(label): e["container"]["image"] for label, e in pipeline_doc["deploymentSpec"]["executors"].items()}
    assert {images[c] for c in CPU_STEPS if c in images} == {f"ctv2v/cpu@{DIGEST_CPU}"}
    assert {images[c] for c in GPU_STEPS if c in images} == {f"registry.test:5000/ml/ctv2v/trainer@{DIGEST_TRAINER}"}
    for label, cfg in _executors(platform_doc).items():
        assert [s["secretName"] for s in cfg["imagePullSecret"]] == ["regcred"], label


def test_a_malformed_digest_is_refused(capsys):
    assert cli_main(["pipeline", "compile", "--config", str(CONFIGS / "main.yaml"),
                     "--set", "cluster.trainer_image_digest=sha256:abc", "-o", "/dev/null"]) == 2


def _lock(path: Path, commit: str) -> Path:
    path.write_text(json.dumps({"commit": commit, "version": "0.1.0", "images": {
        "cpu": {"tag": "reg.test/ctv2v/cpu:git-x", "ref": f"reg.test/ctv2v/cpu@{DIGEST_CPU}"},
        "trainer": {"tag": "reg.test/ctv2v/trainer:git-x", "ref": f"reg.test/ctv2v/trainer@{DIGEST_TRAINER}"},
        "mlflow-server": {"tag": "reg.test/ctv2v/mlflow-server:git-x",
                          "ref": "reg.test/ctv2v/mlflow-server@sha256:" + "0" * 64}}}))
    return path


def test_the_images_lock_pins_digests_and_the_commit(tmp_path):
    commit = git_commit()
    out = tmp_path / "p.yaml"
    assert cli_main(["pipeline", "compile", "--config", str(CONFIGS / "main.yaml"), "--images-lock",
                     str(_lock(tmp_path / "images.lock.json", commit)), "-o", str(out)]) == 0
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    images = {_component_of(label): e["container"]["image"] for label, e in pipeline_doc["deploymentSpec"]["executors"].items()}
    assert images["prepare-data-op"] == f"reg.test/ctv2v/cpu@{DIGEST_CPU}"
    assert images["train-op"] == f"reg.test/ctv2v/trainer@{DIGEST_TRAINER}"
    assert commit in pipeline_doc["pipelineInfo"]["description"]


def test_an_images_lock_from_another_commit_is_refused(tmp_path):
    with pytest.raises(ImagesLockError, match="built from commit"):
        compile_pipeline(load_config([CONFIGS / "main.yaml"]), tmp_path / "p.yaml",
                         images_lock=_lock(tmp_path / "lock.json", "f" * 40))
    assert not (tmp_path / "p.yaml").exists()


def test_every_step_mounts_the_workspace_and_takes_settings_from_configmap_and_secrets(compiled):
    _, pipeline_doc, platform_doc = compiled
    executors = _executors(platform_doc)
    assert len(executors) == len(pipeline_doc["deploymentSpec"]["executors"])
    for label, cfg in executors.items():
        assert cfg["pvcMount"][0]["mountPath"] == "/workspace", label
        assert cfg["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "ctv2v-workspace", label
        assert cfg["podMetadata"]["labels"] == {"app.kubernetes.io/part-of": "ctv2v-pipeline"}, label
        env_from_cm = {e["envVar"] for cm in cfg["configMapAsEnv"] for e in cm["keyToEnv"]}
        assert {"MLFLOW_TRACKING_URI", "S3_ENDPOINT"} <= env_from_cm, label
        secrets = {s["secretNameParameter"]["runtimeValue"]["constant"]: {e["envVar"] for e in s["keyToEnv"]}
                   for s in cfg["secretAsEnv"]}
        assert secrets["ctv2v-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, label
        assert secrets["ctv2v-mlflow-auth"] == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, label


def _all_tasks(pipeline_doc: dict) -> dict:
    """Every task of the DAG, condition groups included, by task name."""
    tasks = dict(pipeline_doc["root"]["dag"]["tasks"])
    for component in pipeline_doc["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_training_retries_and_caching(compiled):
    _, pipeline_doc, _ = compiled
    tasks = _all_tasks(pipeline_doc)
    train = [t for name, t in tasks.items() if name.startswith(("train-op", "train-vae-op"))]
    assert len(train) == 10  # per branch group: frozen + full (x2 variants in `both`) and train-vae
    for task in train:
        assert task["retryPolicy"]["maxRetryCount"] == 2
        assert task["retryPolicy"]["backoffDuration"] == "60s"
        assert not task["cachingOptions"].get("enableCache", False)
    for name, task in tasks.items():
        if name.startswith(("evaluate-op", "compare-op", "prepare-data-op")):
            assert not task["cachingOptions"].get("enableCache", False), name
        if name.startswith(("fetch-checkpoint-op", "match-architecture-op")):
            assert task["cachingOptions"]["enableCache"], name


def test_no_credential_from_the_environment_reaches_the_compiled_yaml(tmp_path, monkeypatch):
    sentinels = {"AWS_ACCESS_KEY_ID": "AKIASENTINEL0001", "AWS_SECRET_ACCESS_KEY": "sentinel-secret-key-0002",
                 "MLFLOW_TRACKING_PASSWORD": "sentinel-password-0003", "HF_TOKEN": "hf_sentinel0004"}
    for name, value in sentinels.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "p.yaml"
    compile_pipeline(load_config([CONFIGS / "pretrained.yaml"], ["cluster.hf_secret=hf-token"]), out)
    text = out.read_text()
    assert not [name for name, value in sentinels.items() if value in text]
    assert "secretAsEnv" in text and "HF_TOKEN" in text


def test_the_default_config_argument_is_the_resolved_config(compiled):
    _, pipeline_doc, _ = compiled
    default = pipeline_doc["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert yaml.safe_load(default)["variant"] == "pretrained"
    assert load_config([CONFIGS / "pretrained.yaml"]).vae.maisi.md5 in default


def test_compile_command_writes_a_valid_package_and_names_the_kfp_version_it_needs(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli_main(["pipeline", "compile", "--config", str(CONFIGS / "main.yaml"),
                     "--set", "cluster.gpu_products=[Tesla-V100-SXM2-16GB]",
                     "--set", "cluster.trainer_image=registry.test/ctv2v/trainer:9.9.9", "-o", str(out)]) == 0
    validate_pipeline_yaml(out)
    assert "needs Kubeflow Pipelines >= 2.17.0" in capsys.readouterr().err
    docs = list(yaml.safe_load_all(out.read_text()))
    gpu = [cfg for cfg in _executors(docs[1]).values() if "nodeAffinity" in cfg]
    assert gpu and all(_affinity_products(cfg) == ["Tesla-V100-SXM2-16GB"] for cfg in gpu)
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.test/ctv2v/trainer:9.9.9", "ctv2v/cpu:0.1.0"}
