"""The MLflow model registry: each evaluated model becomes a version of `ctv2v-<variant>` with alias `candidate`.

Every version carries tags that say what it is (VersionFacts): the VAE weights kind, whether the config was a
smoke run, the sha256 of the dataset manifest it was evaluated on, the sha256 of that evaluation's settings
together with the manifest (the test set and how it was scored), the sha256 of the model's config, the git
commit, and the test PSNR. The alias `champion` moves to a new version only when (champion_refusal):
- its VAE weights are not stand-in (random values in MAISI's layout) and its config is not a smoke run;
- its test PSNR is a number;
- there is no champion yet, or the champion was evaluated on the same test set with the same settings
  (same `ctv2v.evaluation_sha256`) and the new version's test PSNR is strictly higher.
A champion without these tags (registered before the rules) keeps the alias until a user moves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from ctv2v.tracking.tags import (
    TAG_CONFIG_SHA256,
    TAG_EVALUATION_SHA256,
    TAG_GIT_COMMIT,
    TAG_MANIFEST_SHA256,
    TAG_PIPELINE_RUN_ID,
    TAG_SMOKE,
    TAG_STEP,
    TAG_TEST_PSNR,
    TAG_WEIGHTS,
)

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
NEVER_CHAMPION_WEIGHTS = ("stand-in",)


def sha256_json(data: object) -> str:
    """sha256 of `data`'s canonical JSON (sorted keys, no spaces): equal data, equal hash."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class VersionFacts:
    """What a model version is and how it was scored: its registry tags, and what the champion rule reads."""

    weights: str
    """VAE weights kind: pretrained / scratch / stand-in."""
    smoke: bool
    manifest_sha256: str
    evaluation_sha256: str
    """The test set and how it was scored (manifest + evaluation settings): scores compare only when equal."""
    config_sha256: str
    git_commit: str
    test_psnr: float

    def tags(self) -> dict[str, str]:
        """The version's tags."""
        return {TAG_WEIGHTS: self.weights, TAG_SMOKE: str(self.smoke).lower(),
                TAG_MANIFEST_SHA256: self.manifest_sha256, TAG_EVALUATION_SHA256: self.evaluation_sha256,
                TAG_CONFIG_SHA256: self.config_sha256, TAG_GIT_COMMIT: self.git_commit,
                TAG_TEST_PSNR: repr(self.test_psnr)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> VersionFacts | None:
        """The facts in a version's tags; None when a tag is missing (a version registered before the rules)."""
        keys = (TAG_WEIGHTS, TAG_SMOKE, TAG_MANIFEST_SHA256, TAG_EVALUATION_SHA256, TAG_CONFIG_SHA256,
                TAG_GIT_COMMIT, TAG_TEST_PSNR)
        if any(key not in tags for key in keys):
            return None
        return cls(tags[TAG_WEIGHTS], tags[TAG_SMOKE] == "true", tags[TAG_MANIFEST_SHA256],
                   tags[TAG_EVALUATION_SHA256], tags[TAG_CONFIG_SHA256], tags[TAG_GIT_COMMIT],
                   float(tags[TAG_TEST_PSNR]))


@dataclass
class ModelRegistration:
    """A registered model version, whether it became the champion, and why not if it did not."""

    name: str
    version: str
    test_psnr: float
    champion: bool
    refusal: str | None = None


def champion_refusal(candidate: VersionFacts, champion: VersionFacts | None, champion_version: str | None) -> str | None:
    """Why `candidate` may not take the `champion` alias (see the module docstring); None if it may."""
    if candidate.weights in NEVER_CHAMPION_WEIGHTS:
        return f"its VAE weights are {candidate.weights} (random values in MAISI's layout), never a champion"
    if candidate.smoke:
        return "its config is a smoke run (tracking.smoke_run), never a champion"
    if math.isnan(candidate.test_psnr):
        return "its test PSNR is NaN"
    if champion_version is None:
        return None
    if champion is None:
        return f"the champion (version {champion_version}) carries no registry-rule tags; move the alias by hand"
    if champion.evaluation_sha256 != candidate.evaluation_sha256:
        return (f"it was evaluated on another test set or with other settings than the champion (version "
                f"{champion_version}): {TAG_EVALUATION_SHA256} {candidate.evaluation_sha256[:12]} vs "
                f"{champion.evaluation_sha256[:12]}; PSNRs are not comparable")
    if not candidate.test_psnr > champion.test_psnr:
        return (f"test PSNR {candidate.test_psnr:.3f} dB is not above the champion's (version {champion_version}) "
                f"{champion.test_psnr:.3f} dB")
    return None


def register_version(
    client: MlflowClient, *, name: str, run_id: str, facts: VersionFacts, log_model: Callable[[], str],
    pipeline_run_id: str, step_name: str,
) -> ModelRegistration:
    """Register the model `log_model()` logs (it returns the logged model's id) as a version of `name`, alias it
    `candidate`, and move `champion` to it if champion_refusal allows.

    A version already registered from `run_id` is reused without logging again: an earlier sync registered it
    but lost the answer.
    """
    try:
        client.create_registered_model(name, description="ctv2v: thick CT series -> thin series (MLflow pyfunc)")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if versions:
        version = versions[0]
    else:
        model_id = log_model()
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
            tags={**facts.tags(), TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_STEP: step_name},
        )
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    champion_version = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    if champion_version == str(version.version):
        return ModelRegistration(name, str(version.version), facts.test_psnr, True)
    champion = None if champion_version is None else VersionFacts.from_tags(
        client.get_model_version(name, champion_version).tags)
    refusal = champion_refusal(facts, champion, champion_version)
    if refusal is None:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
        log.info("registered %s version %s (test PSNR %.3f dB): the new champion", name, version.version,
                 facts.test_psnr)
    else:
        log.info("registered %s version %s (test PSNR %.3f dB) as candidate; not champion: %s", name,
                 version.version, facts.test_psnr, refusal)
    return ModelRegistration(name, str(version.version), facts.test_psnr, refusal is None, refusal)
