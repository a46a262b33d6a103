"""Steps with N > 1 GPUs run the same step function in N torchrun processes, one per GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctv2v.config import RunConfig
from ctv2v.config_io import load_config
from ctv2v.steps.context import run_on_gpus

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def record_rank(config: RunConfig, out_dir: Path, label: str, fail: bool = False) -> None:
    """A stand-in step: writes what this process received; fails on request."""
    if fail:
        raise ValueError("the step failed on purpose")
    record = {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "seed": config.seed, "label": label, "out_dir_type": type(out_dir).__name__}
    (Path(out_dir) / f"rank-{record['rank']}.json").write_text(json.dumps(record))


@pytest.fixture
def config():
    return load_config([CONFIGS / "smoke.yaml"], ["seed=7"])


def test_two_gpus_run_the_step_in_two_processes_with_the_same_arguments(config, tmp_path):
    run_on_gpus(record_rank, 2, config, tmp_path, label="frozen")
    records = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r == {**records[0], "rank": r["rank"]} for r in records)
    assert records[0] == {"rank": 0, "world_size": 2, "seed": 7, "label": "frozen", "out_dir_type": "PosixPath"}
    # The launcher's call file lives in a temporary folder: the step folder holds only what the step wrote.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.json", "rank-1.json"]


def test_one_gpu_runs_the_step_in_this_process(config, tmp_path):
    run_on_gpus(record_rank, 1, config, tmp_path, label="full")
    assert json.loads((tmp_path / "rank-0.json").read_text())["world_size"] == 1
    assert not (tmp_path / "resolved-config.yaml").exists()


def test_a_failing_process_fails_the_step(config, tmp_path, capfd):
    with pytest.raises(subprocess.CalledProcessError):
        run_on_gpus(record_rank, 2, config, tmp_path, label="frozen", fail=True)
    assert "the step failed on purpose" in capfd.readouterr().err


def test_a_step_process_frozen_for_exit_still_runs_its_exit_handlers(tmp_path):
    # Logging and MLflow's async queue flush in atexit handlers registered before the component body ends: they
    # must still run, and the objects alive at exit must be out of the final collection's reach.
    script = (
        "import atexit, gc, sys\n"
        f"atexit.register(lambda: open({str(tmp_path / 'exit.txt')!r}, 'w').write(str(gc.get_freeze_count())))\n"
        "from ctv2v.steps.context import freeze_for_exit\n"
        "freeze_for_exit()\n"
        "freeze_for_exit()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])
    assert int((tmp_path / "exit.txt").read_text()) > 1000
