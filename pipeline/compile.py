"""Compile the DAG to KFP IR YAML and validate it strictly against the KFP protobufs."""

from __future__ import annotations

from pathlib import Path

import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from ctv2v.config import RunConfig
from ctv2v.files import atomic_path


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


def compile_pipeline(config: RunConfig, out: Path) -> Path:
    """Compile the ctv2v DAG for `config` (its cluster section and the config text as the default) to `out`."""
    from pipeline.dag import build_pipeline

    pipeline_func = build_pipeline(config)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp_yaml = tmp.with_suffix(".yaml")
        compiler.Compiler().compile(pipeline_func, str(tmp_yaml))
        tmp_yaml.replace(tmp)
    validate_pipeline_yaml(out)
    return out
