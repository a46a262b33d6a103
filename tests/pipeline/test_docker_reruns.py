"""Docker reruns without a Docker engine: every `docker run` line (the README's and `ctv2v pipeline rerun`'s) is
split into docker's options, the image and the container's arguments, and the arguments are run here behind the
image's own ENTRYPOINT (parsed from images/ctv2v/Dockerfile), so a line that the image would run as
`ctv2v ctv2v ...` fails here too."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ctv2v.data.prepared import prepare_data
from ctv2v.steps.compare import compare_step
from ctv2v.steps.finish_run import finish_run_step
from ctv2v.tracking.tags import TAG_PIPELINE_RUN_ID, TAG_RUN_ROLE, TAG_STEP
from pipeline.cli import main as cli_main
from pipeline.rerun import DOCKER_HOST_ALIAS
from tests.conftest import LinearInterpolationSampler, evaluation_config, run_evaluate, write_phantom
from tests.static_checks import IMAGES, REPO, dockerfile_instructions, exec_form, final_stage

DOCKER_OPTIONS_WITH_VALUE = {"--user", "-v", "-e", "--add-host", "--shm-size", "--gpus", "--network"}
DOCKER_FLAGS = {"--rm"}
HOST_GATEWAY = "127.0.0.1"
"""What `--add-host=host.docker.internal:host-gateway` resolves to, seen from this host's own processes."""


def split_docker_run(argv: list[str]) -> tuple[list[tuple[str, str | None]], str, list[str]]:
    """(docker options, image, container arguments) of `docker run ...`; an option docker's parser would not take
    here as written fails the test."""
    assert argv[:2] == ["docker", "run"], argv
    options: list[tuple[str, str | None]] = []
    rest = argv[2:]
    while rest and rest[0].startswith("-"):
        word = rest.pop(0)
        name, has_value, value = word.partition("=")
        if name in DOCKER_FLAGS and not has_value:
            options.append((name, None))
        elif name in DOCKER_OPTIONS_WITH_VALUE:
            options.append((name, value if has_value else rest.pop(0)))
        else:
            raise AssertionError(f"docker run option {word!r} not understood in {shlex.join(argv)}")
    image, *arguments = rest
    return options, image, arguments


def image_argv(arguments: list[str]) -> list[str]:
    """What the image runs for these container arguments: its ENTRYPOINT (exec form) + the arguments, with the
    entrypoint's program taken from this environment."""
    shipped = final_stage(dockerfile_instructions(IMAGES / "ctv2v" / "Dockerfile"))
    entrypoint = exec_form(next(i for i in shipped if i.keyword == "ENTRYPOINT"))
    return [str(Path(sys.executable).with_name(entrypoint[0])), *entrypoint[1:], *arguments]


def without_mlflow_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


# --------------------------------------------------------------------------------------- README lines
def documented_commands() -> list[list[str]]:
    """The rerun lines between the README's docker-reruns markers, as argv lists."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- docker-reruns:start -->"):text.index("<!-- docker-reruns:end -->")]
    return [shlex.split(line) for line in section.splitlines() if line.startswith("docker run ")]


def test_the_readme_documents_a_rerun_for_every_step_on_cpu_hosts_and_gpu_hosts():
    commands = [split_docker_run(argv) for argv in documented_commands()]
    cpu_lines = [c for c in commands if ("--gpus", "all") not in c[0]]
    steps = {arguments[0] for _, _, arguments in cpu_lines}
    assert steps == {"prepare-data", "fetch-checkpoint", "match", "train-vae", "train", "evaluate", "compare"}
    gpu_lines = [c for c in commands if ("--gpus", "all") in c[0]]
    assert gpu_lines, "the README shows the GPU form too"
    for options, image, arguments in gpu_lines:
        assert image.startswith("ctv2v/trainer:")
        # The same command as a CPU line, with --gpus all added.
        assert ([o for o in options if o != ("--gpus", "all")], image, arguments) in cpu_lines
    for options, image, arguments in commands:
        tracked = "--pipeline-run-id" in arguments
        assert tracked == (arguments[0] in {"match", "train-vae", "train", "evaluate", "compare"}), arguments
        env = dict(value.partition("=")[::2] for name, value in options if name == "-e")
        if "MLFLOW_TRACKING_URI" in env:
            assert env["MLFLOW_TRACKING_URI"].startswith(f"http://{DOCKER_HOST_ALIAS}:")
            assert ("--add-host", f"{DOCKER_HOST_ALIAS}:host-gateway") in options


@pytest.mark.slow
def test_documented_docker_commands_run_in_order(tmp_path, demo_dir):
    variables = {"RUN_ID": "readme-rerun"}
    for options, _, arguments in (split_docker_run(argv) for argv in documented_commands()):
        if ("--gpus", "all") in options:
            continue  # the GPU form of a line that runs here without it
        [workspace_mount] = [value for name, value in options if name == "-v"]
        host, _, inside = workspace_mount.partition(":")
        assert host == "$PWD/workspace" and inside == "/workspace"
        arguments = [arg.replace("$RUN_ID", variables["RUN_ID"]).replace("/workspace", str(tmp_path / "workspace"))
                     for arg in arguments]
        result = subprocess.run(image_argv(arguments), cwd=REPO, env=without_mlflow_env(), capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"{shlex.join(arguments)}\n{result.stderr[-3000:]}"
    comparison = (tmp_path / "workspace" / "compare").iterdir()
    assert any(path.suffix == ".md" for path in comparison)


# ------------------------------------------------------------------------------------ ctv2v pipeline rerun
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mlflow_server):
    """A finished pipeline run's workspace folder: prepared data, both evaluation folders, the compare step
    tracked in MLflow, and the exit handler's end of the parent run."""
    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "workspace" / "runs" / f"run-{uuid.uuid4().hex[:8]}"
    tracking = [f"tracking.tracking_uri={mlflow_server.uri}", f"tracking.experiment=test-rerun-{uuid.uuid4().hex[:8]}",
                "tracking.system_metrics_interval_s=null"]
    config = evaluation_config("evaluation.max_volumes=1", *tracking)
    for index in range(2):
        write_phantom(root / "phantoms" / f"vol{index}.nii.gz", seed=index, shape=(24, 24, 24))
    config.data.source = str(root / "phantoms")
    prepare_data(config, run_dir / "data")
    for variant in ("main", "pretrained"):
        run_evaluate(LinearInterpolationSampler(4), run_dir / "data", config.model_copy(update={"variant": variant}),
                     run_dir / f"evaluate-{variant}")
    compare_step({v: run_dir / f"evaluate-{v}" for v in ("main", "pretrained")}, run_dir / "compare",
                 config.tracking, run_dir.name)
    finish_run_step(config.tracking, run_dir, run_dir.name, "SUCCEEDED")
    return run_dir, config


