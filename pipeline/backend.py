"""Which KFP backend features a compiled pipeline holds for cluster.kfp_backend, and the oldest KFP backend that
runs the result."""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

from ctv2v.config import ClusterConfig

KFP_BACKENDS: dict[str, Version] = {"2.5": Version("2.5.0"), "2.15": Version("2.15.0"),
                                    "2.16": Version("2.16.0"), "2.17": Version("2.17.0")}
"""cluster.kfp_backend -> the KFP release it stands for. What Kubeflow platform releases ship, from the component
version table of the kubeflow/manifests README at each release tag (checked 2026-12-06,
https://github.com/kubeflow/manifests/blob/26.03/README.md#kubeflow-components-versions and the tags v1.10.0,
v1.10.1, v1.10.2, v1.11.0): 1.10.0 -> KFP 2.4.1, 1.10.1 and 1.10.2 -> 2.5.0, 1.11.0 -> 2.15.0, 26.03 -> 2.16.0."""
BACKEND_FEATURES: dict[str, str] = {
    # What every compiled pipeline uses -> the first KFP release whose backend applies it (KFP's CHANGELOG).
    "pod labels and annotations, image pull secrets, step timeouts (kfp-kubernetes)": "2.1.0",
    "memory-backed /dev/shm (kfp-kubernetes empty_dir_mount)": "2.3.0",
    "run-id placeholder (dsl.PIPELINE_JOB_ID_PLACEHOLDER) and step retries": "2.5.0",
}
NODE_AFFINITY_FEATURE = ("node affinity over the GPU product list (kfp-kubernetes add_node_affinity)", "2.14.0")
"""The driver reads KubernetesExecutorConfig.node_affinity from 2.14.0 on (backend/src/v2/driver/k8s.go); 2.5.0
declares the field and ignores it. Without it GPU steps select one product by nodeSelector."""
RUN_TTL_FEATURE = ("run TTL (dsl.PipelineConfig ttl_seconds_after_finished, cluster.run_ttl_s)", "2.17.0")
"""Argo's TTLStrategy from the PlatformSpec's pipelineConfig, from 2.17.0 on (backend/src/v2/compiler/argocompiler/
argo.go); older backends ignore the field, so it is left out of their packages."""


@dataclass(frozen=True)
class BackendPlan:
    """Which optional features the package for cluster.kfp_backend holds, and what compile says about the rest."""

    node_affinity: bool
    run_ttl: bool
    notes: tuple[str, ...]


def backend_plan(cluster: ClusterConfig) -> BackendPlan:
    """The features compiled for `cluster` (its kfp_backend and settings), with one note per feature left out."""
    target = KFP_BACKENDS[cluster.kfp_backend]
    node_affinity = target >= Version(NODE_AFFINITY_FEATURE[1])
    run_ttl = cluster.run_ttl_s is not None and target >= Version(RUN_TTL_FEATURE[1])
    notes = []
    if not node_affinity and len(cluster.gpu_products) > 1:
        notes.append(f"KFP {cluster.kfp_backend} applies no node affinity: GPU steps select "
                     f"{cluster.gpu_products[0]} by nodeSelector, nodes with {', '.join(cluster.gpu_products[1:])} "
                     f"stay unused (cluster.kfp_backend >= 2.15 selects any of them)")
    if cluster.run_ttl_s is not None and not run_ttl:
        notes.append(f"KFP {cluster.kfp_backend} applies no run TTL: cluster.run_ttl_s is not compiled in, finished "
                     f"runs keep their pods and workflow until deleted (KFP >= {RUN_TTL_FEATURE[1]} applies it)")
    return BackendPlan(node_affinity, run_ttl, tuple(notes))


def backend_requirements(cluster: ClusterConfig) -> dict[str, Version]:
    """What the pipeline compiled from `cluster` needs of the KFP backend: feature -> oldest KFP version."""
    plan = backend_plan(cluster)
    features = dict(BACKEND_FEATURES)
    for compiled, (feature, version) in ((plan.node_affinity, NODE_AFFINITY_FEATURE), (plan.run_ttl, RUN_TTL_FEATURE)):
        if compiled:
            features[feature] = version
    return {feature: Version(version) for feature, version in features.items()}


def required_backend_version(cluster: ClusterConfig) -> Version:
    """The oldest KFP backend that runs the pipeline compiled from `cluster` as written."""
    return max(backend_requirements(cluster).values())
