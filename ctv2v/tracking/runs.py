"""MLflow tracking for pipeline steps that never stops or stalls training because the tracking server is away.

Off, on, unreachable:
- No `tracking.tracking_uri` and no MLFLOW_TRACKING_URI: tracking is off (one log line says so); every log call
  still checks its arguments, then does nothing. That is the user's explicit choice, not a fallback.
- A URI is set: the Tracker asks the server a real API question at start (`/health` stays 200 while a
  Host-header check rejects every API call). A server that does not answer (refused, timed out, or a
  408/429/500/502/503/504 status that MLflow's retries gave up on) is reported in one warning and the step
  goes on; a server that answers with any other error (403 from the Host check, a rejected value) raises,
  because that is a misconfiguration or a bug that waiting will not fix.

Everything a step sends is first an entry in a pending state (run creation, params, metrics, dataset inputs,
artifacts, model registrations, the run's end) and is removed from it only once the server accepted it. A
sync sends the entries in that order and stops at the first call the server does not answer; what is left is
written atomically to `<output_dir>/mlflow-pending-<step>-<id>.json`, a self-contained journal (tracking URI,
experiment, pipeline run id, tags, original timestamps) from which any later process can finish the upload:
the same step at `close()`, or the next step via `Tracker.flush_pending(upstream_output_dir, ...)`. Replays are
idempotent where it matters: the run id is saved as soon as the run exists, artifacts overwrite their path, a
model version already registered from the same run and path is reused.

Bounded cost while the server is away: HTTP timeout and retries come from the config (MLflow's own defaults
retry for ~4 minutes per call); after one unanswered call nothing is tried for `retry_interval_s` (doubling up
to 16x while the server stays away), so training pays at most one (retries + 1) x timeout stall per interval.
Metrics are buffered in memory and synced every `flush_interval_s`; while offline the journal is rewritten
at those ticks, so a hard crash loses at most one interval of metrics. Artifacts are uploaded from their path
at sync time: a file replaced in the meantime is uploaded in its newest version.

Runs: one experiment (`tracking.experiment`), one parent run per pipeline run found or created by the tag
`ctv2v.pipeline_run_id` (steps run in separate pods), one nested child run per step. Parallel steps may both
create the parent; every creator then keeps the oldest and deletes its own duplicate.

System metrics (`system/...`, shown in the UI's system metrics tab) are sampled with MLflow's own CPU, disk,
network and GPU monitors, but recorded through this buffer: MLflow's monitor thread stops for good at the
first failed request, and needs a run id that does not exist while the server is away at start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from ctv2v.config import TrackingConfig
from ctv2v.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

TAG_PIPELINE_RUN_ID = "ctv2v.pipeline_run_id"
TAG_RUN_ROLE = "ctv2v.run_role"
"""`pipeline` on the parent run, `step` on the children: parent lookups filter on it."""
TAG_STEP = "ctv2v.step"
TAG_VARIANT = "ctv2v.variant"
TAG_PHASE = "ctv2v.phase"
TAG_WEIGHTS = "ctv2v.weights"
"""pretrained / scratch / stand-in: what the VAE weights are (filterable in the UI)."""
TAG_WEIGHTS_LABEL = "ctv2v.weights_label"
"""The full weights label when it carries detail, e.g. `scratch, fine-tuned (full phase)`."""
TAG_IMAGE = "ctv2v.image"
TAG_KFP_RUN_ID = "ctv2v.kfp_run_id"
TAG_TEST_PSNR = "test_psnr"
"""Model version tag compared to move the `champion` alias."""

WEIGHTS_KINDS = ("pretrained", "scratch", "stand-in")
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
PENDING_PREFIX = "mlflow-pending-"
LONG_PARAMS_FILE = "mlflow-long-params.json"
"""Full values of params longer than MLflow's limit, uploaded as an artifact beside the truncated params."""

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REMOTE_ERRORS = (MlflowException, requests.RequestException, ConnectionError, TimeoutError)
_TRANSPORT_ERRORS = (requests.RequestException, ConnectionError, TimeoutError)
_MAX_BACKOFF_FACTOR = 16


