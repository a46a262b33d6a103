"""The ctv2v DAG: prepare-data, then the `pretrained` and/or `main` branch, then compare.

    prepare-data --+-- fetch-checkpoint -> match-architecture -> train(frozen) -> train(full) -> evaluate --+
                   |                                                                                      +-- compare
                   +-- train-vae ------------------------------> train(frozen) -> train(full) -> evaluate --+

Both branches read the one prepared data folder on the workspace volume (same manifest, same seed): every step
mounts the workspace PVC and works under <workspace_root>/runs/<run id>; large data (cache, checkpoints) stays
there, and only final models, reports and metrics travel as KFP artifacts.
The `branches` parameter picks `both`, `main` or `pretrained`; compare runs only with `both`.
All of it sits in a dsl.ExitHandler whose exit step, finish-run, runs after the rest whatever the outcome: it
uploads pending MLflow data from the run's workspace and ends the parent MLflow run FINISHED or FAILED.
With cluster.scratch_cleanup it also deletes the run's folder on the workspace volume.
Platform settings (V100 selection, resources, secrets) sit next to the tasks they configure. CPU steps run on the
cpu image, GPU steps on the trainer image, each pinned by digest when the config gives one; every pod records the
commit the pipeline was compiled from, runs without an Istio sidecar (a sidecar would outlive the step and keep
its pod running) and has CPU and memory requests and limits (profile ResourceQuotas refuse pods without them).
"""

from kfp import dsl, kubernetes

from components.compare import compare_op
from components.evaluate import evaluate_op
from components.fetch_checkpoint import fetch_checkpoint_op
from components.finish_run import finish_run_op
from components.match_architecture import match_architecture_op
from components.prepare_data import prepare_data_op
from components.train import train_op
from components.train_vae import train_vae_op
from ctv2v.config import ClusterConfig, RunConfig
from ctv2v.tracking.runs import git_commit

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
PART_OF_LABEL = "app.kubernetes.io/part-of"
COMMIT_ANNOTATION = "ctv2v.io/git-commit"
SIDECAR_ANNOTATION = "sidecar.istio.io/inject"
SAFE_TO_EVICT_ANNOTATION = "cluster-autoscaler.kubernetes.io/safe-to-evict"
"""Set to "false" on GPU pods: a scale-down would otherwise evict a training step hours into its work."""
LAUNCHER_CPU, LAUNCHER_MEMORY = "1", "2Gi"
"""A multi-node training step's own pod: it stages inputs, creates the TrainJob and streams its log."""
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
ENV_CONFIG_MAP_KEYS = {key: key for key in (
    "MLFLOW_TRACKING_URI", "S3_ENDPOINT", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")}


def config_argument(config: RunConfig) -> str:
    """The pipeline's `config` argument: the resolved config as one-line JSON (also valid YAML)."""
    return config.model_dump_json()


def step_image(cluster: ClusterConfig, kind: str) -> str:
    """The image of a `cpu` or `trainer` step (ClusterConfig.step_image; multi-node TrainJobs use the same)."""
    return cluster.step_image(kind)


def _common(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, kind: str, commit: str) -> dsl.PipelineTask:
    """Every step: its name, its kind's image, the pod label the NetworkPolicies select on, the commit, no Istio
    sidecar, pull secrets, settings from the ConfigMap, S3 credentials, the workspace volume."""
    task.set_display_name(name).set_container_image(step_image(cluster, kind))
    kubernetes.add_pod_label(task, PART_OF_LABEL, cluster.pod_label)
    kubernetes.add_pod_annotation(task, COMMIT_ANNOTATION, commit)
    kubernetes.add_pod_annotation(task, SIDECAR_ANNOTATION, "false")
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, cluster.image_pull_secrets)
    kubernetes.mount_pvc(task, pvc_name=cluster.workspace_pvc, mount_path=cluster.workspace_mount)
    kubernetes.use_config_map_as_env(task, cluster.env_config_map, ENV_CONFIG_MAP_KEYS)
    kubernetes.use_secret_as_env(task, cluster.s3_secret, S3_SECRET_KEYS)
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    return task


def _on_cpu(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, cpu: str, memory: str, commit: str,
            cache: bool = False) -> dsl.PipelineTask:
    """A step without a GPU, on the cpu image: its CPU and memory, each both request and limit."""
    _common(task, cluster, name, "cpu", commit)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    return task.set_caching_options(cache)


def _on_v100(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, gpus: int, retries: int, commit: str,
             cache: bool = False) -> dsl.PipelineTask:
    """A GPU step on the trainer image: nodes with one of the V100 products, the GPU toleration, CPU and memory
    scaled by its GPUs (request = limit, /dev/shm inside the memory), not evicted by the autoscaler, timeout,
    retries."""
    _common(task, cluster, name, "trainer", commit)
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(gpus)
    kubernetes.add_node_affinity(task, match_expressions=[
        {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(cluster.gpu_products)}])
    kubernetes.add_toleration(task, key=cluster.gpu_resource, operator="Exists", effect="NoSchedule")
    cpu, memory, shm = cluster.gpu_step_resources(gpus)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=shm)
    kubernetes.add_pod_annotation(task, SAFE_TO_EVICT_ANNOTATION, "false")
    _timeout_and_retries(task, cluster, retries)
    return task.set_caching_options(cache)


