"""The compiled DAG: strict protobuf validation and checks of what the cluster reads from the compiled YAML: images
per kind of step (and digests), V100 node affinity, resources and limits on every step, the GPU count as a
compile-time constant, the commit, the TTL, the exit handler's cleanup option, the KFP version it needs, only
fields the target backend applies, the branches chosen at compile time, cacheable steps keyed on what decides their
output, and the typed run parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import json
import re

from kubernetes.utils import parse_quantity
from packaging.version import Version

from ctv2v.config import V100_16GB_PRODUCTS, V100_32GB_PRODUCTS, ClusterConfig, ConfigError
from ctv2v.config_io import load_config
from ctv2v.provenance import git_commit
from ctv2v.steps.pipeline_inputs import (
    MATCH_KEYS,
    RUN_PARAMETERS,
    cache_key_config,
    resolve_run_config,
    run_parameter_defaults,
)
from pipeline.cli import main as cli_main
from pipeline.backend import KFP_BACKENDS, backend_requirements, required_backend_version
from pipeline.compile import ImagesLockError, PipelineSpecError, compile_pipeline, validate_pipeline_yaml
from pipeline.dag import config_argument

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BACKEND_FIELDS = json.loads((Path(__file__).parents[1] / "schemas" / "kfp-backend-fields.json").read_text())["releases"]
"""Per KFP release: the KubernetesExecutorConfig fields its backend applies, and whether it applies a run TTL."""
CPU_STEPS = ("resolve-config-op", "prepare-data-op", "fetch-checkpoint-op", "compare-op", "finish-run-op")
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
    assert set(pipeline_spec.root.input_definitions.parameters) == {"config", "workspace_root", *RUN_PARAMETERS}
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


def test_the_compiled_pipeline_records_its_commit(compiled):
    _, pipeline_doc, platform_doc = compiled
    commit = git_commit()
    assert commit in pipeline_doc["pipelineInfo"]["description"]
    for label, cfg in _executors(platform_doc).items():
        assert cfg["podMetadata"]["annotations"]["ctv2v.io/git-commit"] == commit, label


def _applied_fields(target: str) -> set[str]:
    """The camelCase keys of the Kubernetes executor fields KFP `target`'s backend applies."""
    return {re.sub(r"_([a-z])", lambda m: m[1].upper(), name)
            for name in BACKEND_FIELDS[str(KFP_BACKENDS[target])]["applied_executor_fields"]}


@pytest.mark.parametrize("target", sorted(KFP_BACKENDS))
def test_each_backend_target_gets_only_the_fields_its_backend_applies(target, tmp_path, caplog):
    config = load_config([CONFIGS / "pretrained.yaml"], [f"cluster.kfp_backend='{target}'"])
    out = compile_pipeline(config, tmp_path / "p.yaml")
    validate_pipeline_yaml(out)
    pipeline_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    release = BACKEND_FIELDS[str(KFP_BACKENDS[target])]
    applied = _applied_fields(target)
    gpu_configs = []
    for label, cfg in _executors(platform_doc).items():
        assert set(cfg) <= applied, f"{label}: {sorted(set(cfg) - applied)} would be ignored by KFP {target}"
        if "tolerations" in cfg:
            gpu_configs.append(cfg)
    assert gpu_configs
    products = list(V100_32GB_PRODUCTS)
    for cfg in gpu_configs:
        if "nodeAffinity" in applied:
            assert _affinity_products(cfg) == products and "nodeSelector" not in cfg
        else:
            # One product by nodeSelector (the fallback), said once at compile.
            assert cfg["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": products[0]}}
    ttl = platform_doc["platforms"]["kubernetes"].get("pipelineConfig")
    assert ttl == ({"resourceTtlOnCompletion": ClusterConfig().run_ttl_s} if release["applies_run_ttl"] else None)
    notes = [r.getMessage() for r in caplog.records if r.name == "pipeline.compile"]
    assert any("no run TTL" in note for note in notes) == (not release["applies_run_ttl"])
    assert any("no node affinity" in note and products[1] in note for note in notes) == ("nodeAffinity" not in applied)
    assert required_backend_version(config.cluster) <= KFP_BACKENDS[target]
    assert f"KFP {target}" in pipeline_doc["pipelineInfo"]["description"]


def test_the_default_target_runs_on_the_current_and_the_previous_kubeflow_release():
    """Kubeflow 26.03 ships KFP 2.16.0, Kubeflow 1.11 KFP 2.15.0 (pipeline.backend.KFP_BACKENDS)."""
    default = ClusterConfig()
    assert default.kfp_backend == "2.15"
    assert required_backend_version(default) <= Version("2.15.0")
    assert required_backend_version(default) <= Version("2.16.0")


def test_the_exit_handler_gets_the_scratch_cleanup_policy(compiled):
    _, pipeline_doc, _ = compiled
    [finish] = [t for name, t in _all_tasks(pipeline_doc).items() if name.startswith("finish-run-op")]
    assert finish["inputs"]["parameters"]["scratch_cleanup"]["runtimeValue"]["constant"] == "on_success"
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED", "an exit handler runs always"