def is_server_unreachable(exc: BaseException) -> bool:
    """True when `exc` or an exception it was raised from is a network failure (refused, timeout, retries spent).

    Retries end in requests' RetryError for the statuses MLflow retries (408, 429, 500, 502-504), so those count.

    MLflow wraps transport errors in MlflowException, keeping the original as the exception's cause or context.
    """
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, _TRANSPORT_ERRORS):
            return True
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return False


def configure_client_http(config: TrackingConfig) -> None:
    """Set MLflow's HTTP timeout and retry count (process-wide environment) from the tracking config."""
    settings = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(math.ceil(config.request_timeout_s)),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(config.max_retries),
    }
    for name, value in settings.items():
        previous = os.environ.get(name)
        if previous is not None and previous != value:
            log.info("%s=%s from the environment is replaced by %s from the tracking config", name, previous, value)
        os.environ[name] = value


def git_commit() -> str:
    """The code's git commit: CTV2V_GIT_COMMIT (set in images), else `git rev-parse HEAD`, else "unknown"."""
    from_env = os.environ.get("CTV2V_GIT_COMMIT")
    if from_env:
        return from_env
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def new_pipeline_run_id() -> str:
    """A pipeline run id for runs outside Kubeflow (in the cluster the KFP run id is used)."""
    return f"local-{uuid.uuid4().hex}"


@dataclass
class ModelRegistration:
    """A registered model version and whether it became the champion."""

    name: str
    version: str
    test_psnr: float
    champion: bool