def _timeout_and_retries(task: dsl.PipelineTask, cluster: ClusterConfig, retries: int) -> None:
    kubernetes.set_timeout(task, cluster.step_timeout_s)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")


def _training(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, gpus: int, retries: int,
              commit: str) -> dsl.PipelineTask:
    """A training step. On one node it trains in its own V100 pod. With cluster.nodes > 1 its pod only launches
    and follows the TrainJob whose nodes hold the GPUs (ctv2v.steps.trainjob): a small CPU pod on the cpu image,
    with the step's timeout and retries (a retry replaces its own stale TrainJob)."""
    if cluster.nodes == 1:
        return _on_v100(task, cluster, name, gpus, retries, commit)
    _on_cpu(task, cluster, name, LAUNCHER_CPU, LAUNCHER_MEMORY, commit)
    _timeout_and_retries(task, cluster, retries)
    return task


def build_pipeline(config: RunConfig, commit: str | None = None):
    """The pipeline function for `config`: its cluster section is compiled in, its config the default argument;
    `commit` (default: this code's git commit) is recorded in the description and on every pod."""
    cluster = config.cluster
    commit = commit or git_commit()
    gpus, retries = cluster.gpus_per_step, cluster.train_retries

    def branch(config_json, variant: str, run_id, workspace_root, data) -> dsl.PipelineTask:
        """One variant's chain after prepare-data; returns its evaluate task."""
        workspace = {"workspace_root": workspace_root, "pipeline_run_id": run_id}
        if variant == "pretrained":
            fetch = _on_cpu(fetch_checkpoint_op(config_json=config_json),
                            cluster, "fetch-checkpoint", "1", "2Gi", commit, cache=True)
            if cluster.hf_secret:
                kubernetes.use_secret_as_env(fetch, cluster.hf_secret, {"HF_TOKEN": "HF_TOKEN"})
            vae = _on_v100(match_architecture_op(config_json=config_json, pipeline_run_id=run_id, data=data,
                                                 checkpoint=fetch.outputs["checkpoint"]),
                           cluster, "match-architecture", 1, 0, commit, cache=True)
        else:
            # `gpus` is a constant of the compiled pipeline, beside the pod's GPU limit: never read at run time.
            vae = _training(train_vae_op(config_json=config_json, data=data, gpus=gpus, **workspace),
                            cluster, "train-vae", gpus, retries, commit)
        frozen = _training(train_op(config_json=config_json, variant=variant, phase="frozen", data=data,
                                    vae=vae.outputs["vae"], gpus=gpus, **workspace),
                           cluster, f"train-frozen-{variant}", gpus, retries, commit)
        full = _training(train_op(config_json=config_json, variant=variant, phase="full", data=data,
                                  vae=vae.outputs["vae"], init=frozen.outputs["model"], gpus=gpus, **workspace),
                         cluster, f"train-full-{variant}", gpus, retries, commit)
        return _on_v100(evaluate_op(config_json=config_json, variant=variant, pipeline_run_id=run_id, data=data,
                                    model=full.outputs["model"]),
                        cluster, f"evaluate-{variant}", 1, 0, commit)

    @dsl.pipeline(
        name="ctv2v",
        description="CT slice interpolation: latent video-to-video diffusion, scratch VAE (main) vs MAISI "
                    f"(pretrained). Compiled from commit {commit}.",
        # KFP deletes the finished run's workflow and pods after this TTL (the workspace folder is the exit
        # handler's to clean); None keeps them.
        pipeline_config=dsl.PipelineConfig(ttl_seconds_after_finished=cluster.run_ttl_s),
    )
    # One-line JSON: the compiler copies defaults into a YAML comment header line by line.
    def ctv2v_pipeline(config: str = config_argument(config), branches: str = "both",
                       workspace_root: str = cluster.workspace_mount):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        # Runs when everything inside the handler has ended, whatever the outcome: pending MLflow data is
        # uploaded, the pipeline's parent MLflow run ends FINISHED or FAILED, and the run's workspace folder is
        # removed as cluster.scratch_cleanup says (ctv2v.steps.finish_run).
        finish = _on_cpu(finish_run_op(config_json=config, workspace_root=workspace_root, pipeline_run_id=run_id,
                                       scratch_cleanup=cluster.scratch_cleanup),
                         cluster, "finish-run", "1", "1Gi", commit)
        with dsl.ExitHandler(finish, name="ctv2v-run"):
            prepared = _on_cpu(prepare_data_op(config_json=config, workspace_root=workspace_root,
                                               pipeline_run_id=run_id),
                               cluster, "prepare-data", "2", "8Gi", commit)
            data = prepared.outputs["manifest"]
            with dsl.If(branches == "both", name="both-branches"):
                main_eval = branch(config, "main", run_id, workspace_root, data)
                pretrained_eval = branch(config, "pretrained", run_id, workspace_root, data)
                _on_cpu(compare_op(config_json=config, pipeline_run_id=run_id,
                                   main_report=main_eval.outputs["report"],
                                   pretrained_report=pretrained_eval.outputs["report"]),
                        cluster, "compare", "1", "2Gi", commit)
            with dsl.Elif(branches == "main", name="main-branch"):
                branch(config, "main", run_id, workspace_root, data)
            with dsl.Elif(branches == "pretrained", name="pretrained-branch"):
                branch(config, "pretrained", run_id, workspace_root, data)

    return ctv2v_pipeline
