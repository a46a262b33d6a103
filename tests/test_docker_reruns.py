"""Every `docker run` line in the README's rerun section runs, without its `docker run ... IMAGE` prefix."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r"^ctv2v/(cpu|trainer):[0-9][\w.]*$")


def documented_commands() -> list[list[str]]:
    """The rerun lines between the README's docker-reruns markers, as argv lists."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- docker-reruns:start -->"):text.index("<!-- docker-reruns:end -->")]
    lines = [line for line in section.splitlines() if line.startswith("docker run ")]
    return [shlex.split(line) for line in lines]


def step_argv(docker_argv: list[str], workspace: Path) -> list[str]:
    """The container's command (the image's entrypoint is `ctv2v`), with /workspace mapped onto `workspace`."""
    image_at = next(i for i, arg in enumerate(docker_argv) if IMAGE.match(arg))
    options = docker_argv[2:image_at]
    assert options[options.index("-v") + 1].endswith(":/workspace")
    uses_gpu = "--gpus" in options
    step = docker_argv[image_at + 1]
    assert uses_gpu == docker_argv[image_at].startswith("ctv2v/trainer"), f"{step}: GPU steps use the trainer image"
    return [arg.replace("/workspace", str(workspace)) for arg in docker_argv[image_at + 1:]]


def test_the_readme_documents_a_rerun_for_every_step():
    steps = {argv[next(i for i, a in enumerate(argv) if IMAGE.match(a)) + 1] for argv in documented_commands()}
    assert steps == {"prepare-data", "fetch-checkpoint", "match", "train-vae", "train", "evaluate", "compare"}


@pytest.mark.slow
def test_documented_docker_commands_run_in_order(tmp_path, demo_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for docker_argv in documented_commands():
        argv = step_argv(docker_argv, tmp_path / "workspace")
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-3000:]}"
    comparison = (tmp_path / "workspace" / "compare").iterdir()
    assert any(path.suffix == ".md" for path in comparison)
