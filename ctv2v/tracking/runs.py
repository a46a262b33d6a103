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
`Tracker.flush_pending(upstream_output_dir, ...)`, the pipeline's exit handler, or `ctv2v tracking sync DIR`
(ctv2v.tracking.pending).

Bounded cost while the server is away: HTTP timeout and retries come from the config (MLflow's own defaults
retry for ~4 minutes per call); after one unanswered call an OfflineGate (ctv2v.tracking.offline) keeps every call
off the network for `retry_interval_s` (doubling up to 16x while the server stays away), so training pays at
most one (retries + 1) x timeout stall per interval. Metrics are buffered (ctv2v.tracking.metric_buffer) and synced
every `flush_interval_s`; while offline the journal is rewritten at those ticks, so a hard crash loses at most one
interval of metrics.

Runs, two modes (the hierarchy: ctv2v.tracking.hierarchy):
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
`params/mlflow-long-params.json` (ctv2v.tracking.params). The model registry lives in ctv2v.tracking.registry
(models logged as pyfunc by ctv2v.tracking.pyfunc), system metrics in ctv2v.tracking.system_metrics.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_PARAM_VAL_LENGTH

from ctv2v.config import TrackingConfig
from ctv2v.files import atomic_write_text, sha256_file
from ctv2v.models.weights import weights_kind
from ctv2v.tracking.hierarchy import check_pipeline_run_id, common_tags, sync
from ctv2v.tracking.journal import (
    PENDING_PREFIX,
    ArtifactEntry,
    DatasetEntry,
    Journal,
    RegistrationEntry,
    now_ms,
)
from ctv2v.tracking.metric_buffer import MetricBuffer
from ctv2v.tracking.offline import REMOTE_ERRORS, OfflineGate, is_server_unreachable
from ctv2v.tracking.params import LONG_PARAMS_FILE, fit_params
from ctv2v.tracking.pending import replay_journal
from ctv2v.tracking.registry import ModelRegistration, VersionFacts
from ctv2v.tracking.server import configure_client_http, tracking_uri
from ctv2v.tracking.system_metrics import SystemMetricsSampler
from ctv2v.tracking.tags import TAG_PHASE, TAG_RUN_ROLE, TAG_STEP, TAG_VARIANT, TAG_WEIGHTS, TAG_WEIGHTS_LABEL

log = logging.getLogger(__name__)

RUN_FILE_PREFIX = "mlflow-run-"
"""`<output_dir>/mlflow-run-<step>.json`: the step's run id, so that a retried step logs into the same run."""


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
        self._metrics = MetricBuffer(config.flush_interval_s)
        self._offline = OfflineGate(self.tracking_uri, config.retry_interval_s,
                                    f"{self.output_dir}/{PENDING_PREFIX}*.json")
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
            self._offline.went_away(exc)
            return False
        log.info("MLflow tracking to %s, experiment %r", self.tracking_uri, self.config.experiment)
        return True

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
        check_pipeline_run_id(pipeline_run_id)
        if not step_name:
            raise ValueError("step_name must not be empty")
        kind = None if weights is None else weights_kind(weights)
        if self._journal is not None:
            raise RuntimeError(f"this Tracker already tracks step {self._journal.step_name!r}; use one Tracker per step")
        common = common_tags(pipeline_run_id, kfp_run_id)
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
            start_time_ms=now_ms(),
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
                    state.end_status, state.end_time_ms = status, now_ms()
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
        fitted, long_values = fit_params(values)
        with self._lock:
            state.params.update(fitted)
            if long_values:
                log.warning("MLflow params %s exceed %d chars: truncated, full values in params/%s",
                            list(long_values), MAX_PARAM_VAL_LENGTH, LONG_PARAMS_FILE)
                self._long_params.update(long_values)
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
        if self._metrics.due():
            self.flush()

    def _record_metrics(self, values: Mapping[str, float], step: int) -> None:
        with self._lock:
            self._metrics.add(self._journal, values, step)

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
            self._metrics.flushed()
            try:
                if force or self._offline.is_open():
                    self._sync_own()
            finally:
                self._journal.save(self._journal_path)
            return self._journal.synced()

    def _sync_own(self) -> None:
        try:
            sync(self._client, self._journal, self._registered)
        except REMOTE_ERRORS as exc:
            if not is_server_unreachable(exc):
                raise
            self._offline.went_away(exc)
            return
        finally:
            self._save_run_file()
        self._offline.answered()

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
