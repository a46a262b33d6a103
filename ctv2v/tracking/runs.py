"""MLflow tracking for pipeline steps that never stops or stalls training because the tracking server is away.

Off, on, unreachable:
- No `tracking.tracking_uri` and no MLFLOW_TRACKING_URI: tracking is off (one log line says so); every log call
  still checks its arguments, then does nothing. That is the user's explicit choice, not a fallback.
- A URI is set: the Tracker asks the server a real API question at start (`/health` stays 200 while a
  Host-header check rejects every API call). A server that does not answer (refused, timed out, or a
  408/429/500/502/503/504 status that MLflow's retries gave up on) is reported in one warning and the step
  goes on; a server that answers with any other error (403 from the Host check, a rejected value) raises,
  because that is a misconfiguration or a bug that waiting will not fix.

What a step logs goes into its pending journal (ctv2v.tracking.journal) and leaves it once the server accepted
it. A sync creates the step's run if needed and sends the journal; what is left is written atomically to
`<output_dir>/mlflow-pending-<step>-<id>.json`, which the same step uploads at `close()`, a next step via
`Tracker.flush_pending(upstream_output_dir, ...)`, the pipeline's exit handler, or `ctv2v tracking sync DIR`.

Bounded cost while the server is away: HTTP timeout and retries come from the config (MLflow's own defaults
retry for ~4 minutes per call); after one unanswered call a RetryGate (ctv2v.remote.retry) keeps every call
off the network for `retry_interval_s` (doubling up to 16x while the server stays away), so training pays at
most one (retries + 1) x timeout stall per interval. Metrics are buffered in memory and synced every
`flush_interval_s`; while offline the journal is rewritten at those ticks, so a hard crash loses at most one
interval of metrics.

Runs, two modes:
- ctv2v's own (default): one experiment (`tracking.experiment`), one parent run per pipeline run found or
  created by the tag `ctv2v.pipeline_run_id` (steps run in separate pods), one nested child run per step.
  Parallel steps may both create the parent; every creator then keeps the oldest and deletes its own
  duplicate. The pipeline's exit-handler step (ctv2v.steps.finish_run) ends the parent FINISHED or FAILED
  (`end_pipeline_run`) after uploading every pending journal left in the run's workspace (`upload_pending`).
  A step writes its run id to `<output_dir>/mlflow-run-<step>.json`; a retry of the step in the same folder
  takes over the earlier attempt's pending journal and logs into the same run, set RUNNING again.
- KFP's MLflow integration: when KFP injects MLFLOW_RUN_ID (with MLFLOW_TRACKING_URI and
  MLFLOW_EXPERIMENT_ID) into the step's container, KFP made the parent run and a nested run per task; the step
  logs into that run (adding ctv2v's tags) and never creates or ends runs: KFP ends them.
Params longer than MLflow's limit are truncated, their full values uploaded as
`params/mlflow-long-params.json`. The model registry lives in ctv2v.tracking.registry (models logged as pyfunc
by ctv2v.tracking.pyfunc), system metrics in ctv2v.tracking.system_metrics.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_PARAM_VAL_LENGTH

from ctv2v.config import TrackingConfig
from ctv2v.files import atomic_write_text, sha256_file
from ctv2v.models.weights import weights_kind
from ctv2v.provenance import git_commit
from ctv2v.remote.retry import Backoff, RetryGate
from ctv2v.tracking.journal import (
    PENDING_PREFIX,
    ArtifactEntry,
    DatasetEntry,
    Journal,
    RegistrationEntry,
    send_entries,
)
from ctv2v.tracking.offline import REMOTE_ERRORS, is_server_unreachable
from ctv2v.tracking.registry import ModelRegistration, VersionFacts
from ctv2v.tracking.server import configure_client_http, existing_store, tracking_uri
from ctv2v.tracking.system_metrics import SystemMetricsSampler
from ctv2v.tracking.tags import (
    TAG_IMAGE,
    TAG_KFP_RUN_ID,
    TAG_PHASE,
    TAG_PIPELINE_RUN_ID,
    TAG_RUN_ROLE,
    TAG_STEP,
    TAG_TEST_PSNR,
    TAG_VARIANT,
    TAG_WEIGHTS,
    TAG_WEIGHTS_LABEL,
)

__all__ = [
    # Steps and tests import tracking from this module: the tags (ctv2v.tracking.tags), the journal's file
    # prefix and the registration result are re-exported beside what is defined here.
    "LONG_PARAMS_FILE",
    "PENDING_PREFIX",
    "RUN_FILE_PREFIX",
    "TAG_IMAGE",
    "TAG_KFP_RUN_ID",
    "TAG_PHASE",
    "TAG_PIPELINE_RUN_ID",
    "TAG_RUN_ROLE",
    "TAG_STEP",
    "TAG_TEST_PSNR",
    "TAG_VARIANT",
    "TAG_WEIGHTS",
    "TAG_WEIGHTS_LABEL",
    "ModelRegistration",
    "PendingUpload",
    "Tracker",
    "TrackingSyncError",
    "VersionFacts",
    "end_pipeline_run",
    "new_pipeline_run_id",
    "replay_journal",
    "upload_pending",
]

log = logging.getLogger(__name__)

RUN_FILE_PREFIX = "mlflow-run-"
"""`<output_dir>/mlflow-run-<step>.json`: the step's run id, so that a retried step logs into the same run."""
LONG_PARAMS_FILE = "mlflow-long-params.json"
"""Full values of params longer than MLflow's limit, uploaded as an artifact beside the truncated params."""

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_MAX_BACKOFF_FACTOR = 16


