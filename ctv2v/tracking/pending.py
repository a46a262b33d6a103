"""Pending journals a step left (server away, step killed): uploaded later into the run each names, by a next
step, the pipeline's exit handler or `ctv2v tracking sync DIR`."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from ctv2v.config import TrackingConfig
from ctv2v.tracking.hierarchy import sync
from ctv2v.tracking.journal import PENDING_PREFIX, Journal, now_ms
from ctv2v.tracking.offline import REMOTE_ERRORS, is_server_unreachable
from ctv2v.tracking.server import configure_client_http, existing_store

log = logging.getLogger(__name__)


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
            state.end_status, state.end_time_ms = RunStatus.to_string(RunStatus.FAILED), now_ms()
        log.warning("MLflow: step %r ended without closing its run (killed?); its run ends FAILED", state.step_name)
    before, run_before = state.counts(), state.run_id
    named_server, state.tracking_uri = state.tracking_uri, server or state.tracking_uri
    try:
        sync(MlflowClient(state.tracking_uri), state, {})
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
