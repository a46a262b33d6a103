"""The pending journal: what a step still has to send to MLflow, saved as `mlflow-pending-<step>-<id>.json`.

Everything a step logs is first an entry here (params, metrics, dataset inputs, artifacts, model registrations,
the run's end) and is removed only once the server accepted it. `send_entries` sends them in that order and
stops at the first call the server does not answer. The file is self-contained (tracking URI, experiment,
pipeline run id, tags, original timestamps), so any later process can finish the upload. Replays are
idempotent where it matters: the run id is saved as soon as the run exists, artifacts overwrite their path,
a model version already registered from the same run is reused (its model is not logged again).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from ctv2v.files import atomic_write_text
from ctv2v.tracking.offline import REMOTE_ERRORS, is_server_unreachable
from ctv2v.tracking.registry import ModelRegistration, VersionFacts, register_version

log = logging.getLogger(__name__)

PENDING_PREFIX = "mlflow-pending-"


def now_ms() -> int:
    """The wall-clock time in milliseconds, as journal entries and MLflow runs are stamped."""
    return int(time.time() * 1000)
@dataclass
class ArtifactEntry:
    """A file or folder to upload from its path at sync time (a file replaced meanwhile goes in its newest version)."""

    local_path: str
    artifact_path: str | None
    is_dir: bool


@dataclass
class DatasetEntry:
    """A dataset input of the run: a data manifest's name, sha256 digest, source and context."""

    name: str
    digest: str
    source_uri: str
    context: str


@dataclass
class RegistrationEntry:
    """A trained-model folder to log as a pyfunc model and register with its facts; `id` finds the result."""

    id: str
    name: str
    model_dir: str
    facts: dict
    """ctv2v.tracking.registry.VersionFacts as a dict."""


@dataclass
class Journal:
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
    inputs: list[DatasetEntry] = field(default_factory=list)
    artifacts: list[ArtifactEntry] = field(default_factory=list)
    registrations: list[RegistrationEntry] = field(default_factory=list)
    end_status: str | None = None
    end_time_ms: int | None = None
    closed: bool = False
    """Set once the owning step finished: only closed journals are replayed by other processes."""
    kfp_managed: bool = False
    """The run is one KFP's MLflow integration made (MLFLOW_RUN_ID): logged into, never ended by ctv2v."""
    reopen: bool = False
    """The run exists from an earlier attempt of this step (a retry): set RUNNING again and tag it at next sync."""

    def synced(self) -> bool:
        """Nothing is left to send."""
        return self.run_id is not None and not (
            self.params or self.metrics or self.inputs or self.artifacts or self.registrations or self.end_status
            or self.reopen
        )

    def counts(self) -> dict[str, int]:
        """How many entries of each kind are left to send."""
        return {"params": len(self.params), "metrics": len(self.metrics), "inputs": len(self.inputs),
                "artifacts": len(self.artifacts), "registrations": len(self.registrations)}

    def take_over(self, earlier: Journal) -> None:
        """Make this journal send what an earlier attempt of the same step left, first, into the same run."""
        self.run_id = self.run_id or earlier.run_id
        self.params = {**earlier.params, **self.params}
        self.metrics[:0] = earlier.metrics
        self.inputs[:0] = earlier.inputs
        self.artifacts[:0] = earlier.artifacts
        self.registrations[:0] = earlier.registrations

    def save(self, path: Path) -> None:
        """Write the journal to `path` atomically, or remove `path` once nothing is left to send."""
        if self.synced():
            path.unlink(missing_ok=True)
        else:
            atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Journal:
        """The journal saved at `path`; ValueError naming the file if it is not one."""
        try:
            data = json.loads(path.read_text())
            return cls(**{
                **data,
                "inputs": [DatasetEntry(**entry) for entry in data["inputs"]],
                "artifacts": [ArtifactEntry(**entry) for entry in data["artifacts"]],
                "registrations": [RegistrationEntry(**entry) for entry in data["registrations"]],
            })
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a ctv2v MLflow pending journal ({exc!r})") from exc