def test_the_backend_version_follows_the_features_compiled():
    assert required_backend_version(ClusterConfig(kfp_backend="2.17")) == Version("2.17.0")
    assert required_backend_version(ClusterConfig(kfp_backend="2.17", run_ttl_s=None)) == Version("2.14.0")
    default = backend_requirements(ClusterConfig())
    assert max(default, key=default.get).startswith("node affinity")
    assert required_backend_version(ClusterConfig(kfp_backend="2.5")) == Version("2.5.0")


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
    assert len(train) == 5  # frozen + full of each variant, and train-vae
    for task in train:
        assert task["retryPolicy"]["maxRetryCount"] == 2
        assert task["retryPolicy"]["backoffDuration"] == "60s"
        assert not task["cachingOptions"].get("enableCache", False)
    for name, task in tasks.items():
        if name.startswith(("evaluate-op", "compare-op", "prepare-data-op", "resolve-config-op")):
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
    assert "compiled for KFP 2.15 (cluster.kfp_backend); needs Kubeflow Pipelines >= 2.14.0" in capsys.readouterr().err
    docs = list(yaml.safe_load_all(out.read_text()))
    gpu = [cfg for cfg in _executors(docs[1]).values() if "nodeAffinity" in cfg]
    assert gpu and all(_affinity_products(cfg) == ["Tesla-V100-SXM2-16GB"] for cfg in gpu)
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.test/ctv2v/trainer:9.9.9", "ctv2v/cpu:0.1.0"}


@pytest.mark.parametrize("variants, evaluates, absent", [
    ("both", 2, set()),
    ("main", 1, {"fetch-checkpoint-op", "match-architecture-op", "compare-op"}),
    ("pretrained", 1, {"train-vae-op", "compare-op"}),
])
def test_the_package_holds_only_the_branches_chosen_at_compile_time_and_no_condition(variants, evaluates, absent,
                                                                                    tmp_path):
    out = compile_pipeline(load_config([CONFIGS / "pretrained.yaml"]), tmp_path / "p.yaml", variants=variants)
    pipeline_doc, _ = list(yaml.safe_load_all(out.read_text()))
    tasks = _all_tasks(pipeline_doc)
    components = {_component_of(name) for name in tasks}
    assert not absent & components
    assert len([name for name in tasks if name.startswith("evaluate-op")]) == evaluates
    assert len([name for name in tasks if name.startswith("train-op")]) == 2 * evaluates
    assert ("compare-op" in components) == (variants == "both")
    # No dsl.If/Elif: KFP does not propagate the final status through conditions to the exit handler (#11979).
    assert not [name for name, task in tasks.items() if "condition" in task.get("triggerPolicy", {})]
    assert not [name for name in pipeline_doc["components"] if name.startswith("comp-condition")]
    scratch = {"vae_epochs", "vae_lr"}
    parameters = set(pipeline_doc["root"]["inputDefinitions"]["parameters"])
    assert (scratch <= parameters) == (variants != "pretrained"), "scratch VAE parameters only with its branch"


def _parameter_sources(task: dict) -> list[dict]:
    return list(task.get("inputs", {}).get("parameters", {}).values())


