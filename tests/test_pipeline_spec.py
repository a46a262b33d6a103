"""The compiled DAG: strict protobuf validation and golden checks of the V100 platform settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctv2v.config_io import load_config
from pipeline.cli import main as cli_main
from pipeline.compile import PipelineSpecError, compile_pipeline, validate_pipeline_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_EXECUTORS = ("train-vae-op", "train-op", "train-op-2", "train-op-3", "train-op-4")


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


def test_gpu_steps_are_scheduled_on_v100_nodes(compiled):
    _, pipeline_doc, platform_doc = compiled
    gpu_steps = [step for prefix in ("train", "match-architecture", "evaluate")
                 for step in _executor_for(pipeline_doc, platform_doc, prefix)]
    assert len(gpu_steps) >= 8
    for label, container, cfg in gpu_steps:
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu", label
        assert container["resources"]["accelerator"]["resourceCount"] == "1", label
        assert cfg["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "Tesla-V100-SXM2-32GB"}, label
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in cfg["tolerations"], label
        assert container["resources"]["resourceMemoryRequest"] == "48Gi", label
        assert {"medium": "Memory", "sizeLimit": "16Gi"}.items() <= cfg["emptyDirMounts"][0].items(), label
        assert cfg["emptyDirMounts"][0]["mountPath"] == "/dev/shm", label
        assert cfg["activeDeadlineSeconds"] == "172800" or cfg["activeDeadlineSeconds"] == 172800, label


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


def test_compile_command_writes_a_valid_package(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli_main(["pipeline", "compile", "--config", str(CONFIGS / "main.yaml"),
                     "--set", "cluster.gpu_product=Tesla-V100-SXM2-16GB",
                     "--set", "cluster.trainer_image=registry.test/ctv2v/trainer:9.9.9", "-o", str(out)]) == 0
    validate_pipeline_yaml(out)
    assert "Tesla-V100-SXM2-16GB" in out.read_text()
    docs = list(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.test/ctv2v/trainer:9.9.9"}
