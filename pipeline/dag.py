"""The ctv2v DAG: resolve-config and prepare-data, then the `pretrained` and/or `main` branch, then compare.

                    +-- fetch-checkpoint -+
    resolve-config -+                     +-> match-architecture -> train(frozen) -> train(full) -> evaluate --+
                    +-- prepare-data -----+                                                                  +-- compare
                                          +-> train-vae ----------> train(frozen) -> train(full) -> evaluate --+

The branches are chosen when the pipeline is compiled (`variants`: both, main or pretrained): the package holds
only those, and compare only with both. No dsl.If/Elif sits inside the exit handler, whose final status KFP does
not propagate through conditions (kubeflow/pipelines#11979): finish-run sees the status of the tasks that ran.
Both branches read the one prepared data folder on the workspace volume (same manifest, same seed): every step
mounts the workspace PVC and works under <workspace_root>/runs/<run id>; large data (cache, checkpoints) stays
there, and only final models, reports and metrics travel as KFP artifacts. The steps whose outputs are only
artifacts (match-architecture, evaluate, compare) work there too and export into their artifacts, so their MLflow
journals sit where finish-run uploads them from (ctv2v.steps.context.export_files says why).
The `config` parameter is the resolved config; the values users change per run are typed parameters beside it
(ctv2v.steps.pipeline_inputs.RUN_PARAMETERS), applied by resolve-config through the same strict schema. The
cacheable steps (fetch-checkpoint, match-architecture) get only what decides their output: a second run with the
same checkpoint, data and VAE settings reuses them.
All of it sits in a dsl.ExitHandler whose exit step, finish-run, runs after the rest whatever the outcome: it
uploads pending MLflow data from the run's workspace and ends the parent MLflow run FINISHED or FAILED.
With cluster.scratch_cleanup it also deletes the run's folder on the workspace volume.
Platform settings (V100 selection, resources, secrets) sit next to the tasks they configure, each compiled only
where cluster.kfp_backend applies it (pipeline.backend.backend_plan). CPU steps run on the cpu image, GPU steps
on the trainer image, each pinned by digest when the config gives one; every pod records the commit the pipeline
was compiled from, runs without an Istio sidecar (a sidecar would outlive the step and keep its pod running) and
has CPU and memory requests and limits (profile ResourceQuotas refuse pods without them).
Verified only on a cluster: that finish-run receives SUCCEEDED for a good run without conditions in the handler,
that the pod label pipeline/runid reaches match-architecture, and that the KFP cache server reuses the two
cacheable steps (kfp.local's cache, and the compiled inputs, are checked here).
"""

import inspect
import json
from dataclasses import dataclass

from kfp import dsl, kubernetes

from components.compare import compare_op
from components.evaluate import evaluate_op
from components.fetch_checkpoint import fetch_checkpoint_op
from components.finish_run import finish_run_op
from components.match_architecture import match_architecture_op
from components.prepare_data import prepare_data_op
from components.resolve_config import resolve_config_op
from components.train import train_op
from components.train_vae import train_vae_op
from ctv2v.config import ClusterConfig, RunConfig
from ctv2v.provenance import git_commit
from ctv2v.steps.pipeline_inputs import RUN_ID_ENV, RUN_PARAMETERS, run_parameter_defaults
from pipeline.backend import BackendPlan, backend_plan

BRANCH_VARIANTS: dict[str, tuple[str, ...]] = {"both": ("main", "pretrained"), "main": ("main",),
                                               "pretrained": ("pretrained",)}
"""`variants` of build_pipeline -> the branches the package holds."""
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
RUN_ID_FIELD_PATH = "metadata.labels['pipeline/runid']"
"""The run id on every pod of a KFP run (set by the API server): how a cached step learns it outside its inputs."""
PART_OF_LABEL = "app.kubernetes.io/part-of"
COMMIT_ANNOTATION = "ctv2v.io/git-commit"
SIDECAR_ANNOTATION = "sidecar.istio.io/inject"
SAFE_TO_EVICT_ANNOTATION = "cluster-autoscaler.kubernetes.io/safe-to-evict"
"""Set to "false" on GPU pods: a scale-down would otherwise evict a training step hours into its work."""
LAUNCHER_CPU, LAUNCHER_MEMORY = "1", "2Gi"
"""A multi-node training step's own pod: it stages inputs, creates the TrainJob and streams its log."""


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
    kubernetes.use_config_map_as_env(task, cluster.env_config_map, {key: key for key in cluster.ENV_CONFIG_MAP_KEYS})
    for secret, keys in cluster.step_secrets().items():
        kubernetes.use_secret_as_env(task, secret, {key: key for key in keys})
    return task


def _on_cpu(task: dsl.PipelineTask, cluster: ClusterConfig, name: str, cpu: str, memory: str, commit: str,
            cache: bool = False) -> dsl.PipelineTask:
    """A step without a GPU, on the cpu image: its CPU and memory, each both request and limit."""
    _common(task, cluster, name, "cpu", commit)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    return task.set_caching_options(cache)


