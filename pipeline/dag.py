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

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
PART_OF_LABEL = "app.kubernetes.io/part-of"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
ENV_CONFIG_MAP_KEYS = {key: key for key in (
    "MLFLOW_TRACKING_URI", "S3_ENDPOINT", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")}


def config_argument(config: RunConfig) -> str:
    """The pipeline's `config` argument: the resolved config as one-line JSON (also valid YAML)."""
    return config.model_dump_json()


def _common(task: dsl.PipelineTask, cluster: ClusterConfig, name: str) -> dsl.PipelineTask:
    """Every step: its name, the run's image, the pod label the NetworkPolicies select on, settings from the
    ConfigMap, S3 credentials, the workspace volume."""
    task.set_display_name(name).set_container_image(cluster.trainer_image)
    kubernetes.add_pod_label(task, PART_OF_LABEL, cluster.pod_label)
    kubernetes.mount_pvc(task, pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)
    kubernetes.use_config_map_as_env(task, cluster.env_config_map, ENV_CONFIG_MAP_KEYS)
    kubernetes.use_secret_as_env(task, cluster.s3_secret, S3_SECRET_KEYS)
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    return task


def _on_cpu(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, cpu: str, memory: str,
            cache: bool = False) -> dsl.PipelineTask:
    """A step without a GPU: its CPU and memory requests."""
    _common(task, cluster, name).set_cpu_request(cpu).set_memory_request(memory)
    return task.set_caching_options(cache)


def _on_v100(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, gpus: int, retries: int,
             cache: bool = False) -> dsl.PipelineTask:
    """A GPU step: V100 node selection and toleration, resources, memory-backed /dev/shm, timeout, retries."""
    _common(task, cluster, name)
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
    return task.set_caching_options(cache)


def build_pipeline(config: RunConfig):
    """The pipeline function for `config`: its cluster section is compiled in, its config the default argument."""
    cluster = config.cluster
    gpus, retries = cluster.gpus_per_step, cluster.train_retries

    def branch(config_json, variant: str, run_id, workspace_root, data) -> dsl.PipelineTask:
        """One variant's chain after prepare-data; returns its evaluate task."""
        workspace = {"workspace_root": workspace_root, "pipeline_run_id": run_id}
        if variant == "pretrained":
            fetch = _on_cpu(fetch_checkpoint_op(config_json=config_json),
                            cluster, "fetch-checkpoint", "1", "2Gi", cache=True)
            if cluster.hf_secret:
                kubernetes.use_secret_as_env(fetch, cluster.hf_secret, {"HF_TOKEN": "HF_TOKEN"})
            vae = _on_v100(match_architecture_op(config_json=config_json, pipeline_run_id=run_id, data=data,
                                                 checkpoint=fetch.outputs["checkpoint"]),
                           cluster, "match-architecture", gpus=1, retries=0, cache=True)
        else:
            vae = _on_v100(train_vae_op(config_json=config_json, data=data, **workspace),
                           cluster, "train-vae", gpus, retries)
        frozen = _on_v100(train_op(config_json=config_json, variant=variant, phase="frozen", data=data,
                                   vae=vae.outputs["vae"], **workspace),
                          cluster, f"train-frozen-{variant}", gpus, retries)
        full = _on_v100(train_op(config_json=config_json, variant=variant, phase="full", data=data,
                                 vae=vae.outputs["vae"], init=frozen.outputs["model"], **workspace),
                        cluster, f"train-full-{variant}", gpus, retries)
        return _on_v100(evaluate_op(config_json=config_json, variant=variant, pipeline_run_id=run_id, data=data,
                                    model=full.outputs["model"]),
                        cluster, f"evaluate-{variant}", gpus=1, retries=0)

    @dsl.pipeline(
        name="ctv2v",
        description="CT slice interpolation: latent video-to-video diffusion, scratch VAE (main) vs MAISI (pretrained)",
    )
    # One-line JSON: the compiler copies defaults into a YAML comment header line by line.
    def ctv2v_pipeline(config: str = config_argument(config), branches: str = "both",
                       workspace_root: str = cluster.workspace_mount):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        prepared = _on_cpu(prepare_data_op(config_json=config, workspace_root=workspace_root, pipeline_run_id=run_id),
                           cluster, "prepare-data", "2", "8Gi")
        data = prepared.outputs["manifest"]
        with dsl.If(branches == "both", name="both-branches"):
            main_eval = branch(config, "main", run_id, workspace_root, data)
            pretrained_eval = branch(config, "pretrained", run_id, workspace_root, data)
            _on_cpu(compare_op(config_json=config, pipeline_run_id=run_id, main_report=main_eval.outputs["report"],
                               pretrained_report=pretrained_eval.outputs["report"]),
                    cluster, "compare", "1", "2Gi")
        with dsl.Elif(branches == "main", name="main-branch"):
            branch(config, "main", run_id, workspace_root, data)
        with dsl.Elif(branches == "pretrained", name="pretrained-branch"):
            branch(config, "pretrained", run_id, workspace_root, data)

    return ctv2v_pipeline
