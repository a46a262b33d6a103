"""What the KFP pipeline passes its steps besides the config itself.

- run parameters: the values users change per run (data source, thick factor, epochs, learning rates, sampling
  steps) are typed pipeline parameters, shown and edited in the KFP UI; they override the `config` parameter's
  keys and go through the same strict schema;
- cache keys: a cacheable step (fetch-checkpoint, match-architecture) receives only the config keys that decide
  its output, never the run id or the whole config, so that KFP's cache key (its input values) matches across
  runs that would compute the same thing;
- the run id of a cacheable step, which reaches it outside its inputs (see `cached_step_run_id`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from ctv2v.config import ConfigError, RunConfig
from ctv2v.config_io import config_from_text

RUN_PARAMETERS: dict[str, tuple[str, type]] = {
    "data_source": ("data.source", str),
    "thick_factor": ("data.thick.factor", int),
    "vae_epochs": ("vae.scratch.epochs", int),
    "vae_lr": ("vae.scratch.lr", float),
    "frozen_epochs": ("training.frozen.epochs", int),
    "frozen_lr": ("training.frozen.lr", float),
    "full_epochs": ("training.full.epochs", int),
    "full_lr": ("training.full.lr", float),
    "sample_steps": ("evaluation.sample_steps", int),
}
"""Pipeline parameter -> (the config key it sets, its type)."""
VALUE_IN_EFFECT: dict[str, Callable[[RunConfig], Any]] = {
    "evaluation.sample_steps": attrgetter("evaluation_sample_steps"),
}
"""Keys whose null means another key's value (evaluation.sample_steps: diffusion.sample_steps): their typed pipeline
parameter holds, and is compared with, the value in effect."""
SCRATCH_VAE_PARAMETERS = ("vae_epochs", "vae_lr")
"""Only meaningful when the package holds the `main` branch (the scratch VAE's training)."""

FETCH_KEYS: dict[str, Any] = {"seed": True, "vae": {"maisi": {"checkpoint", "sha256", "md5", "weights"}},
                              "storage": True}
"""What decides fetch-checkpoint's output: the source and its pinned hash, the weights kind (a stand-in is built
from the seed); plus how to reach the object store, which is the same for every run of a deployment."""
MATCH_KEYS: dict[str, Any] = {
    "seed": True, "device": True,
    "data": {"slice_spacing_tolerance", "intensity", "thick", "resample", "split", "clip"},
    "vae": {"maisi", "latent_scale_clips"}, "v2v": True,
    "training": {"precision", "val_clips", "latent_cache"}, "evaluation": {"hu_min", "hu_max"},
    "tracking": True,
}
"""What match-architecture reads from the config (ctv2v.steps.match_architecture: the checkpoint's loading options,
the reconstruction check and VAE ceiling on val clips with the interpolation they are scored against, the latent
scale from training clips), plus where it logs. The prepared data enter the key as the manifest's sha256. Every
other key takes its default in the step (also in the resolved-config.yaml of its VAE artifact): training
lengths, learning rates and sampling steps change per run and must not make the cached VAE miss."""

RUN_ID_ENV = "CTV2V_PIPELINE_RUN_ID"
"""Set on the pods of cacheable steps from their label `pipeline/runid` (which KFP's API server puts on every pod
of a run, backend/src/apiserver/template/v2_template.go): the run id outside the step's inputs."""


def run_parameter_defaults(config: RunConfig, with_scratch_vae: bool) -> dict[str, Any]:
    """The typed pipeline parameters and their values in `config` (their defaults in the compiled package)."""
    names = [name for name in RUN_PARAMETERS if with_scratch_vae or name not in SCRATCH_VAE_PARAMETERS]
    return {name: _value(config, RUN_PARAMETERS[name][0]) for name in names}


def _value(config: RunConfig, dotted: str) -> Any:
    if dotted in VALUE_IN_EFFECT:
        return VALUE_IN_EFFECT[dotted](config)
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def resolve_run_config(config_text: str, compiled: dict[str, Any], given: dict[str, Any]) -> RunConfig:
    """The run's config: `config_text` with each run parameter that differs from its compiled default applied.

    A key changed both in the config text and by its parameter, to different values, is refused: which one was
    meant cannot be told. Values are checked by the config schema like any `--set`.
    """
    config = config_from_text(config_text, "config")
    overrides = []
    for name, value in given.items():
        key, kind = RUN_PARAMETERS[name]
        if value == compiled[name]:
            continue  # the parameter was left alone: the config text's value stands
        in_config = _value(config, key)
        if in_config != compiled[name] and in_config != value:
            raise ConfigError(f"pipeline parameter {name}={value!r} and the config's {key}={in_config!r} both "
                              f"differ from the compiled {compiled[name]!r}: set {key} in one place")
        # JSON is YAML: strings stay strings, numbers numbers; the schema checks the type (strict).
        overrides.append(f"{key}={json.dumps(value)}")
    return config_from_text(config_text, "config", overrides)


def cache_key_config(config: RunConfig, keys: dict[str, Any]) -> str:
    """The part of `config` named by `keys` (FETCH_KEYS, MATCH_KEYS) as one-line JSON: a cacheable step's input."""
    return json.dumps(config.model_dump(mode="json", include=keys), sort_keys=True, separators=(",", ":"))


def cached_step_run_id(pipeline_run_id: str) -> str:
    """The run id of a cacheable step: its `pipeline_run_id` input when given (kfp.local, whose cache key holds
    the unresolved run-id placeholder), else RUN_ID_ENV (a cluster, whose cache key would hold the resolved id)."""
    if pipeline_run_id:
        return pipeline_run_id
    if not os.environ.get(RUN_ID_ENV):
        raise RuntimeError(f"no pipeline run id: no pipeline_run_id input and ${RUN_ID_ENV} is not set (the "
                           "pipeline sets it from the pod label pipeline/runid)")
    return os.environ[RUN_ID_ENV]
