"""Steps with N > 1 GPUs re-run their own command line under torchrun, one process per GPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from components.base import run_distributed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_run_distributed_starts_one_ctv2v_process_per_rank(capfd):
    run_distributed(2, ["config", "show", "--config", str(CONFIGS / "smoke.yaml")])
    out = capfd.readouterr().out
    assert out.count("variant: main") == 2


def test_run_distributed_fails_when_the_step_fails(capfd):
    with pytest.raises(subprocess.CalledProcessError):
        run_distributed(2, ["config", "show", "--config", str(CONFIGS / "smoke.yaml"), "--set", "sed=1"])
    assert "unknown key 'sed'" in capfd.readouterr().err
