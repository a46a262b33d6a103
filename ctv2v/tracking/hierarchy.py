"""The run hierarchy in MLflow: one experiment (`tracking.experiment`), one parent run per pipeline run found or
created by the tag `ctv2v.pipeline_run_id` (parallel steps may both create it: every creator keeps the oldest and
deletes its own duplicate), one nested run per step; and the parent's end (ctv2v.steps.finish_run)."""

from __future__ import annotations

import logging
import os
import re
import uuid

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from ctv2v.config import TrackingConfig
from ctv2v.provenance import git_commit
from ctv2v.tracking.journal import Journal, send_entries
from ctv2v.tracking.registry import ModelRegistration
from ctv2v.tracking.server import configure_client_http, tracking_uri
from ctv2v.tracking.tags import TAG_IMAGE, TAG_KFP_RUN_ID, TAG_PIPELINE_RUN_ID, TAG_RUN_ROLE

log = logging.getLogger(__name__)

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def new_pipeline_run_id() -> str:
    """A pipeline run id for runs outside Kubeflow (in the cluster the KFP run id is used)."""
    return f"local-{uuid.uuid4().hex}"


def check_pipeline_run_id(pipeline_run_id: str) -> None:
    """ValueError unless `pipeline_run_id` can be a tag value and a run name (1-128 letters, digits and ._:-)."""
    if not _RUN_ID_PATTERN.match(pipeline_run_id):
        raise ValueError(
            f"pipeline_run_id {pipeline_run_id!r}: expected 1-128 characters of letters, digits and ._:-"
        )


def common_tags(pipeline_run_id: str, kfp_run_id: str | None) -> dict[str, str]:
    """The tags of a pipeline run's parent run and of each step's run: pipeline run id, commit, image, KFP run."""
    tags = {TAG_PIPELINE_RUN_ID: pipeline_run_id, MLFLOW_GIT_COMMIT: git_commit(),
            TAG_IMAGE: os.environ.get("CTV2V_IMAGE", "unknown")}
    if kfp_run_id is not None:
        tags[TAG_KFP_RUN_ID] = kfp_run_id
    return tags


def sync(client: MlflowClient, journal: Journal, registered: dict[str, ModelRegistration]) -> None:
    """Create the journal's step run if the server has not yet, then send its entries (raises at the first
    failure, see ctv2v.tracking.journal.send_entries)."""
    if journal.run_id is None:
        journal.run_id = _create_step_run(client, journal)
    send_entries(client, journal, registered)


def _create_step_run(client: MlflowClient, journal: Journal) -> str:
    experiment_id = _experiment_id(client, journal.experiment)
    parent_id = _pipeline_run(client, experiment_id, journal.pipeline_run_id, journal.parent_tags)
    run = client.create_run(
        experiment_id,
        start_time=journal.start_time_ms,
        tags={**journal.tags, MLFLOW_PARENT_RUN_ID: parent_id},
        run_name=journal.step_name,
    )
    log.info("MLflow run %s for step %r (pipeline run %s)", run.info.run_id, journal.step_name,
             journal.pipeline_run_id)
    return run.info.run_id


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.get_experiment_by_name(name).experiment_id


def _pipeline_run(client: MlflowClient, experiment_id: str, pipeline_run_id: str, parent_tags: dict[str, str]) -> str:
    """The parent run tagged with the pipeline run id, created if missing (the oldest wins a creation race)."""
    query = f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}' and tags.`{TAG_RUN_ROLE}` = 'pipeline'"

    def oldest() -> str | None:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=100)
        return min(runs, key=lambda run: (run.info.start_time, run.info.run_id)).info.run_id if runs else None

    existing = oldest()
    if existing is not None:
        return existing
    mine = client.create_run(experiment_id, tags=parent_tags, run_name=f"pipeline-{pipeline_run_id}")
    winner = oldest()
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return winner


def end_pipeline_run(config: TrackingConfig, pipeline_run_id: str, status: str,
                     kfp_run_id: str | None = None) -> str | None:
    """End the pipeline run's parent MLflow run with `status` (created first if no step made it); its id.

    None when tracking is off, or when KFP's MLflow integration made the runs (MLFLOW_RUN_ID is set): KFP ends
    its own parent run.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status={status!r}: expected FINISHED, FAILED or KILLED")
    uri = tracking_uri(config)
    if uri is None or os.environ.get("MLFLOW_RUN_ID"):
        return None
    configure_client_http(config)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, config.experiment)
    parent_tags = {**common_tags(pipeline_run_id, kfp_run_id), TAG_RUN_ROLE: "pipeline"}
    parent_id = _pipeline_run(client, experiment_id, pipeline_run_id, parent_tags)
    client.set_terminated(parent_id, status=status)
    log.info("MLflow: pipeline run %s (MLflow run %s) ended %s", pipeline_run_id, parent_id, status)
    return parent_id