@dataclass
class _Pending:
    """What a step still has to send; saved as the pending journal (JSON) whenever it is not empty."""

    tracking_uri: str
    experiment: str
    pipeline_run_id: str
    step_name: str
    parent_tags: dict[str, str]
    tags: dict[str, str]
    start_time_ms: int
    run_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[list] = field(default_factory=list)
    """[key, value, timestamp_ms, step] rows."""
    inputs: list[dict[str, str]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    end_status: str | None = None
    end_time_ms: int | None = None
    closed: bool = False
    """Set once the owning step finished: only closed journals are replayed by other processes."""

    def synced(self) -> bool:
        """Nothing is left to send."""
        return self.run_id is not None and not (
            self.params or self.metrics or self.inputs or self.artifacts or self.registrations or self.end_status
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> "_Pending":
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}: not a ctv2v MLflow pending journal ({exc})") from exc


class _SystemMetricsSampler:
    """A daemon thread sampling MLflow's system monitors every `interval_s` into a `record(metrics, step)`."""

    def __init__(self, interval_s: float, record):
        self._interval_s = interval_s
        self._record = record
        self._monitors: list[BaseMetricsMonitor] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self._monitors.append(GPUMonitor())
        except (ImportError, RuntimeError) as exc:
            log.info("no GPU system metrics: %s", exc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctv2v-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.wait(self._interval_s):
            values: dict[str, float] = {}
            for monitor in self._monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self._record({f"system/{key}": value for key, value in values.items()}, step)
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Tracker:
    """MLflow tracking of one pipeline step; see the module docstring for what happens when the server is away."""

    def __init__(self, config: TrackingConfig, output_dir: Path):
        self.config = config
        self.output_dir = Path(output_dir)
        self.tracking_uri: str | None = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self._client: MlflowClient | None = None
        self._lock = threading.RLock()
        self._state: _Pending | None = None
        self._journal: Path | None = None
        self._sampler: _SystemMetricsSampler | None = None
        self._params_seen: dict[str, str] = {}
        self._long_params: dict[str, str] = {}
        self._registered: dict[str, ModelRegistration] = {}
        self._last_flush = time.monotonic()
        self._offline_until = 0.0
        self._offline_failures = 0
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
        return None if self._state is None else self._state.run_id

    @property
    def pending_file(self) -> Path | None:
        """The journal of what is not uploaded yet, if anything is pending."""
        return self._journal if self._journal is not None and self._journal.exists() else None

    # ----------------------------------------------------------------------------------------- server state
    def check_health(self) -> bool:
        """Ask the server a real API question; False (reported once, tracking kept on disk) if it does not answer."""
        if self._client is None:
            return False
        try:
            self._client.search_experiments(max_results=1)
        except _REMOTE_ERRORS as exc:
            if not is_server_unreachable(exc):
                raise
            self._went_offline(exc)
            return False
        log.info("MLflow tracking to %s, experiment %r", self.tracking_uri, self.config.experiment)
        return True

    def _went_offline(self, exc: BaseException) -> None:
        factor = min(2 ** self._offline_failures, _MAX_BACKOFF_FACTOR)
        wait_s = self.config.retry_interval_s * factor
        self._offline_until = time.monotonic() + wait_s
        if self._offline_failures == 0:
            log.warning(
                "MLflow server %s is unreachable (%s). Training continues; tracking data is kept in %s/%s*.json "
                "and uploaded when the server answers (next try in %.0f s, and at the end of the step)",
                self.tracking_uri, exc, self.output_dir, PENDING_PREFIX, wait_s,
            )
        else:
            log.info("MLflow server %s still unreachable (%s); next try in %.0f s", self.tracking_uri, exc, wait_s)
        self._offline_failures += 1

    def _came_back(self) -> None:
        if self._offline_failures:
            log.info("MLflow server %s answers again; pending tracking data uploaded", self.tracking_uri)
        self._offline_failures = 0
        self._offline_until = 0.0

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
    ) -> Iterator["Tracker"]:
        """The step's nested MLflow run under the pipeline run's parent; ends FINISHED, FAILED or KILLED.

        `weights` is a VAE weights label: pretrained / scratch / stand-in, optionally followed by ", <detail>".
        """
        if not _RUN_ID_PATTERN.match(pipeline_run_id):
            raise ValueError(
                f"pipeline_run_id {pipeline_run_id!r}: expected 1-128 characters of letters, digits and ._:-"
            )
        if not step_name:
            raise ValueError("step_name must not be empty")
        weights_kind = None if weights is None else weights.split(",", 1)[0].strip()
        if weights_kind is not None and weights_kind not in WEIGHTS_KINDS:
            raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS_KINDS)}, optionally "
                             "followed by ', <detail>'")
        if self._state is not None:
            raise RuntimeError(f"this Tracker already tracks step {self._state.step_name!r}; use one Tracker per step")
        common = {
            TAG_PIPELINE_RUN_ID: pipeline_run_id,
            MLFLOW_GIT_COMMIT: git_commit(),
            TAG_IMAGE: os.environ.get("CTV2V_IMAGE", "unknown"),
        }
        if kfp_run_id is not None:
            common[TAG_KFP_RUN_ID] = kfp_run_id
        step_tags = {**common, TAG_RUN_ROLE: "step", TAG_STEP: step_name}
        for key, value in ((TAG_VARIANT, variant), (TAG_PHASE, phase), (TAG_WEIGHTS, weights_kind)):
            if value is not None:
                step_tags[key] = value
        if weights is not None and weights != weights_kind:
            step_tags[TAG_WEIGHTS_LABEL] = weights
        step_tags.update({str(key): str(value) for key, value in (tags or {}).items()})
        self._state = _Pending(
            tracking_uri=self.tracking_uri or "",
            experiment=self.config.experiment,
            pipeline_run_id=pipeline_run_id,
            step_name=step_name,
            parent_tags={**common, TAG_RUN_ROLE: "pipeline"},
            tags=step_tags,
            start_time_ms=_now_ms(),
        )
        self._journal = self.output_dir / f"{PENDING_PREFIX}{step_name}-{uuid.uuid4().hex[:8]}.json"
        if self.enabled:
            self.flush()
            if self.config.system_metrics_interval_s is not None:
                self._sampler = _SystemMetricsSampler(self.config.system_metrics_interval_s, self._record_metrics)
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
        state = self._active_state("close")
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if not self.enabled:
            return True
        with self._lock:
            if not state.closed:
                state.end_status, state.end_time_ms, state.closed = status, _now_ms(), True
            try:
                done = self.flush(force=True)
            except _REMOTE_ERRORS:
                # The server rejected something this step logged (a bug, now raised): the run still ends, FAILED.
                state.end_status = RunStatus.to_string(RunStatus.FAILED)
                self.flush(force=True)
                raise
        if not done:
            log.warning("MLflow: step %r ended with tracking data pending in %s", state.step_name, self._journal)
        return done

    # --------------------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params (e.g. ctv2v.config.flatten(config)); values over MLflow's 6000 chars are truncated, in full
        in the artifact `params/mlflow-long-params.json`."""
        state = self._active_state("log_params")
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
                state.artifacts.append({"local_path": str(long_file), "artifact_path": "params", "is_dir": False})
            self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics at `step`; they are sent every `flush_interval_s` and at the end."""
        self._active_state("log_metrics")
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
            self._state.metrics.extend([key, value, timestamp, step] for key, value in values.items())

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file now (queued in the pending journal if the server is away)."""
        self._log_artifact(Path(path), artifact_path, is_dir=False)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files now (queued in the pending journal if the server is away)."""
        self._log_artifact(Path(directory), artifact_path, is_dir=True)

    def _log_artifact(self, path: Path, artifact_path: str | None, is_dir: bool) -> None:
        state = self._active_state("log_artifact")
        if is_dir and not path.is_dir():
            raise NotADirectoryError(f"log_artifacts: {path} is not a directory")
        if not is_dir and not path.is_file():
            raise FileNotFoundError(f"log_artifact: {path} is not a file")
        if not self.enabled:
            return
        with self._lock:
            entry = {"local_path": str(path.resolve()), "artifact_path": artifact_path, "is_dir": is_dir}
            state.artifacts.append(entry)
            self.flush()

    def log_input_manifest(self, path: Path, context: str = "training") -> None:
        """Record the data manifest as the run's dataset input (name, sha256 digest, source) and as an artifact."""
        path = Path(path)
        state = self._active_state("log_input_manifest")
        if not path.is_file():
            raise FileNotFoundError(f"log_input_manifest: {path} is not a file")
        if not self.enabled:
            return
        entry = {
            "name": path.stem,
            "digest": sha256_file(path)[:MAX_DATASET_DIGEST_SIZE],
            "source_uri": str(path.resolve()),
            "context": context,
        }
        with self._lock:
            state.inputs.append(entry)
            state.artifacts.append({"local_path": str(path.resolve()), "artifact_path": "inputs", "is_dir": False})
            self.flush()

    def register_model(
        self, model_dir: Path, name: str, test_psnr: float, artifact_path: str = "model"
    ) -> ModelRegistration | None:
        """Upload `model_dir` (state dict + config files) and register it as a version of `name` with alias
        `candidate`; `champion` moves to it only if its test PSNR beats the champion's. None while the server
        is away (the registration is pending and done at a later sync)."""
        state = self._active_state("register_model")
        model_dir = Path(model_dir)
        if not model_dir.is_dir() or not any(model_dir.iterdir()):
            raise FileNotFoundError(f"register_model: {model_dir} is not a folder with model files")
        if not name:
            raise ValueError("register_model: name must not be empty")
        psnr = float(test_psnr)
        if not self.enabled:
            return None
        registration_id = uuid.uuid4().hex
        with self._lock:
            entry = {"local_path": str(model_dir.resolve()), "artifact_path": artifact_path, "is_dir": True}
            state.artifacts.append(entry)
            state.registrations.append(
                {"id": registration_id, "name": name, "artifact_path": artifact_path, "test_psnr": psnr}
            )
            self.flush()
        return self._registered.get(registration_id)

    # -------------------------------------------------------------------------------------------- syncing
    def flush(self, force: bool = False) -> bool:
        """Send what is buffered or pending; True if nothing is left. Without `force`, skipped while offline."""
        if not self.enabled or self._state is None:
            return True
        with self._lock:
            self._last_flush = time.monotonic()
            try:
                if force or time.monotonic() >= self._offline_until:
                    self._sync_own()
            finally:
                self._save_journal()
            return self._state.synced()

    def _sync_own(self) -> None:
        try:
            _replay(self._client, self._state, self._registered)
        except _REMOTE_ERRORS as exc:
            if not is_server_unreachable(exc):
                raise
            self._went_offline(exc)
            return
        self._came_back()

    def _save_journal(self) -> None:
        if self._state.synced():
            self._journal.unlink(missing_ok=True)
        else:
            atomic_write_text(self._journal, self._state.to_json())

    def flush_pending(self, *other_output_dirs: Path) -> bool:
        """Retry now, ignoring the offline back-off: this step's pending data, then closed pending journals that
        earlier steps left in `other_output_dirs`. True if nothing is left pending in any of them."""
        done = self.flush(force=True)
        if not self.enabled:
            return done
        for folder in other_output_dirs:
            for journal in sorted(Path(folder).glob(f"{PENDING_PREFIX}*.json")):
                if journal != self._journal:
                    done = self._replay_journal(journal) and done
        return done

    def _replay_journal(self, journal: Path) -> bool:
        # Renaming is the claim: of two processes replaying the same journal, one gets it, the other skips it.
        claimed = journal.with_name(f"{journal.name}.claimed-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            if not _Pending.load(journal).closed:
                log.info("MLflow: %s belongs to a step that has not ended; left for that step to upload", journal)
                return False
            os.rename(journal, claimed)
        except FileNotFoundError:
            log.info("MLflow: %s was taken by another process", journal)
            return True
        state = _Pending.load(claimed)
        client = self._client if state.tracking_uri == self.tracking_uri else MlflowClient(state.tracking_uri)
        try:
            _replay(client, state, {})
        except _REMOTE_ERRORS as exc:
            if not is_server_unreachable(exc):
                raise
            log.warning("MLflow: %s not uploaded, server %s unreachable (%s)", journal, state.tracking_uri, exc)
        finally:
            if not state.synced():
                atomic_write_text(journal, state.to_json())
            claimed.unlink()
        if state.synced():
            log.info("MLflow: uploaded what step %r left pending in %s", state.step_name, journal)
        return state.synced()

    def _active_state(self, what: str) -> _Pending:
        if self._state is None:
            raise RuntimeError(f"Tracker.{what} called outside `with tracker.step_run(...)`")
        return self._state


# ----------------------------------------------------------------------------------------------- replay
def _replay(client: MlflowClient, state: _Pending, registered: dict[str, ModelRegistration]) -> None:
    """Send `state`'s entries in order, removing each once the server accepted it; raises at the first failure.

    An entry the server rejects (as opposed to not answering) is removed too before the error is raised: no
    retry can make it succeed, and leaving it would raise again at every later sync.
    """
    if state.run_id is None:
        state.run_id = _create_step_run(client, state)
    while state.params:
        chunk = dict(list(state.params.items())[:MAX_PARAMS_TAGS_PER_BATCH])

        def drop_params(keys=tuple(chunk)) -> None:
            for key in keys:
                del state.params[key]

        _send(lambda: client.log_batch(state.run_id, params=[Param(k, v) for k, v in chunk.items()]), drop_params)
    while state.metrics:
        chunk = state.metrics[:MAX_METRICS_PER_BATCH]

        def drop_metrics(count=len(chunk)) -> None:
            del state.metrics[:count]

        _send(lambda: client.log_batch(state.run_id, metrics=[Metric(*row) for row in chunk]), drop_metrics)
    while state.inputs:
        _send(lambda: client.log_inputs(state.run_id, datasets=[_dataset_input(state.inputs[0])]),
              lambda: state.inputs.pop(0))
    while state.artifacts:
        _send(lambda: _upload(client, state.run_id, state.artifacts[0]), lambda: state.artifacts.pop(0))
    while state.registrations:
        entry = state.registrations[0]

        def register(entry=entry) -> None:
            registered[entry["id"]] = _register(client, state, entry)

        _send(register, lambda: state.registrations.pop(0))
    if state.end_status is not None:
        client.set_terminated(state.run_id, status=state.end_status, end_time=state.end_time_ms)
        state.end_status = None


def _send(call, remove) -> None:
    """`call()`, then `remove()` its entry; an entry the server rejected is removed before the error propagates."""
    try:
        call()
    except _REMOTE_ERRORS as exc:
        if not is_server_unreachable(exc):
            remove()
        raise
    remove()


def _create_step_run(client: MlflowClient, state: _Pending) -> str:
    experiment_id = _experiment_id(client, state.experiment)
    parent_id = _pipeline_run(client, experiment_id, state)
    run = client.create_run(
        experiment_id,
        start_time=state.start_time_ms,
        tags={**state.tags, MLFLOW_PARENT_RUN_ID: parent_id},
        run_name=state.step_name,
    )
    log.info("MLflow run %s for step %r (pipeline run %s)", run.info.run_id, state.step_name, state.pipeline_run_id)
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


def _pipeline_run(client: MlflowClient, experiment_id: str, state: _Pending) -> str:
    """The parent run tagged with the pipeline run id, created if missing (the oldest wins a creation race)."""
    query = f"tags.`{TAG_PIPELINE_RUN_ID}` = '{state.pipeline_run_id}' and tags.`{TAG_RUN_ROLE}` = 'pipeline'"

    def oldest() -> str | None:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=100)
        return min(runs, key=lambda run: (run.info.start_time, run.info.run_id)).info.run_id if runs else None

    existing = oldest()
    if existing is not None:
        return existing
    mine = client.create_run(experiment_id, tags=state.parent_tags, run_name=f"pipeline-{state.pipeline_run_id}")
    winner = oldest()
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return winner