def _on_v100(task: dsl.PipelineTask, cluster: ClusterConfig, plan: BackendPlan, name: str, gpus: int, retries: int,
             commit: str, cache: bool = False) -> dsl.PipelineTask:
    """A GPU step on the trainer image: nodes with one of the V100 products (node affinity; on a backend without
    it, the first product by nodeSelector), the GPU toleration, CPU and memory scaled by its GPUs (request = limit,
    /dev/shm inside the memory), not evicted by the autoscaler, timeout, retries."""
    _common(task, cluster, name, "trainer", commit)
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(gpus)
    if plan.node_affinity:
        kubernetes.add_node_affinity(task, match_expressions=[
            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(cluster.gpu_products)}])
    else:
        kubernetes.add_node_selector(task, GPU_PRODUCT_LABEL, cluster.gpu_products[0])
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


def _training(task: dsl.PipelineTask, cluster: ClusterConfig, plan: BackendPlan, name: str, gpus: int, retries: int,
              commit: str) -> dsl.PipelineTask:
    """A training step. On one node it trains in its own V100 pod. With cluster.nodes > 1 its pod only launches
    and follows the TrainJob whose nodes hold the GPUs (ctv2v.remote.trainjob): a small CPU pod on the cpu image,
    with the step's timeout and retries (a retry replaces its own stale TrainJob)."""
    if cluster.nodes == 1:
        return _on_v100(task, cluster, plan, name, gpus, retries, commit)
    _on_cpu(task, cluster, name, LAUNCHER_CPU, LAUNCHER_MEMORY, commit)
    _timeout_and_retries(task, cluster, retries)
    return task


def _parameter_docs(defaults: dict) -> str:
    """The pipeline docstring's Args section: KFP shows each line as the parameter's description in its UI."""
    lines = ["config: the resolved run config (JSON); the parameters below override its keys",
             "workspace_root: where the workspace volume is mounted in every step"]
    lines += [f"{name}: sets {RUN_PARAMETERS[name][0]}" for name in defaults]
    return "The ctv2v pipeline.\n\nArgs:\n" + "".join(f"    {line}\n" for line in lines)


@dataclass(frozen=True)
class Build:
    """What the tasks of one compiled package share: the cluster section, what its KFP backend applies, the commit
    recorded on every pod, and whether kfp.local runs it."""

    cluster: ClusterConfig
    plan: BackendPlan
    commit: str
    local: bool


def resolve_and_prepare(build: Build, config_text, workspace_root, run_id: str,
                        compiled: dict, given: dict) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """resolve-config (the run's config from `config_text` and the run parameters `given`, whose compiled defaults
    are `compiled`), then prepare-data."""
    cluster, commit = build.cluster, build.commit
    resolved = _on_cpu(resolve_config_op(config_json=config_text, compiled_parameters=json.dumps(compiled),
                                         **{**compiled, **given}),
                       cluster, "resolve-config", "1", "1Gi", commit)
    prepared = _on_cpu(prepare_data_op(config_json=resolved.outputs["config"], workspace_root=workspace_root,
                                       pipeline_run_id=run_id),
                       cluster, "prepare-data", "2", "8Gi", commit)
    return resolved, prepared


def pretrained_vae(build: Build, resolved: dsl.PipelineTask, prepared: dsl.PipelineTask, run_id: str,
                   workspace_root) -> dsl.PipelineTask:
    """fetch-checkpoint -> match-architecture, both cached on what decides their output; returns the match task.

    match-architecture's run id is no input on a cluster (the driver resolves the run-id placeholder before it
    computes the cache key): it comes from the pod label. kfp.local applies no pod labels and keys its cache on
    the unresolved placeholder, so there it is an input."""
    cluster, commit = build.cluster, build.commit
    fetch = _on_cpu(fetch_checkpoint_op(fetch_config=resolved.outputs["fetch_config"]),
                    cluster, "fetch-checkpoint", "1", "2Gi", commit, cache=True)
    if cluster.hf_secret:
        kubernetes.use_secret_as_env(fetch, cluster.hf_secret, {"HF_TOKEN": "HF_TOKEN"})
    match = _on_v100(match_architecture_op(match_config=resolved.outputs["match_config"],
                                           data_sha256=prepared.outputs["manifest_sha256"],
                                           workspace_root=workspace_root, checkpoint=fetch.outputs["checkpoint"],
                                           **({"pipeline_run_id": run_id} if build.local else {})),
                     cluster, build.plan, "match-architecture", 1, 0, commit, cache=True)
    if not build.local:
        kubernetes.use_field_path_as_env(match, RUN_ID_ENV, RUN_ID_FIELD_PATH)
    return match