def printed_rerun(capsys, *argv: str) -> tuple[list[str], str]:
    assert cli_main(["pipeline", "rerun", *argv]) == 0
    captured = capsys.readouterr()
    [line] = captured.out.splitlines()
    return shlex.split(line), captured.err


def test_the_printed_rerun_runs_behind_the_images_entrypoint_and_closes_its_mlflow_runs(finished_run, capsys):
    run_dir, config = finished_run
    argv, notes = printed_rerun(capsys, "--task", "compare", str(run_dir))
    options, image, arguments = split_docker_run(argv)
    owner = run_dir.stat()
    assert ("--user", f"{owner.st_uid}:{owner.st_gid}") in options
    assert image == config.cluster.step_image("cpu") and "not a digest" in notes
    # The run's folder at the same path inside: every path argument means the same file on both sides.
    mounts = [value.split(":")[1] for name, value in options if name == "-v"]
    for arg in arguments:
        for path in (part for part in arg.split("=") if part.startswith("/")):
            assert any(Path(path).is_relative_to(mount) for mount in mounts), f"{path} is not mounted"
    assert arguments[arguments.index("--pipeline-run-id") + 1] == run_dir.name
    # The loopback tracking URI, as the container reaches the host.
    assert ("--add-host", f"{DOCKER_HOST_ALIAS}:host-gateway") in options
    uri_setting = next(a for a in arguments if a.startswith("tracking.tracking_uri="))
    assert uri_setting == "tracking.tracking_uri=" + config.tracking.tracking_uri.replace("127.0.0.1", DOCKER_HOST_ALIAS)

    as_host_gateway = [arg.replace(DOCKER_HOST_ALIAS, HOST_GATEWAY) for arg in arguments]
    result = subprocess.run(image_argv(as_host_gateway), cwd=REPO, env=without_mlflow_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_PIPELINE_RUN_ID}` = '{run_dir.name}'")
    roles = sorted((run.data.tags[TAG_RUN_ROLE], run.data.tags.get(TAG_STEP), run.info.status) for run in runs)
    # The rerun logged into the compare step's run of the finished run and ended it; no parent was left RUNNING.
    assert roles == [("pipeline", None, "FINISHED"), ("step", "compare", "FINISHED")]


def test_a_trainer_task_runs_on_the_cpu_unless_gpus_are_asked_for(finished_run, capsys):
    run_dir, config = finished_run
    argv, notes = printed_rerun(capsys, "--task", "train-vae-main", str(run_dir))
    options, image, arguments = split_docker_run(argv)
    assert image == config.cluster.step_image("trainer") and "--gpus" not in dict(options)
    assert "NVIDIA container runtime" in notes
    assert ("--shm-size", "16g") in options
    assert arguments[:3] == ["train-vae", "--config", str(run_dir.resolve() / "data" / "resolved-config.yaml")]
    assert arguments[arguments.index("--out") + 1] == str(run_dir.resolve() / "train-vae-main")
    with_gpus, _ = printed_rerun(capsys, "--task", "train-vae-main", "--gpus", "all", str(run_dir))
    assert ("--gpus", "all") in split_docker_run(with_gpus)[0]


@pytest.mark.parametrize("argv, message", [
    (["--task", "match"], "checkpoint: missing; rerun task 'fetch-checkpoint' first"),
    (["--task", "train-full-main"], "train-vae-main: missing; rerun task 'train-vae-main' first"),
    (["--task", "compare", "--gpus", "all"], "runs on the cpu image"),
    (["--task", "evaluate"], "--task 'evaluate': expected one of"),
])
def test_a_rerun_that_cannot_work_is_one_error_naming_what_is_missing(finished_run, capsys, argv, message):
    run_dir, _ = finished_run
    assert cli_main(["pipeline", "rerun", *argv, str(run_dir)]) == 1
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert cli_main(["pipeline", "rerun", "--task", "compare", str(tmp_path)]) == 1
    assert "not a pipeline run's workspace folder" in capsys.readouterr().err