def _dataset_input(entry: dict[str, str]) -> DatasetInput:
    source = get_dataset_source_from_json(json.dumps({"uri": entry["source_uri"]}), source_type="local")
    dataset = MetaDataset(source, name=entry["name"], digest=entry["digest"])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, entry["context"])])


def _upload(client: MlflowClient, run_id: str, entry: dict[str, Any]) -> None:
    local = Path(entry["local_path"])
    if not local.exists():
        # Deleted since it was queued: nothing can ever upload it; say so instead of retrying forever.
        log.error("MLflow: %s was deleted before it could be uploaded to run %s; dropped", local, run_id)
        return
    if entry["is_dir"]:
        client.log_artifacts(run_id, str(local), entry["artifact_path"])
    else:
        client.log_artifact(run_id, str(local), entry["artifact_path"])


def _register(client: MlflowClient, state: _Pending, entry: dict[str, Any]) -> ModelRegistration:
    name, psnr = entry["name"], float(entry["test_psnr"])
    source = f"runs:/{state.run_id}/{entry['artifact_path']}"
    try:
        client.create_registered_model(name, description="ctv2v denoiser + VAE (state dicts and config files)")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # A version from the same run and path exists if an earlier sync registered it but lost the answer.
    existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{state.run_id}'")
                if v.source == source]
    if existing:
        version = existing[0]
    else:
        version = client.create_model_version(
            name, source=source, run_id=state.run_id,
            tags={TAG_TEST_PSNR: repr(psnr), TAG_PIPELINE_RUN_ID: state.pipeline_run_id, TAG_STEP: state.step_name},
        )
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    champion_psnr = _champion_psnr(client, name)
    becomes_champion = champion_psnr is None or psnr > champion_psnr
    if math.isnan(psnr):
        log.warning("model %s version %s has test PSNR NaN: it never becomes champion", name, version.version)
        becomes_champion = False
    if becomes_champion:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    log.info("registered %s version %s (test PSNR %.3f dB)%s", name, version.version, psnr,
             "; it is the new champion" if becomes_champion else f"; champion stays at {champion_psnr:.3f} dB")
    return ModelRegistration(name, str(version.version), psnr, becomes_champion)


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


def _now_ms() -> int:
    return int(time.time() * 1000)
