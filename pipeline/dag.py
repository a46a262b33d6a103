"""The ctv2v DAG: prepare-data, then the `pretrained` and/or `main` branch, then compare.

    prepare-data --+-- fetch-checkpoint -> match-architecture -> train(frozen) -> train(full) -> evaluate --+
                   |                                                                                      +-- compare
                   +-- train-vae ------------------------------> train(frozen) -> train(full) -> evaluate --+

Both branches read the one prepared data folder on the workspace volume (same manifest, same seed): every step
mounts the workspace PVC and works under <workspace_root>/runs/<run id>; large data (cache, checkpoints) stays
there, and only final models, reports and metrics travel as KFP artifacts.
The `branches` parameter picks `both`, `main` or `pretrained`; compare runs only with `both`.
Platform settings (V100 selection, resources, secrets) sit next to the tasks they configure.
"""

from kfp import dsl, kubernetes

from components.compare import compare_op
from components.evaluate import evaluate_op
from components.fetch_checkpoint import fetch_checkpoint_op
from components.match_architecture import match_architecture_op
from components.prepare_data import prepare_data_op
from components.train import train_op
from components.train_vae import train_vae_op
from ctv2v.config import ClusterConfig, RunConfig

STEP_OPS = [prepare_data_op, fetch_checkpoint_op, match_architecture_op, train_vae_op, train_op, evaluate_op,
            compare_op]
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
PART_OF_LABEL = "app.kubernetes.io/part-of"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
ENV_CONFIG_MAP_KEYS = {key: key for key in (
    "MLFLOW_TRACKING_URI", "S3_ENDPOINT", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")}


def _common(task: dsl.PipelineTask, cluster: ClusterConfig) -> dsl.PipelineTask:
    """Every step: the pod label the NetworkPolicies select on, settings from the ConfigMap, S3 credentials."""
    kubernetes.add_pod_label(task, PART_OF_LABEL, cluster.pod_label)
    kubernetes.mount_pvc(task, pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)
    kubernetes.use_config_map_as_env(task, cluster.env_config_map, ENV_CONFIG_MAP_KEYS)
    kubernetes.use_secret_as_env(task, cluster.s3_secret, S3_SECRET_KEYS)
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    return task


def _on_cpu(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    """A step without a GPU: its CPU and memory requests."""
    return task.set_cpu_request(cpu).set_memory_request(memory)


def _on_v100(task: dsl.PipelineTask, cluster: ClusterConfig, gpus: int, retries: int) -> dsl.PipelineTask:
    """A GPU step: V100 node selection and toleration, resources, memory-backed /dev/shm, timeout, retries."""
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, GPU_PRODUCT_LABEL, cluster.gpu_product)
    kubernetes.add_toleration(task, key=cluster.gpu_resource, operator="Exists", effect="NoSchedule")
    task.set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)
    task.set_memory_limit(cluster.memory_limit)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=cluster.shm_size)
    kubernetes.set_timeout(task, cluster.step_timeout_s)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    task.set_caching_options(False)
    return task


def build_pipeline(config: RunConfig):
    """The pipeline function for `config`: its cluster section is compiled in, its text is the default argument."""
    cluster = config.cluster
    for op in STEP_OPS:
        op.component_spec.implementation.container.image = cluster.trainer_image

    def branch(config_yaml, variant: str, pipeline_run_id, workspace_root, prepared) -> dsl.PipelineTask:
        """One variant's chain after prepare-data; returns its evaluate task."""
        data = prepared.outputs["manifest"]
        workspace = {"workspace_root": workspace_root, "pipeline_run_id": pipeline_run_id}
        if variant == "pretrained":
            fetch = _on_cpu(_common(fetch_checkpoint_op(config_yaml=config_yaml), cluster), "1", "2Gi")
            fetch.set_display_name("fetch-checkpoint").set_caching_options(True)
            if cluster.hf_secret:
                kubernetes.use_secret_as_env(fetch, cluster.hf_secret, {"HF_TOKEN": "HF_TOKEN"})
            vae_task = match_architecture_op(config_yaml=config_yaml, pipeline_run_id=pipeline_run_id,
                                             checkpoint=fetch.outputs["checkpoint"], data=data)
            _on_v100(vae_task, cluster, gpus=1, retries=0).set_caching_options(True)
            vae_task.set_display_name("match-architecture")
        else:
            vae_task = train_vae_op(config_yaml=config_yaml, data=data, **workspace)
            _on_v100(vae_task, cluster, gpus=cluster.gpus_per_step, retries=cluster.train_retries)
            vae_task.set_display_name("train-vae")
        _common(vae_task, cluster)
        vae = vae_task.outputs["vae"]
        frozen = train_op(config_yaml=config_yaml, variant=variant, phase="frozen", data=data, vae=vae, **workspace)
        _common(_on_v100(frozen, cluster, cluster.gpus_per_step, cluster.train_retries), cluster)
        frozen.set_display_name(f"train-frozen-{variant}")
        full = train_op(config_yaml=config_yaml, variant=variant, phase="full", data=data, vae=vae,
                        init=frozen.outputs["model"], **workspace)
        _common(_on_v100(full, cluster, cluster.gpus_per_step, cluster.train_retries), cluster)
        full.set_display_name(f"train-full-{variant}")
        evaluate = evaluate_op(config_yaml=config_yaml, variant=variant, pipeline_run_id=pipeline_run_id,
                               data=data, model=full.outputs["model"])
        _common(_on_v100(evaluate, cluster, gpus=1, retries=0), cluster)
        evaluate.set_display_name(f"evaluate-{variant}")
        return evaluate

    @dsl.pipeline(
        name="ctv2v",
        description="CT slice interpolation: latent video-to-video diffusion, scratch VAE (main) vs MAISI (pretrained)",
    )
    # One-line JSON (valid YAML): the compiler copies defaults into a YAML comment header line by line.
    def ctv2v_pipeline(config: str = config.model_dump_json(), branches: str = "both",
                       workspace_root: str = cluster.workspace_mount):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        prepared = _common(prepare_data_op(config_yaml=config, workspace_root=workspace_root,
                                           pipeline_run_id=run_id), cluster)
        _on_cpu(prepared, "2", "8Gi").set_display_name("prepare-data").set_caching_options(False)
        with dsl.If(branches == "both", name="both-branches"):
            main_eval = branch(config, "main", run_id, workspace_root, prepared)
            pretrained_eval = branch(config, "pretrained", run_id, workspace_root, prepared)
            compare = compare_op(config_yaml=config, pipeline_run_id=run_id,
                                 main_report=main_eval.outputs["report"],
                                 pretrained_report=pretrained_eval.outputs["report"])
            _on_cpu(_common(compare, cluster), "1", "2Gi").set_display_name("compare").set_caching_options(False)
        with dsl.Elif(branches == "main", name="main-branch"):
            branch(config, "main", run_id, workspace_root, prepared)
        with dsl.Elif(branches == "pretrained", name="pretrained-branch"):
            branch(config, "pretrained", run_id, workspace_root, prepared)

    return ctv2v_pipeline
