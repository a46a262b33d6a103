"""Submit the compiled DAG to a Kubeflow Pipelines API server through kfp.Client."""

from __future__ import annotations

import datetime
import logging
import tempfile
from pathlib import Path

import kfp

from ctv2v.config import RunConfig
from pipeline.compile import compile_pipeline
from pipeline.dag import config_argument

log = logging.getLogger(__name__)


DEFAULT_POLL_S = 30
"""Seconds between run-state polls with --wait."""


class RunFailed(RuntimeError):
    """A submitted run finished in a state other than SUCCEEDED."""


def submit(
    config: RunConfig,
    *,
    host: str,
    namespace: str | None,
    experiment: str,
    branches: str,
    token: str | None = None,
    cookie: str | None = None,
    run_name: str | None = None,
    wait: bool = False,
    timeout_s: int = 7 * 24 * 3600,
    poll_s: int | None = None,
) -> str:
    """Compile, submit one run with the resolved config as its argument, optionally wait; returns the run id."""
    client = kfp.Client(host=host, namespace=namespace, existing_token=token, cookies=cookie)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(config, Path(tmp) / "ctv2v-pipeline.yaml")
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments={"config": config_argument(config), "branches": branches},
            run_name=run_name or f"ctv2v-{branches}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
            experiment_name=experiment,
            namespace=namespace,
            service_account=config.cluster.service_account or None,
        )
    run_id = result.run_id
    log.info("submitted run %s to %s (experiment %s, branches %s)", run_id, host, experiment, branches)
    if wait:
        run = client.wait_for_run_completion(run_id, timeout=timeout_s,
                                           sleep_duration=DEFAULT_POLL_S if poll_s is None else poll_s)
        state = (run.state or "UNKNOWN").upper()
        if state != "SUCCEEDED":
            raise RunFailed(f"run {run_id} finished as {state}")
        log.info("run %s succeeded", run_id)
    return run_id
