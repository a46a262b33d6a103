"""Compile the DAG to KFP IR YAML and validate it strictly against the KFP protobufs; pin the step images from
scripts/build-images.sh's lock file; compile each backend feature only where cluster.kfp_backend applies it
(pipeline.backend) and say what is left out."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from ctv2v.config import ClusterConfig, RunConfig
from ctv2v.files import atomic_path
from ctv2v.provenance import git_commit
from pipeline.backend import backend_plan
from pipeline.dag import build_pipeline

log = logging.getLogger(__name__)

LOCK_REF = re.compile(r"^(?P<repository>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


class PipelineSpecError(ValueError):
    """The compiled pipeline YAML does not parse strictly into KFP's protobufs."""


def validate_pipeline_yaml(path: Path) -> tuple[pipeline_spec_pb2.PipelineSpec, pipeline_spec_pb2.PlatformSpec]:
    """Parse a compiled package strictly (unknown fields are errors) into PipelineSpec + PlatformSpec.

    Each executor's Kubernetes config inside the PlatformSpec is parsed into KubernetesExecutorConfig too,
    since PlatformSpec holds it as an untyped Struct.
    """
    docs = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]
    if len(docs) != 2:
        raise PipelineSpecError(f"{path}: expected a PipelineSpec and a PlatformSpec document, found {len(docs)}")
    pipeline_spec = pipeline_spec_pb2.PipelineSpec()
    platform_spec = pipeline_spec_pb2.PlatformSpec()
    try:
        json_format.ParseDict(docs[0], pipeline_spec, ignore_unknown_fields=False)
        json_format.ParseDict(docs[1], platform_spec, ignore_unknown_fields=False)
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for name, executor in executors.items():
            json_format.ParseDict(executor, kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
                                  ignore_unknown_fields=False)
    except (json_format.ParseError, KeyError) as exc:
        raise PipelineSpecError(f"{path}: not a valid KFP package: {exc}") from exc
    return pipeline_spec, platform_spec


class ImagesLockError(ValueError):
    """The images lock file is missing, malformed, or from another commit than the code being compiled."""


@dataclass(frozen=True)
class ImagesLock:
    """scripts/build-images.sh's lock file: the commit the images were built from and each image's pushed digest."""

    commit: str
    refs: dict[str, tuple[str, str]]
    """Image name (cpu, trainer, ...) -> (repository, sha256 digest)."""


def read_images_lock(path: Path) -> ImagesLock:
    """Parse and check an images lock file (written by `scripts/build-images.sh --push`)."""
    try:
        data = json.loads(Path(path).read_text())
        commit, images = data["commit"], data["images"]
        refs = {}
        for name, entry in images.items():
            match = LOCK_REF.match(entry["ref"])
            if match is None:
                raise ImagesLockError(f"{path}: images.{name}.ref {entry['ref']!r} is not REPOSITORY@sha256:<64 hex>")
            refs[name] = (match["repository"], match["digest"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ImagesLockError(f"{path}: not an images lock file of scripts/build-images.sh ({exc!r})") from exc
    missing = {"cpu", "trainer"} - set(refs)
    if missing:
        raise ImagesLockError(f"{path}: no {', '.join(sorted(missing))} image (build and push it too)")
    return ImagesLock(commit, refs)


def pin_images(config: RunConfig, lock: ImagesLock, source_commit: str) -> RunConfig:
    """`config` with the step images pinned to the lock's digests; refuses a lock built from other code."""
    built_from = lock.commit.removesuffix("-dirty")
    if source_commit != "unknown" and built_from != source_commit:
        raise ImagesLockError(f"the images were built from commit {lock.commit}, the pipeline is compiled from "
                              f"{source_commit}: rebuild the images, or compile from their commit")
    cluster = config.cluster.model_copy(update={
        "cpu_image": lock.refs["cpu"][0], "cpu_image_digest": lock.refs["cpu"][1],
        "trainer_image": lock.refs["trainer"][0], "trainer_image_digest": lock.refs["trainer"][1]})
    return config.model_copy(update={"cluster": ClusterConfig.model_validate(cluster.model_dump())})


def compile_pipeline(config: RunConfig, out: Path, images_lock: Path | None = None, variants: str = "both") -> Path:
    """Compile the ctv2v DAG for `config` (its cluster section, and the config text as the default) with the
    branches of `variants` (main, pretrained or both) to `out`, with the step images pinned to the digests of
    `images_lock` when given. The pipeline records the commit; each feature cluster.kfp_backend lacks is logged."""
    commit = git_commit()
    if images_lock is not None:
        lock = read_images_lock(images_lock)
        config = pin_images(config, lock, commit)
        commit = lock.commit
    for note in backend_plan(config.cluster).notes:
        log.warning("%s", note)
    pipeline_func = build_pipeline(config, variants, commit)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp_yaml = tmp.with_suffix(".yaml")
        compiler.Compiler().compile(pipeline_func, str(tmp_yaml))
        tmp_yaml.replace(tmp)
    validate_pipeline_yaml(out)
    return out
