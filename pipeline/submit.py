"""Submit the compiled DAG to a Kubeflow Pipelines API server through kfp.Client.

Where the API server is and how to authenticate:
  - inside the cluster (a Kubeflow notebook, a CI pod): no --host. The API server's in-cluster address
    (KF_PIPELINES_ENDPOINT overrides it) and the pod's projected service-account token from the file named by
    KF_PIPELINES_SA_TOKEN_PATH (Kubeflow's PodDefault "access-ml-pipeline" mounts one);
  - from outside: --host, and a bearer token from a file (--token-file) or from an environment variable
    (--token-env NAME), e.g. made by `kubectl create token`. A token never goes on the command line (other users
    of the machine see arguments in `ps`) and is never logged.
A token file is read again before every request, so a file that is renewed (projected tokens rotate by
themselves) keeps a long --wait authenticated; a token from the environment is fixed for the process.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import kfp
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials
from packaging.version import InvalidVersion, Version

from ctv2v.config import RunConfig
from pipeline.backend import required_backend_version
from pipeline.compile import compile_pipeline
from pipeline.dag import config_argument

log = logging.getLogger(__name__)


DEFAULT_POLL_S = 30
"""Seconds between run-state polls with --wait."""
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
"""KFP's API server as pods reach it (kfp's own in-cluster default; KF_PIPELINES_ENDPOINT overrides it)."""
ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
"""Set by the kubelet in every pod: how a process knows it runs inside a cluster."""


class RunFailed(RuntimeError):
    """A submitted run finished in a state other than SUCCEEDED."""


class SubmitError(RuntimeError):
    """Submission cannot start: no server to talk to, no usable token, or a server too old for the pipeline."""


@dataclass(frozen=True)
class Connection:
    """Where the KFP API server is and how requests authenticate (the token itself is never stored here)."""

    host: str
    token_file: Path | None = None
    token_env: str | None = None
    cookie_env: str | None = None

    def describe(self) -> str:
        """For logs: where the credentials come from, never what they are."""
        if self.token_file is not None:
            return f"{self.host} (bearer token from file {self.token_file})"
        if self.token_env is not None:
            return f"{self.host} (bearer token from ${self.token_env})"
        if self.cookie_env is not None:
            return f"{self.host} (session cookie from ${self.cookie_env})"
        return f"{self.host} (no credentials)"

    def client(self, namespace: str | None) -> kfp.Client:
        """A kfp.Client for this connection (an explicit host: kfp's own in-cluster guess would take the profile
        namespace for KFP's)."""
        options = {"namespace": namespace} if namespace else {}
        if self.token_file is not None:
            # kfp calls the credentials' refresh hook before every request: the file is read again each time.
            options["credentials"] = ServiceAccountTokenVolumeCredentials(str(self.token_file))
        elif self.token_env is not None:
            options["existing_token"] = os.environ[self.token_env]
        elif self.cookie_env is not None:
            options["cookies"] = os.environ[self.cookie_env]
        return kfp.Client(host=self.host, **options)


def resolve_connection(host: str | None, token_file: Path | None, token_env: str | None,
                       cookie_env: str | None = None, environ: dict[str, str] | None = None) -> Connection:
    """The API server and credentials for these options and this process's environment (see the module doc)."""
    environ = os.environ if environ is None else environ
    in_cluster = bool(environ.get(IN_CLUSTER_ENV))
    given = [name for name, value in (("--token-file", token_file), ("--token-env", token_env),
                                      ("--cookie-env", cookie_env)) if value]
    if len(given) > 1:
        raise SubmitError(f"give one of {', '.join(given)}, not several")
    host = host or environ.get(ENDPOINT_ENV) or (IN_CLUSTER_HOST if in_cluster else None)
    if host is None:
        raise SubmitError("no --host: outside a cluster, name the KFP API endpoint "
                          "(e.g. --host https://kubeflow.example.com/pipeline)")
    if token_env is not None:
        if not environ.get(token_env):
            raise SubmitError(f"--token-env {token_env}: the environment variable is not set or empty")
        return Connection(host, token_env=token_env)
    if cookie_env is not None:
        if not environ.get(cookie_env):
            raise SubmitError(f"--cookie-env {cookie_env}: the environment variable is not set or empty")
        return Connection(host, cookie_env=cookie_env)
    if token_file is None and environ.get(TOKEN_PATH_ENV):
        token_file = Path(environ[TOKEN_PATH_ENV])
    if token_file is not None:
        token_file = Path(token_file)
        if not token_file.is_file() or not token_file.read_text().strip():
            raise SubmitError(f"token file {token_file}: missing or empty")
        return Connection(host, token_file=token_file)
    return Connection(host)


def check_backend_version(client: kfp.Client, required: Version) -> Version:
    """The server's KFP version (healthz `tag_name`); SubmitError when it is older than `required`."""
    # The API server's healthz JSON carries `tag_name` (its release), but kfp_server_api's response model drops
    # it: read the raw body, through the client's own authenticated API client.
    response = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    tag = str(json.loads(response.data).get("tag_name") or "")
    try:
        server = Version(tag.lstrip("v"))
    except InvalidVersion as exc:
        raise SubmitError(f"the KFP API server reports version {tag!r}, which is not a version number") from exc
    if server < required:
        raise SubmitError(f"the KFP API server is {server}; this pipeline needs KFP >= {required} "
                          f"(pipeline.backend.BACKEND_FEATURES lists what needs which version)")
    return server


def submit(
    config: RunConfig,
    *,
    connection: Connection,
    namespace: str | None,
    experiment: str,
    variants: str,
    run_name: str | None = None,
    wait: bool = False,
    timeout_s: int = 7 * 24 * 3600,
    poll_s: int | None = None,
    images_lock: Path | None = None,
) -> str:
    """Compile the branches of `variants` (main, pretrained or both), check the server's version, submit one run
    with the resolved config as its argument (the typed run parameters keep their defaults, the config's values),
    optionally wait; returns the run id."""
    client = connection.client(namespace)
    server = check_backend_version(client, required_backend_version(config.cluster))
    log.info("KFP API server %s, version %s", connection.describe(), server)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(config, Path(tmp) / "ctv2v-pipeline.yaml", images_lock=images_lock,
                                   variants=variants)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments={"config": config_argument(config)},
            run_name=run_name or f"ctv2v-{variants}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
            experiment_name=experiment,
            namespace=namespace,
            service_account=config.cluster.service_account or None,
        )
    run_id = result.run_id
    log.info("submitted run %s (experiment %s, branches %s)", run_id, experiment, variants)
    if wait:
        run = client.wait_for_run_completion(run_id, timeout=timeout_s,
                                           sleep_duration=DEFAULT_POLL_S if poll_s is None else poll_s)
        state = (run.state or "UNKNOWN").upper()
        if state != "SUCCEEDED":
            raise RunFailed(f"run {run_id} finished as {state}")
        log.info("run %s succeeded", run_id)
    return run_id
