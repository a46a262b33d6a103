"""The exit handler's scratch cleanup (ctv2v.steps.finish_run.remove_run_scratch): which run folders it deletes on
the workspace volume, and what it always keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctv2v.config import ClusterConfig
from ctv2v.data.prepared import run_workspace
from ctv2v.steps.finish_run import SCRATCH_CLEANUP_POLICIES, remove_run_scratch


def _workspace(root: Path) -> tuple[Path, Path, Path]:
    """A workspace volume with this run's folder, another run's folder and the shared preprocessing cache."""
    run_dir = run_workspace(root, "run-a")
    other = run_workspace(root, "run-b")
    cache = root / "cache"
    for folder in (run_dir / "train-full-main" / "checkpoints", other / "train-vae-main", cache / "volumes"):
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(b"x" * 64)
    return run_dir, other, cache


def test_the_policies_are_those_the_config_accepts():
    assert set(SCRATCH_CLEANUP_POLICIES) == set(ClusterConfig.model_fields["scratch_cleanup"].annotation.__args__)


@pytest.mark.parametrize("policy, state, removed", [
    ("on_success", "SUCCEEDED", True),
    ("on_success", "FAILED", False),     # a retry of the run resumes from these checkpoints
    ("on_success", "CANCELLED", False),
    ("always", "FAILED", True),
    ("never", "SUCCEEDED", False),
])
def test_only_this_runs_folder_goes_and_only_when_the_policy_says(tmp_path, policy, state, removed):
    run_dir, other, cache = _workspace(tmp_path)
    assert remove_run_scratch(run_dir, state, policy, pending=[]) is removed
    assert run_dir.exists() is not removed
    assert (other / "train-vae-main" / "data.bin").is_file() and (cache / "volumes" / "data.bin").is_file()


def test_a_folder_with_pending_mlflow_data_is_kept(tmp_path):
    run_dir, _, _ = _workspace(tmp_path)
    assert remove_run_scratch(run_dir, "SUCCEEDED", "always", pending=[str(run_dir / "mlflow-pending-x.json")]) is False
    assert run_dir.is_dir()


def test_an_unknown_policy_is_an_error_and_a_missing_folder_is_nothing_to_do(tmp_path):
    run_dir, _, _ = _workspace(tmp_path)
    with pytest.raises(ValueError, match="expected one of never, on_success, always"):
        remove_run_scratch(run_dir, "SUCCEEDED", "sometimes", pending=[])
    assert run_dir.is_dir()
    assert remove_run_scratch(tmp_path / "runs" / "absent", "SUCCEEDED", "always", pending=[]) is False