def test_cacheable_steps_take_no_run_id_and_no_whole_config(compiled):
    _, pipeline_doc, platform_doc = compiled
    tasks = _all_tasks(pipeline_doc)
    cached = {name: task for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert {_component_of(name) for name in cached} == {"fetch-checkpoint-op", "match-architecture-op"}
    for name, task in cached.items():
        for source in _parameter_sources(task):
            constant = source.get("runtimeValue", {}).get("constant")
            assert not (isinstance(constant, str) and "{{$.pipeline_job" in constant), f"{name}: the run id"
            assert source.get("componentInputParameter") not in ("config", "pipelinechannel--config"), name
            assert source.get("taskOutputParameter", {}).get("outputParameterKey") != "config", name
        assert not task.get("inputs", {}).get("artifacts", {}).get("data"), f"{name}: prepare-data's fresh artifact"
    # The run id reaches match-architecture from its pod's label, outside the cache key.
    [match_cfg] = [cfg for label, cfg in _executors(platform_doc).items() if label.startswith("exec-match")]
    assert match_cfg["fieldPathAsEnv"] == [{"name": "CTV2V_PIPELINE_RUN_ID",
                                            "fieldPath": "metadata.labels['pipeline/runid']"}]


def test_the_match_key_ignores_training_lengths_but_not_what_the_vae_sees():
    config = load_config([CONFIGS / "pretrained.yaml"])
    key = cache_key_config(config, MATCH_KEYS)
    text, compiled = config_argument(config), run_parameter_defaults(config, with_scratch_vae=True)
    other_run = resolve_run_config(text, compiled, {"frozen_epochs": 9, "full_lr": 1e-6, "sample_steps": 2,
                                                    "vae_epochs": 1, "data_source": "demo"})
    assert cache_key_config(other_run, MATCH_KEYS) == key
    assert "pipeline_run_id" not in key and '"training":{"latent_cache":false,"precision"' in key
    thicker = resolve_run_config(text, compiled, {"thick_factor": 3})
    assert cache_key_config(thicker, MATCH_KEYS) != key


def test_run_parameters_override_the_config_through_its_schema():
    config = load_config([CONFIGS / "main.yaml"])
    text, compiled = config_argument(config), run_parameter_defaults(config, with_scratch_vae=True)
    resolved = resolve_run_config(text, compiled, {**compiled, "frozen_epochs": 2, "data_source": "s3://b/ct"})
    assert resolved.training.frozen.epochs == 2 and resolved.data.source == "s3://b/ct"
    assert resolved.training.full.epochs == config.training.full.epochs
    # A key edited in the config text, its parameter left alone: the config's value stands.
    evaluation = '"evaluation":{"hu_min":-1000.0,"hu_max":1000.0,"sample_steps":'
    edited = text.replace(f'{evaluation}null,', f'{evaluation}7,')
    assert edited != text
    assert resolve_run_config(edited, compiled, compiled).evaluation.sample_steps == 7
    with pytest.raises(ConfigError, match="data.thick.factor"):
        resolve_run_config(text, compiled, {"thick_factor": 1})  # ge=2
    with pytest.raises(ConfigError, match="frozen_epochs=3 and the config's training.frozen.epochs=4"):
        resolve_run_config(text.replace('"frozen":{"epochs":5', '"frozen":{"epochs":4', 1), compiled,
                           {"frozen_epochs": 3})


def test_the_sample_steps_parameter_holds_the_steps_in_effect_and_sets_evaluation_alone():
    """evaluation.sample_steps is null in the shipped configs (diffusion.sample_steps is used): the typed parameter
    shows the steps evaluation uses; changed, it overrides evaluation.sample_steps and leaves the model's key alone."""
    config = load_config([CONFIGS / "main.yaml"])
    text, compiled = config_argument(config), run_parameter_defaults(config, with_scratch_vae=True)
    assert compiled["sample_steps"] == config.diffusion.sample_steps == 4
    resolved = resolve_run_config(text, compiled, {**compiled, "sample_steps": 8})
    assert (resolved.evaluation.sample_steps, resolved.evaluation_sample_steps, resolved.diffusion.sample_steps) == (8, 8, 4)
    assert resolve_run_config(text, compiled, compiled).evaluation.sample_steps is None
    one_step = load_config([CONFIGS / "main.yaml", CONFIGS / "cpu-quality.yaml"])
    text, compiled = config_argument(one_step), run_parameter_defaults(one_step, with_scratch_vae=True)
    assert compiled["sample_steps"] == 1
    with pytest.raises(ConfigError, match=r"evaluation.sample_steps=4 differs from diffusion.sample_steps=1"):
        resolve_run_config(text, compiled, {**compiled, "sample_steps": 4})


@pytest.mark.parametrize("configs", [["main.yaml", "smoke.yaml"], ["pretrained.yaml", "smoke.yaml"],
                                     ["main.yaml", "cpu-quality.yaml"], ["pretrained.yaml"]])
def test_the_cached_steps_config_subsets_of_every_shipped_config_are_valid_configs(configs):
    """A cacheable step rebuilds its config from the keys it is cached on: the subset must pass the same schema
    (main.yaml's design needs training.latent_cache beside v2v, or match-architecture fails at its first line)."""
    from ctv2v.config_io import config_from_text
    from ctv2v.steps.pipeline_inputs import FETCH_KEYS

    config = load_config([CONFIGS / name for name in configs], [])
    for keys in (FETCH_KEYS, MATCH_KEYS):
        config_from_text(cache_key_config(config, keys), "subset", ["variant=pretrained"])


def test_every_tracked_step_and_finish_run_work_in_the_same_run_workspace_folder(compiled):
    """The steps whose outputs are only artifacts get the workspace root and the run id like the training steps: their
    MLflow journals land under <workspace_root>/runs/<run id>, the folder finish-run uploads journals from."""
    _, pipeline_doc, _ = compiled
    tasks = _all_tasks(pipeline_doc)
    tracked = {name: task for name, task in tasks.items()
               if _component_of(name) in ("evaluate-op", "compare-op", "match-architecture-op", "train-op",
                                          "train-vae-op", "finish-run-op")}
    assert {_component_of(name) for name in tracked} == {"evaluate-op", "compare-op", "match-architecture-op",
                                                         "train-op", "train-vae-op", "finish-run-op"}
    for name, task in tracked.items():
        parameters = task["inputs"]["parameters"]
        assert parameters["workspace_root"]["componentInputParameter"] in (
            "workspace_root", "pipelinechannel--workspace_root"), name
        if _component_of(name) != "match-architecture-op":  # cached: its run id comes from the pod label
            assert parameters["pipeline_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}", name
