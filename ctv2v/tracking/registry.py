"""The MLflow model registry: a step's trained model becomes a version with alias `candidate`; the alias
`champion` moves to it only if its test PSNR beats the current champion's."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from ctv2v.tracking.tags import TAG_PIPELINE_RUN_ID, TAG_STEP, TAG_TEST_PSNR

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"


@dataclass
class ModelRegistration:
    """A registered model version and whether it became the champion."""

    name: str
    version: str
    test_psnr: float
    champion: bool


def register_version(
    client: MlflowClient, *, name: str, run_id: str, artifact_path: str, test_psnr: float, pipeline_run_id: str,
    step_name: str,
) -> ModelRegistration:
    """Register `runs:/<run_id>/<artifact_path>` as a version of `name` (reusing one registered from the same
    run and path), alias it `candidate`, and move `champion` to it if its test PSNR is higher."""
    source = f"runs:/{run_id}/{artifact_path}"
    try:
        client.create_registered_model(name, description="ctv2v denoiser + VAE (state dicts and config files)")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # A version from the same run and path exists if an earlier sync registered it but lost the answer.
    existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                if v.source == source]
    if existing:
        version = existing[0]
    else:
        version = client.create_model_version(
            name, source=source, run_id=run_id,
            tags={TAG_TEST_PSNR: repr(test_psnr), TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_STEP: step_name},
        )
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    champion_psnr = _champion_psnr(client, name)
    becomes_champion = champion_psnr is None or test_psnr > champion_psnr
    if math.isnan(test_psnr):
        log.warning("model %s version %s has test PSNR NaN: it never becomes champion", name, version.version)
        becomes_champion = False
    if becomes_champion:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    log.info("registered %s version %s (test PSNR %.3f dB)%s", name, version.version, test_psnr,
             "; it is the new champion" if becomes_champion else f"; champion stays at {champion_psnr:.3f} dB")
    return ModelRegistration(name, str(version.version), test_psnr, becomes_champion)


def _champion_psnr(client: MlflowClient, name: str) -> float | None:
    """The champion version's test PSNR; None if there is no champion. A champion without one keeps its alias."""
    champion_version = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    if champion_version is None:
        return None
    champion = client.get_model_version(name, champion_version)
    if TAG_TEST_PSNR not in champion.tags:
        log.warning("champion of %s (version %s) has no %s tag: the alias is left where it is",
                    name, champion.version, TAG_TEST_PSNR)
        return math.inf
    return float(champion.tags[TAG_TEST_PSNR])