def send_entries(client: MlflowClient, journal: Journal, registered: dict[str, ModelRegistration]) -> None:
    """Send the entries of a journal whose run exists, in order, removing each once the server accepted it;
    raises at the first failure. Registrations' results go into `registered` by entry id.

    An entry the server rejects (as opposed to not answering) is removed too before the error is raised: no
    retry can make it succeed, and leaving it would raise again at every later sync.
    """
    run_id = journal.run_id
    if run_id is None:
        raise RuntimeError(f"the journal of step {journal.step_name!r} has no run to send to yet")
    if journal.reopen:
        if not journal.kfp_managed:
            client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in journal.tags.items()])
        journal.reopen = False
    while journal.params:
        chunk = dict(list(journal.params.items())[:MAX_PARAMS_TAGS_PER_BATCH])
        _send(partial(client.log_batch, run_id, params=[Param(k, v) for k, v in chunk.items()]),
              partial(_remove_keys, journal.params, list(chunk)))
    while journal.metrics:
        chunk = journal.metrics[:MAX_METRICS_PER_BATCH]
        _send(partial(client.log_batch, run_id, metrics=[Metric(*row) for row in chunk]),
              partial(_remove_first, journal.metrics, len(chunk)))
    while journal.inputs:
        _send(partial(client.log_inputs, run_id, datasets=[_dataset_input(journal.inputs[0])]),
              partial(_remove_first, journal.inputs, 1))
    while journal.artifacts:
        _send(partial(_upload, client, run_id, journal.artifacts[0]), partial(_remove_first, journal.artifacts, 1))
    while journal.registrations:
        _send(partial(_register, client, journal, journal.registrations[0], registered),
              partial(_remove_first, journal.registrations, 1))
    if journal.end_status is not None:
        client.set_terminated(run_id, status=journal.end_status, end_time=journal.end_time_ms)
        journal.end_status = None


def _send(call: Callable[[], object], remove: Callable[[], object]) -> None:
    """`call()`, then `remove()` its entry; an entry the server rejected is removed before the error propagates."""
    try:
        call()
    except REMOTE_ERRORS as exc:
        if not is_server_unreachable(exc):
            remove()
        raise
    remove()


def _register(client: MlflowClient, journal: Journal, entry: RegistrationEntry,
              registered: dict[str, ModelRegistration]) -> None:
    # Imported here, not at the top: mlflow.models imports pandas, which the tracking client of every step does not
    # need (tests/tracking/test_tracking.py::test_client_works_without_pandas); only registering a model logs one.
    from ctv2v.tracking.pyfunc import log_pyfunc_model

    registered[entry.id] = register_version(
        client, name=entry.name, run_id=journal.run_id, facts=VersionFacts(**entry.facts),
        log_model=lambda: log_pyfunc_model(journal.tracking_uri, journal.run_id, Path(entry.model_dir)),
        pipeline_run_id=journal.pipeline_run_id, step_name=journal.step_name,
    )


def _remove_keys(values: dict, keys: list) -> None:
    for key in keys:
        del values[key]


def _remove_first(rows: list, count: int) -> None:
    del rows[:count]


def _dataset_input(entry: DatasetEntry) -> DatasetInput:
    source = get_dataset_source_from_json(json.dumps({"uri": entry.source_uri}), source_type="local")
    dataset = MetaDataset(source, name=entry.name, digest=entry.digest)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, entry.context)])


def _upload(client: MlflowClient, run_id: str, entry: ArtifactEntry) -> None:
    local = Path(entry.local_path)
    if not local.exists():
        # Deleted since it was queued: nothing can ever upload it; say so instead of retrying forever.
        log.error("MLflow: %s was deleted before it could be uploaded to run %s; dropped", local, run_id)
        return
    if entry.is_dir:
        client.log_artifacts(run_id, str(local), entry.artifact_path)
    else:
        client.log_artifact(run_id, str(local), entry.artifact_path)