def build_pipeline(config: RunConfig, variants: str = "both", commit: str | None = None, local: bool = False):
    """The pipeline function for `config` with the branches of `variants`: its cluster section is compiled in, its
    config and run parameters the defaults; `commit` (default: this code's git commit) is recorded in the
    description and on every pod. `local`: built for kfp.local (see pretrained_vae)."""
    cluster = config.cluster
    build = Build(cluster, backend_plan(cluster), commit or git_commit(), local)
    commit, plan = build.commit, build.plan
    chosen = BRANCH_VARIANTS[variants]
    gpus, retries = cluster.gpus_per_step, cluster.train_retries
    defaults = run_parameter_defaults(config, with_scratch_vae="main" in chosen)
    compiled = run_parameter_defaults(config, with_scratch_vae=True)

    def branch(variant: str, resolved: dsl.PipelineTask, prepared: dsl.PipelineTask, run_id: str,
               workspace_root) -> dsl.PipelineTask:
        """One variant's chain after prepare-data; returns its evaluate task."""
        config_json, data = resolved.outputs["config"], prepared.outputs["manifest"]
        workspace = {"workspace_root": workspace_root, "pipeline_run_id": run_id}
        if variant == "pretrained":
            vae = pretrained_vae(build, resolved, prepared, run_id, workspace_root)
        else:
            # `gpus` is a constant of the compiled pipeline, beside the pod's GPU limit: never read at run time.
            vae = _training(train_vae_op(config_json=config_json, data=data, gpus=gpus, **workspace),
                            cluster, plan, "train-vae", gpus, retries, commit)
        frozen = _training(train_op(config_json=config_json, variant=variant, phase="frozen", data=data,
                                    vae=vae.outputs["vae"], gpus=gpus, **workspace),
                           cluster, plan, f"train-frozen-{variant}", gpus, retries, commit)
        full = _training(train_op(config_json=config_json, variant=variant, phase="full", data=data,
                                  vae=vae.outputs["vae"], init=frozen.outputs["model"], gpus=gpus, **workspace),
                         cluster, plan, f"train-full-{variant}", gpus, retries, commit)
        return _on_v100(evaluate_op(config_json=config_json, variant=variant, data=data, model=full.outputs["model"],
                                    **workspace),
                        cluster, plan, f"evaluate-{variant}", 1, 0, commit)

    def ctv2v_pipeline(*values):
        # KFP calls the pipeline function with one positional channel per parameter of its signature (below).
        config_text, workspace_root, *run_values = values
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        # Runs when everything inside the handler has ended, whatever the outcome: pending MLflow data is
        # uploaded, the pipeline's parent MLflow run ends FINISHED or FAILED, and the run's workspace folder is
        # removed as cluster.scratch_cleanup says (ctv2v.steps.finish_run).
        finish = _on_cpu(finish_run_op(config_json=config_text, workspace_root=workspace_root,
                                       pipeline_run_id=run_id, scratch_cleanup=cluster.scratch_cleanup),
                         cluster, "finish-run", "1", "1Gi", commit)
        with dsl.ExitHandler(finish, name="ctv2v-run"):
            resolved, prepared = resolve_and_prepare(build, config_text, workspace_root, run_id, compiled,
                                                     dict(zip(defaults, run_values)))
            reports = {variant: branch(variant, resolved, prepared, run_id, workspace_root).outputs["report"]
                       for variant in chosen}
            if len(chosen) == 2:
                _on_cpu(compare_op(config_json=resolved.outputs["config"], workspace_root=workspace_root,
                                   pipeline_run_id=run_id, main_report=reports["main"],
                                   pretrained_report=reports["pretrained"]),
                        cluster, "compare", "1", "2Gi", commit)

    parameter = inspect.Parameter
    # One-line JSON for `config`: the compiler copies defaults into a YAML comment header line by line.
    ctv2v_pipeline.__signature__ = inspect.Signature(
        [parameter("config", parameter.POSITIONAL_OR_KEYWORD, default=config_argument(config), annotation=str),
         parameter("workspace_root", parameter.POSITIONAL_OR_KEYWORD, default=cluster.workspace_mount,
                   annotation=str)]
        + [parameter(name, parameter.POSITIONAL_OR_KEYWORD, default=value, annotation=RUN_PARAMETERS[name][1])
           for name, value in defaults.items()])
    ctv2v_pipeline.__doc__ = _parameter_docs(defaults)
    return dsl.pipeline(
        name="ctv2v",
        description=f"CT slice interpolation: latent video-to-video diffusion, branches {', '.join(chosen)} "
                    f"(main: scratch VAE, pretrained: MAISI). Compiled from commit {commit} for KFP "
                    f"{cluster.kfp_backend}.",
        # KFP deletes the finished run's workflow and pods after this TTL (the workspace folder is the exit
        # handler's to clean); left out where the backend would ignore it (backend_plan).
        pipeline_config=dsl.PipelineConfig(ttl_seconds_after_finished=cluster.run_ttl_s) if plan.run_ttl else None,
    )(ctv2v_pipeline)
