"""Step `finish-run`: the pipeline's exit handler. It runs once the pipeline ends, whatever its outcome.

1. Uploads every pending MLflow journal left under the run's workspace folder (<workspace_root>/runs/<run id>):
   what steps logged while the tracking server was away. A journal its step never closed (the step was
   killed) is uploaded too and its run ends FAILED: the pipeline is over, no step will come back for it.
2. Ends the pipeline's parent MLflow run: FINISHED when KFP reports the pipeline SUCCEEDED, KILLED when it was
   cancelled, FAILED otherwise (ctv2v.tracking.hierarchy.end_pipeline_run; nothing to end under KFP's own MLflow
   integration, which ends its runs itself).
3. Removes the run's folder on the workspace volume (remove_run_scratch) as cluster.scratch_cleanup says.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctv2v.config import TrackingConfig
from ctv2v.tracking.hierarchy import end_pipeline_run
from ctv2v.tracking.pending import PendingUpload, upload_pending

log = logging.getLogger(__name__)

MLFLOW_STATUS_OF_KFP_STATE = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}
"""KFP's final pipeline state (dsl.PipelineTaskFinalStatus.state) -> the parent run's MLflow status; any other
state (FAILED, or one this code does not know) ends the run FAILED: only SUCCEEDED means the pipeline worked."""


@dataclass(frozen=True)
class FinishedRun:
    """What the exit handler did."""

    pipeline_run_id: str
    pipeline_state: str
    mlflow_status: str
    parent_run_id: str | None
    """None when tracking is off or KFP's MLflow integration owns the runs."""
    uploads: list[PendingUpload]
    scratch_removed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"pipeline_run_id": self.pipeline_run_id, "pipeline_state": self.pipeline_state,
                "mlflow_status": self.mlflow_status, "parent_run_id": self.parent_run_id,
                "uploaded_journals": [{"journal": str(u.journal), "step": u.step_name, "run_id": u.run_id,
                                       "sent": u.sent, "complete": u.complete} for u in self.uploads],
                "scratch_removed": self.scratch_removed}


SCRATCH_CLEANUP_POLICIES = ("never", "on_success", "always")


def remove_run_scratch(run_dir: Path, pipeline_state: str, policy: str, pending: list[str]) -> bool:
    """Delete the run's folder on the workspace volume when `policy` asks for it after `pipeline_state`; returns
    whether it did. By then the models, reports and metrics are KFP artifacts and in MLflow; the folder holds
    checkpoints and step scratch (the preprocessing cache outside runs/ is shared and stays). `on_success` keeps
    a failed run's checkpoints, which a retry of the run resumes from. A folder with MLflow data still `pending`
    is kept whatever the policy: `ctv2v tracking sync` needs it."""
    if policy not in SCRATCH_CLEANUP_POLICIES:
        raise ValueError(f"scratch cleanup {policy!r}: expected one of {', '.join(SCRATCH_CLEANUP_POLICIES)}")
    if policy == "never" or (policy == "on_success" and pipeline_state != "SUCCEEDED") or not run_dir.is_dir():
        return False
    if pending:
        log.warning("keeping %s: MLflow data still pending there (%s)", run_dir, pending)
        return False
    shutil.rmtree(run_dir)
    log.info("removed the run's workspace folder %s", run_dir)
    return True


def finish_run_step(tracking: TrackingConfig, run_dir: Path, pipeline_run_id: str, pipeline_state: str,
                    scratch_cleanup: str = "never") -> FinishedRun:
    """Upload the pending journals under `run_dir`, end the pipeline's parent run by `pipeline_state`, then
    remove `run_dir` as `scratch_cleanup` says (remove_run_scratch)."""
    status = MLFLOW_STATUS_OF_KFP_STATE.get(pipeline_state, "FAILED")
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        uploads = upload_pending([run_dir], tracking, steps_ended=True)
    else:
        log.info("no workspace folder %s (the pipeline ended before a step made it): no pending journals", run_dir)
        uploads = []
    left = [str(upload.journal) for upload in uploads if not upload.complete]
    if left:
        log.warning("MLflow: still pending after the pipeline ended: %s; upload with `ctv2v tracking sync %s`",
                    left, run_dir)
    parent = end_pipeline_run(tracking, pipeline_run_id, status)
    removed = remove_run_scratch(run_dir, pipeline_state, scratch_cleanup, left)
    return FinishedRun(pipeline_run_id, pipeline_state, status, parent, uploads, removed)