def new_pipeline_run_id() -> str:
    """A pipeline run id for runs outside Kubeflow (in the cluster the KFP run id is used)."""
    return f"local-{uuid.uuid4().hex}"


class Tracker:
    """MLflow tracking of one pipeline step; see the module docstring for what happens when the server is away."""

    def __init__(self, config: TrackingConfig, output_dir: Path, *, enabled: bool = True):
        """`enabled=False`: this process records nothing (the ranks other than 0 of a DDP step)."""
        self.config = config
        self.output_dir = Path(output_dir)
        self.tracking_uri: str | None = tracking_uri(config) if enabled else None
        self._client: MlflowClient | None = None
        self._lock = threading.RLock()
        self._journal: Journal | None = None
        self._journal_path: Path | None = None
        self._sampler: SystemMetricsSampler | None = None
        self._params_seen: dict[str, str] = {}
        self._long_params: dict[str, str] = {}
        self._registered: dict[str, ModelRegistration] = {}
        self._last_flush = time.monotonic()
        self._offline = RetryGate(Backoff(first_s=config.retry_interval_s,
                                          max_s=config.retry_interval_s * _MAX_BACKOFF_FACTOR))
        if not enabled:
            return
        if self.tracking_uri is None:
            log.info("MLflow tracking is off: neither tracking.tracking_uri nor MLFLOW_TRACKING_URI is set")
            return
        configure_client_http(config)
        self._client = MlflowClient(self.tracking_uri)
        self.check_health()

    @property
    def enabled(self) -> bool:
        """A tracking URI is configured (the server may still be away)."""
        return self._client is not None

    @property
    def run_id(self) -> str | None:
        """The step's MLflow run id, once the server has created it."""
        return None if self._journal is None else self._journal.run_id

    @property
    def pending_file(self) -> Path | None:
        """The journal of what is not uploaded yet, if anything is pending."""
        return self._journal_path if self._journal_path is not None and self._journal_path.exists() else None

    # ----------------------------------------------------------------------------------------- server state
    def check_health(self) -> bool:
        """Ask the server a real API question; False (reported once, tracking kept on disk) if it does not answer."""
        if self._client is None:
            return False
        try:
            self._client.search_experiments(max_results=1)
        except REMOTE_ERRORS as exc:
            if not is_server_unreachable(exc):
                raise
            self._went_offline(exc)
            return False
        log.info("MLflow tracking to %s, experiment %r", self.tracking_uri, self.config.experiment)
        return True

    def _went_offline(self, exc: BaseException) -> None:
        wait_s = self._offline.failed()
        if self._offline.failures == 1:
            log.warning(
                "MLflow server %s is unreachable (%s). Training continues; tracking data is kept in %s/%s*.json "
                "and uploaded when the server answers (next try in %.0f s, and at the end of the step)",
                self.tracking_uri, exc, self.output_dir, PENDING_PREFIX, wait_s,
            )
        else:
            log.info("MLflow server %s still unreachable (%s); next try in %.0f s", self.tracking_uri, exc, wait_s)

    def _came_back(self) -> None:
        if self._offline.failures:
            log.info("MLflow server %s answers again; pending tracking data uploaded", self.tracking_uri)
        self._offline.succeeded()

    # ------------------------------------------------------------------------------------------------ runs
    @contextmanager
    def step_run(
        self,
        step_name: str,
        pipeline_run_id: str,
        *,
        variant: str | None = None,
        phase: str | None = None,
        weights: str | None = None,
        kfp_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[Tracker]:
        """The step's nested MLflow run under the pipeline run's parent; ends FINISHED, FAILED or KILLED.

        `weights` is a VAE weights label: pretrained / scratch / stand-in, optionally followed by ", <detail>".
        """
        if not _RUN_ID_PATTERN.match(pipeline_run_id):
            raise ValueError(
                f"pipeline_run_id {pipeline_run_id!r}: expected 1-128 characters of letters, digits and ._:-"
            )
        if not step_name:
            raise ValueError("step_name must not be empty")
        kind = None if weights is None else weights_kind(weights)
        if self._journal is not None:
            raise RuntimeError(f"this Tracker already tracks step {self._journal.step_name!r}; use one Tracker per step")
        common = _common_tags(pipeline_run_id, kfp_run_id)
        step_tags = {**common, TAG_RUN_ROLE: "step", TAG_STEP: step_name}
        for key, value in ((TAG_VARIANT, variant), (TAG_PHASE, phase), (TAG_WEIGHTS, kind)):
            if value is not None:
                step_tags[key] = value
        if weights is not None and weights != kind:
            step_tags[TAG_WEIGHTS_LABEL] = weights
        step_tags.update({str(key): str(value) for key, value in (tags or {}).items()})
        self._journal = Journal(
            tracking_uri=self.tracking_uri or "",
            experiment=self.config.experiment,
            pipeline_run_id=pipeline_run_id,
            step_name=step_name,
            parent_tags={**common, TAG_RUN_ROLE: "pipeline"},
            tags=step_tags,
            start_time_ms=_now_ms(),
        )
        self._journal_path = self.output_dir / f"{PENDING_PREFIX}{step_name}-{uuid.uuid4().hex[:8]}.json"
        if self.enabled:
            self._continue_run(self._journal)
            self.flush()
            if self.config.system_metrics_interval_s is not None:
                self._sampler = SystemMetricsSampler(self.config.system_metrics_interval_s, self._record_metrics)
        try:
            yield self
        except KeyboardInterrupt:
            self.close(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException:
            self.close(RunStatus.to_string(RunStatus.FAILED))
            raise
        self.close(RunStatus.to_string(RunStatus.FINISHED))

    def close(self, status: str = "FINISHED") -> bool:
        """End the step's run: stop sampling, send everything; True if nothing is left pending."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r}: expected FINISHED, FAILED or KILLED")
        state = self._active_journal("close")
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if not self.enabled:
            return True
        with self._lock:
            if not state.closed:
                state.closed = True
                if not state.kfp_managed:  # KFP's MLflow integration ends the runs it made
                    state.end_status, state.end_time_ms = status, _now_ms()
            try:
                done = self.flush(force=True)
            except REMOTE_ERRORS:
                # The server rejected something this step logged (a bug, now raised): the run still ends, FAILED.
                state.end_status = RunStatus.to_string(RunStatus.FAILED)
                self.flush(force=True)
                raise
        if not done:
            log.warning("MLflow: step %r ended with tracking data pending in %s", state.step_name, self._journal_path)
        return done

    # --------------------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params (e.g. ctv2v.config.flatten(config)); values over MLflow's 6000 chars are truncated, in full
        in the artifact `params/mlflow-long-params.json`."""
        state = self._active_journal("log_params")
        values = {str(key): str(value) for key, value in params.items()}
        for key, value in values.items():
            if key in self._params_seen and self._params_seen[key] != value:
                raise ValueError(
                    f"param {key!r} was already logged as {self._params_seen[key]!r}; MLflow params are immutable "
                    f"(new value {value!r})"
                )
        self._params_seen.update(values)
        if not self.enabled:
            return
        long_keys = [key for key, value in values.items() if len(value) > MAX_PARAM_VAL_LENGTH]
        with self._lock:
            for key, value in values.items():
                if key in long_keys:
                    marker = f"... [{len(value)} chars; full value in artifact params/{LONG_PARAMS_FILE}]"
                    value = value[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
                state.params[key] = value
            if long_keys:
                log.warning("MLflow params %s exceed %d chars: truncated, full values in params/%s",
                            long_keys, MAX_PARAM_VAL_LENGTH, LONG_PARAMS_FILE)
                self._long_params.update({key: values[key] for key in long_keys})
                long_file = self.output_dir / LONG_PARAMS_FILE
                atomic_write_text(long_file, json.dumps(self._long_params, indent=1))
                state.artifacts.append(ArtifactEntry(str(long_file), "params", is_dir=False))
            self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics at `step`; they are sent every `flush_interval_s` and at the end."""
        self._active_journal("log_metrics")
        values = {str(key): float(value) for key, value in metrics.items()}
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not self.enabled:
            return
        self._record_metrics(values, step)
        if time.monotonic() - self._last_flush >= self.config.flush_interval_s:
            self.flush()

    def _record_metrics(self, values: Mapping[str, float], step: int) -> None:
        timestamp = _now_ms()
        with self._lock:
            self._journal.metrics.extend([key, value, timestamp, step] for key, value in values.items())

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file now (queued in the pending journal if the server is away)."""
        self._log_artifact(Path(path), artifact_path, is_dir=False)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files now (queued in the pending journal if the server is away)."""
        self._log_artifact(Path(directory), artifact_path, is_dir=True)

    def _log_artifact(self, path: Path, artifact_path: str | None, is_dir: bool) -> None:
        state = self._active_journal("log_artifact")
        if is_dir and not path.is_dir():
            raise NotADirectoryError(f"log_artifacts: {path} is not a directory")
        if not is_dir and not path.is_file():
            raise FileNotFoundError(f"log_artifact: {path} is not a file")
        if not self.enabled:
            return
        with self._lock:
            state.artifacts.append(ArtifactEntry(str(path.resolve()), artifact_path, is_dir))
            self.flush()

    def log_input_manifest(self, path: Path, context: str = "training") -> None:
        """Record the data manifest as the run's dataset input (name, sha256 digest, source) and as an artifact."""
        path = Path(path)
        state = self._active_journal("log_input_manifest")
        if not path.is_file():
            raise FileNotFoundError(f"log_input_manifest: {path} is not a file")
        if not self.enabled:
            return
        entry = DatasetEntry(
            name=path.stem, digest=sha256_file(path)[:MAX_DATASET_DIGEST_SIZE], source_uri=str(path.resolve()),
            context=context,
        )
        with self._lock:
            state.inputs.append(entry)
            state.artifacts.append(ArtifactEntry(str(path.resolve()), "inputs", is_dir=False))
            self.flush()

    def register_model(self, model_dir: Path, name: str, facts: VersionFacts) -> ModelRegistration | None:
        """Log the trained-model folder `model_dir` as an MLflow pyfunc model of this run and register it as a
        version of `name` tagged with `facts` (alias `candidate`; `champion` by the rules of
        ctv2v.tracking.registry). None while the server is away: the registration is pending, done at a later sync."""
        state = self._active_journal("register_model")
        model_dir = Path(model_dir)
        if not (model_dir / "model.json").is_file():
            raise FileNotFoundError(f"register_model: {model_dir} is not a trained-model folder (no model.json)")
        if not name:
            raise ValueError("register_model: name must not be empty")
        if not self.enabled:
            return None
        registration_id = uuid.uuid4().hex
        with self._lock:
            state.registrations.append(RegistrationEntry(registration_id, name, str(model_dir.resolve()),
                                                         asdict(facts)))
            self.flush()
        return self._registered.get(registration_id)

    # -------------------------------------------------------------------------------------------- syncing
    def flush(self, force: bool = False) -> bool:
        """Send what is buffered or pending; True if nothing is left. Without `force`, skipped while offline."""
        if not self.enabled or self._journal is None:
            return True
        with self._lock:
            self._last_flush = time.monotonic()
            try:
                if force or self._offline.is_open():
                    self._sync_own()
            finally:
                self._journal.save(self._journal_path)
            return self._journal.synced()

    def _sync_own(self) -> None:
        try:
            _sync(self._client, self._journal, self._registered)
        except REMOTE_ERRORS as exc:
            if not is_server_unreachable(exc):
                raise
            self._went_offline(exc)
            return
        finally:
            self._save_run_file()
        self._came_back()

    # ------------------------------------------------------------------------------------------ retries
    def _run_file(self, step_name: str) -> Path:
        return self.output_dir / f"{RUN_FILE_PREFIX}{step_name}.json"

    def _save_run_file(self) -> None:
        """Beside the step's checkpoints: the run id, so that a retry of the step logs into the same run."""
        state = self._journal
        if state.run_id is None or state.kfp_managed:
            return
        path = self._run_file(state.step_name)
        record = {"tracking_uri": self.tracking_uri, "pipeline_run_id": state.pipeline_run_id,
                  "step_name": state.step_name, "run_id": state.run_id}
        if not path.is_file() or json.loads(path.read_text()) != record:
            atomic_write_text(path, json.dumps(record, indent=1) + "\n")

    def _continue_run(self, state: Journal) -> None:
        """Pick the run this step logs into: KFP's (MLFLOW_RUN_ID), or an earlier attempt's in the same folder
        (its pending journals are taken over, its run reopened), or none yet (created at the first sync)."""
        kfp_run_id = os.environ.get("MLFLOW_RUN_ID")
        if kfp_run_id:
            state.run_id, state.kfp_managed, state.reopen = kfp_run_id, True, True
            log.info("MLflow: KFP's MLflow integration made run %s for this task; step %r logs into it",
                     kfp_run_id, state.step_name)
            return
        for path in sorted(self.output_dir.glob(f"{PENDING_PREFIX}{state.step_name}-*.json")):
            earlier = Journal.load(path)
            if earlier.pipeline_run_id == state.pipeline_run_id and earlier.tracking_uri == state.tracking_uri:
                state.take_over(earlier)
                path.unlink()
                log.info("MLflow: step %r takes over what its earlier attempt left pending in %s",
                         state.step_name, path)
        run_file = self._run_file(state.step_name)
        if state.run_id is None and run_file.is_file():
            record = json.loads(run_file.read_text())
            if (record["pipeline_run_id"], record["tracking_uri"]) == (state.pipeline_run_id, self.tracking_uri):
                state.run_id = record["run_id"]
        if state.run_id is not None:
            state.reopen = True
            log.info("MLflow: step %r continues its earlier attempt's run %s", state.step_name, state.run_id)

    def flush_pending(self, *other_output_dirs: Path) -> bool:
        """Retry now, ignoring the offline back-off: this step's pending data, then closed pending journals that
        earlier steps left in `other_output_dirs`. True if nothing is left pending in any of them."""
        done = self.flush(force=True)
        if not self.enabled:
            return done
        for folder in other_output_dirs:
            for journal in sorted(Path(folder).glob(f"{PENDING_PREFIX}*.json")):
                if journal != self._journal_path:
                    done = replay_journal(journal, steps_ended=False).complete and done
        return done

    def _active_journal(self, what: str) -> Journal:
        if self._journal is None:
            raise RuntimeError(f"Tracker.{what} called outside `with tracker.step_run(...)`")
        return self._journal


# ------------------------------------------------------------------------------------------ run hierarchy
def _sync(client: MlflowClient, journal: Journal, registered: dict[str, ModelRegistration]) -> None:
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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _common_tags(pipeline_run_id: str, kfp_run_id: str | None) -> dict[str, str]:
    tags = {TAG_PIPELINE_RUN_ID: pipeline_run_id, MLFLOW_GIT_COMMIT: git_commit(),
            TAG_IMAGE: os.environ.get("CTV2V_IMAGE", "unknown")}
    if kfp_run_id is not None:
        tags[TAG_KFP_RUN_ID] = kfp_run_id
    return tags


# ------------------------------------------------------------------------------- pending journals, run end
@dataclass(frozen=True)
class PendingUpload:
    """What one pending journal held and how much of it the server accepted."""

    journal: Path
    step_name: str
    run_id: str | None
    sent: dict[str, int]
    """What the server accepted, by kind (runs created, params, metrics, inputs, artifacts, registrations)."""
    complete: bool
    """Nothing is left: the journal file is gone."""
    skipped: str | None = None
    """Why the journal was not touched (its step still runs, another process took it)."""
    server: str | None = None
    """The tracking server it was sent to (None when skipped)."""


class TrackingSyncError(RuntimeError):
    """The server refused (rather than failed to answer) part of a pending journal; the rest is kept."""


def replay_journal(journal: Path, *, steps_ended: bool, server: str | None = None) -> PendingUpload:
    """Upload what a pending journal holds into the run it names, on `server` (default: the server it names; another
    address of the same server, e.g. a port-forward, keeps its run ids valid; the journal keeps its own address).

    A journal whose step has not closed it is left alone unless `steps_ended` (the pipeline is over, so its
    step died before closing): then its run is ended FAILED. Renaming is the claim: of two processes
    replaying the same journal, one gets it, the other skips it.
    """
    claimed = journal.with_name(f"{journal.name}.claimed-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        state = Journal.load(journal)
        if not state.closed and not steps_ended:
            log.info("MLflow: %s belongs to a step that has not ended; left for that step to upload", journal)
            return PendingUpload(journal, state.step_name, state.run_id, {}, False, "its step has not ended")
        os.rename(journal, claimed)
    except FileNotFoundError:
        log.info("MLflow: %s was taken by another process", journal)
        return PendingUpload(journal, "", None, {}, True, "taken by another process")
    state = Journal.load(claimed)
    if not state.closed:
        state.closed = True
        if not state.kfp_managed:
            state.end_status, state.end_time_ms = RunStatus.to_string(RunStatus.FAILED), _now_ms()
        log.warning("MLflow: step %r ended without closing its run (killed?); its run ends FAILED", state.step_name)
    before, run_before = state.counts(), state.run_id
    named_server, state.tracking_uri = state.tracking_uri, server or state.tracking_uri
    try:
        _sync(MlflowClient(state.tracking_uri), state, {})
    except REMOTE_ERRORS as exc:
        if not is_server_unreachable(exc):
            raise TrackingSyncError(f"{journal}: {state.tracking_uri} refused the upload: "
                                    f"{str(exc).splitlines()[0]}; the journal keeps what is left to send") from exc
        log.warning("MLflow: %s not uploaded, server %s unreachable (%s)", journal, state.tracking_uri, exc)
    finally:
        used_server, state.tracking_uri = state.tracking_uri, named_server
        state.save(journal)
        claimed.unlink()
    after = state.counts()
    sent = {"runs": int(run_before is None and state.run_id is not None),
            **{kind: before[kind] - after[kind] for kind in before}}
    if state.synced():
        log.info("MLflow: uploaded what step %r left pending in %s", state.step_name, journal)
    return PendingUpload(journal, state.step_name, state.run_id, sent, state.synced(), server=used_server)


def upload_pending(folders: list[Path], config: TrackingConfig, *, steps_ended: bool,
                   server: str | None = None) -> list[PendingUpload]:
    """Upload every pending journal under `folders` (searched recursively) to `server` (default: the server each
    names), with the HTTP timeout and retries of `config`; one result per journal found."""
    if server is not None:
        existing_store(server)
    configure_client_http(config)
    results = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: not a folder")
        for journal in sorted(folder.rglob(f"{PENDING_PREFIX}*.json")):
            results.append(replay_journal(journal, steps_ended=steps_ended, server=server))
    return results


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
    parent_tags = {**_common_tags(pipeline_run_id, kfp_run_id), TAG_RUN_ROLE: "pipeline"}
    parent_id = _pipeline_run(client, experiment_id, pipeline_run_id, parent_tags)
    client.set_terminated(parent_id, status=status)
    log.info("MLflow: pipeline run %s (MLflow run %s) ended %s", pipeline_run_id, parent_id, status)
    return parent_id
